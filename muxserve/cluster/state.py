"""The state file of a running cluster: how ``muxserve cluster down`` and ``status`` find the
``cluster up`` process and its front door (one file per cluster name, on the machine that runs it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from muxserve.errors import ClusterError


def state_dir() -> Path:
    base = os.environ.get("MUXSERVE_CLUSTER_DIR")
    if base:
        return Path(base)
    return Path(os.environ.get("MUXSERVE_CACHE", "~/.cache/muxserve")).expanduser() / "cluster"


def state_path(name: str) -> Path:
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ClusterError(f"--name {name!r}: use letters, digits, '-', '_' or '.'")
    return state_dir() / f"{name}.json"


def write_state(name: str, doc: dict) -> Path:
    path = state_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)
    return path


def read_state(name: str) -> dict | None:
    path = state_path(name)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise ClusterError(f"state file {path} is not valid JSON; remove it") from None


def remove_state(name: str, pid: int) -> None:
    """Remove the state file if it is still ours (``pid`` wrote it)."""
    path = state_path(name)
    try:
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()
    except (OSError, ValueError):
        pass


def process_alive(pid: int) -> bool:
    """True if ``pid`` runs and is a ``cluster up`` (not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and b"cluster" in b" ".join(cmdline)
