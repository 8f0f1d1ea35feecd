"""Node-side process helpers: free ports, a child in its own process group that dies with its
parent, and stopping that whole group."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_guarded(args: list[str], log: Path, env: dict[str, str], cwd: str) -> subprocess.Popen:
    """Start ``args`` in a new process group, output appended to ``log``.

    The child runs through ``muxserve.cluster.guard``, which asks the kernel to SIGKILL it when
    this thread's process dies: a killed Ray actor then leaves no instance behind (the instance's
    own children follow their parent the same way)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "muxserve.cluster.guard", str(os.getpid()), "--", *args],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                start_new_session=True)


def kill_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """End whatever is left of the child's process group (its leader may be gone already):
    SIGTERM first, so that FlexStore unlinks its shared memory and its resource tracker sees it
    exit, then SIGKILL for what is still there after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        if sig == signal.SIGTERM and wait_group_gone(proc.pid, grace_s):
            return


def stop_group(proc: subprocess.Popen, sig: int, timeout_s: float) -> int:
    """Send ``sig`` to the child, wait up to ``timeout_s`` for it, then end its whole group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    kill_group(proc)
    return proc.wait()


def wait_group_gone(pgid: int, timeout_s: float = 10.0) -> bool:
    """True once no process of group ``pgid`` is left (checked through /proc)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not group_members(pgid):
            return True
        time.sleep(0.1)
    return False


def group_members(pgid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(entry.name))
    return out


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])
