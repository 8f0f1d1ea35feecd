"""The private directory of one instance: its ipc sockets and rendezvous files.

``/tmp/muxserve-XXXXXXXX`` (``tempfile.mkdtemp``: mode 0700, so no other user can reach a socket
inside) with an ``owner`` file naming the process that made it (pid and start time). It is removed
when the instance stops; a directory whose owner died without removing it (SIGKILL) is removed by
the next instance that starts, and by the FlexStore of the dead owner as it exits.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

PREFIX = "muxserve-"
OWNER_FILE = "owner"


def _start_time(pid: int) -> str | None:
    """The start time of ``pid`` (clock ticks since boot, /proc/PID/stat field 22); None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]


def create_run_dir() -> Path:
    """A new private directory owned by this process (after removing the stale ones)."""
    remove_stale_run_dirs()
    path = Path(tempfile.mkdtemp(prefix=PREFIX))
    (path / OWNER_FILE).write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
    return path


def owner_of(path: Path) -> tuple[int, str] | None:
    """(pid, start time) from a run directory's owner file; None when it has none (not ours)."""
    try:
        pid, start = (path / OWNER_FILE).read_text().split()
        return int(pid), start
    except (OSError, ValueError):
        return None


def owner_alive(path: Path) -> bool:
    owner = owner_of(path)
    return owner is not None and _start_time(owner[0]) == owner[1]


def remove_stale_run_dirs(root: Path | None = None) -> list[Path]:
    """Remove this user's run directories whose owner process is gone; returns them.

    Only directories with an owner file are touched: anything else named ``muxserve-*`` is left.
    """
    removed = []
    for path in Path(root or tempfile.gettempdir()).glob(f"{PREFIX}*"):
        try:
            if not path.is_dir() or path.is_symlink() or path.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        if owner_of(path) is None or owner_alive(path):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        logger.info("removed %s, left by a stopped instance", path)
    return removed

