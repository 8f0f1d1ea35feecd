"""Small process helpers shared by the launcher and its children."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
PARENT_PID_ENV = "MUXSERVE_PARENT_PID"  # set by the launcher for every child it starts


def expected_parent() -> int:
    """The pid of the process that started this one: the launcher's word when it gave it, else getppid()."""
    value = os.environ.get(PARENT_PID_ENV, "")
    return int(value) if value.isdigit() else os.getppid()


def exit_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux only).

    A launcher killed with SIGKILL then leaves no orphaned child behind. The parent may have died
    before the request was made (while this interpreter started): then ``sig`` comes now.
    Note: the kernel sends it when the *thread* that started this process exits.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != expected_parent():
        os.kill(os.getpid(), sig)


def signal_name(code: int) -> str:
    """``-9`` -> ``SIGKILL``; empty for a code that is not a signal."""
    if code >= 0:
        return ""
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def describe_exit(code: int) -> str:
    """How a child ended, from its ``Popen.returncode``: ``exited with code 1`` / ``... -9 (SIGKILL)``."""
    name = signal_name(code)
    return f"exited with code {code}" + (f" ({name})" if name else "")
