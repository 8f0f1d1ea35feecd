"""Child processes of one instance: start them, notice a death, stop them.

Every child learns the launcher's pid (``MUXSERVE_PARENT_PID``) and asks the kernel for a signal
when its parent dies (``utils.exit_with_parent``), so even a SIGKILLed launcher leaves no orphan.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from muxserve.ipc.process import PARENT_PID_ENV, describe_exit

logger = logging.getLogger(__name__)


class ChildDied(RuntimeError):
    """A child process of the instance exited while it was needed."""

    def __init__(self, name: str, code: int, log: Path | None):
        where = f"; its log: {log}" if log else ""
        super().__init__(f"process {name} {describe_exit(code)}{where}")
        self.name = name
        self.code = code


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path | None


class ProcessGroup:
    def __init__(self, log_dir: Path | None):
        self.log_dir = log_dir
        self.children: list[Child] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Child:
        """Start ``python ARGS`` as ``name`` (its log: LOG_DIR/name.log), with ``env`` added to ours."""
        log = None
        out = subprocess.DEVNULL
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log = self.log_dir / f"{name.replace('/', '_')}.log"
            out = open(log, "ab")
        try:
            proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {}), PARENT_PID_ENV: str(os.getpid())})
        finally:
            if log is not None:
                out.close()
        child = Child(name, proc, log)
        self.children.append(child)
        logger.info("started %s (pid %d)", name, proc.pid)
        return child

    def exited(self) -> list[Child]:
        """The children that have exited (still listed until ``stop`` removes them)."""
        return [child for child in self.children if child.proc.poll() is not None]

    def check(self) -> None:
        """Raise ChildDied if any child has exited."""
        for child in self.exited():
            raise ChildDied(child.name, child.proc.returncode, child.log)

    def stop(self, children: list[Child], timeout_s: float = 10.0) -> None:
        """SIGTERM each of ``children`` still running, SIGKILL the ones that do not exit in time; forget them."""
        for child in children:
            if child.proc.poll() is None:
                child.proc.terminate()
        for child in children:
            try:
                child.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %.0f s; killing it", child.name, timeout_s)
                child.proc.kill()
                child.proc.wait()
        self.children = [c for c in self.children if c not in children]

    def stop_all(self, timeout_s: float = 10.0) -> None:
        """Stop every child."""
        self.stop(list(self.children), timeout_s)
