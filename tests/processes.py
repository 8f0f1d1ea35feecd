"""Process helpers of the fault tests: find an instance's processes, wait, and check that nothing is left."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def find_process(root: int, *words: str) -> int | None:
    """The live descendant of ``root`` whose command line holds every one of ``words``."""
    found = [p for p in descendants(root) if alive(p) and all(w in cmdline(p) for w in words)]
    assert len(found) <= 1, found
    return found[0] if found else None


def runtime_pid(root: int, llm: str, phase: str, rank: int | None = None) -> int | None:
    words = [f"--llm {llm} --phase {phase} "] + ([f"--tp-rank {rank}"] if rank is not None else [])
    return find_process(root, *words)


def flexstore_pid(root: int) -> int | None:
    return find_process(root, "-m muxserve.flexstore ")


def run_dirs_of(pid: int) -> list[Path]:
    """The instance directories whose owner file names ``pid``."""
    out = []
    for path in Path(tempfile.gettempdir()).glob("muxserve-*"):
        try:
            if (path / "owner").read_text().split()[0] == str(pid):
                out.append(path)
        except (OSError, IndexError):
            continue
    return out


def shm_segments(prefix: str) -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(prefix)}


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def assert_nothing_left(pid: int, children: set[int], timeout: float = 10.0) -> None:
    """No process of the instance of ``pid`` alive, no shared-memory segment, no instance directory."""
    wait_until(lambda: not any(alive(c) for c in children) and not shm_segments(f"muxserve{pid}-")
               and not run_dirs_of(pid), timeout)
    assert [c for c in children if alive(c)] == []
    assert shm_segments(f"muxserve{pid}-") == set()
    assert run_dirs_of(pid) == []


def stale_leftovers(since: float) -> list[str]:
    """Instance directories and shared-memory segments made since ``since`` whose owner process is gone."""
    out = []
    for path in Path(tempfile.gettempdir()).glob("muxserve-*"):
        try:
            pid = int((path / "owner").read_text().split()[0])
            made = path.stat().st_mtime
        except (OSError, ValueError, IndexError):
            continue
        if made >= since and not alive(pid):
            out.append(str(path))
    for path in Path("/dev/shm").glob("muxserve*-*"):
        head = path.name.split("-")[0].removeprefix("muxserve")
        try:
            made = path.stat().st_mtime
        except OSError:
            continue
        if head.isdigit() and made >= since and not alive(int(head)) and int(head) != os.getpid():
            out.append(str(path))
    return sorted(out)
