"""The original's commands still run verbatim: python -m muxserve.muxsched.{workload_utils,placement,profile}."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("cmd, usage", [
    (["-m", "muxserve.muxsched.workload_utils"], "usage: python -m muxserve.muxsched.workload_utils [-h] --model-yaml"),
    (["muxserve/muxsched/workload_utils.py"], "usage: python -m muxserve.muxsched.workload_utils [-h] --model-yaml"),
    (["-m", "muxserve.muxsched.placement"], "usage: python -m muxserve.muxsched.placement [-h] --model-yaml"),
    (["-m", "muxserve.muxsched.profile"], "usage: python -m muxserve.muxsched.profile [-h] --model"),
])
def test_original_commands_print_their_usage(cmd, usage):
    done = subprocess.run([sys.executable, *cmd, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(usage)
