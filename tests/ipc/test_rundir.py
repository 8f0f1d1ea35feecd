"""Instance directories: private, owned, and removed once their owner is gone (even after a SIGKILL)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from muxserve.ipc.rundir import _start_time, create_run_dir, owner_alive, remove_stale_run_dirs


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _make(root: Path, name: str, owner: str | None) -> Path:
    path = root / name
    path.mkdir(mode=0o700)
    (path / "flexstore").write_text("")
    if owner is not None:
        (path / "owner").write_text(owner)
    return path


def test_only_directories_of_dead_owners_are_removed(tmp_path):
    me = os.getpid()
    dead = _make(tmp_path, "muxserve-dead", f"{_dead_pid()} 12345\n")
    reused = _make(tmp_path, "muxserve-reused", f"{me} 1\n")  # our pid, another start time: a reused pid
    live = _make(tmp_path, "muxserve-live", f"{me} {_start_time(me)}\n")
    foreign = _make(tmp_path, "muxserve-foreign", None)  # no owner file: not an instance directory
    other = _make(tmp_path, "other-dead", f"{_dead_pid()} 1\n")
    assert sorted(remove_stale_run_dirs(tmp_path)) == sorted([dead, reused])
    assert not dead.exists() and not reused.exists()
    assert live.exists() and foreign.exists() and other.exists()
    assert owner_alive(live) and not owner_alive(foreign)


def test_a_new_instance_directory_is_private_owned_and_sweeps_stale_ones():
    stale = Path(tempfile.mkdtemp(prefix="muxserve-"))
    (stale / "owner").write_text(f"{_dead_pid()} 1\n")
    path = create_run_dir()
    try:
        assert not stale.exists()  # left by an instance that was killed: removed by the next start
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
        assert (path / "owner").read_text() == f"{os.getpid()} {_start_time(os.getpid())}\n"
        assert owner_alive(path)
    finally:
        shutil.rmtree(path)
        shutil.rmtree(stale, ignore_errors=True)
