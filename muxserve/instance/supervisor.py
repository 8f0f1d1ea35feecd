"""The runtimes of one instance, one group per (LLM, phase): readiness, death, restart, failure.

A group is the runtime processes of one (LLM, phase): one per tensor-parallel rank. When any of
them dies the whole group is stopped and started again after a back-off (``backoff_s``, doubling)
— at most ``max_restarts`` times in a row; a group that then served for ``stable_s`` has a clean
slate again. Past that its LLM fails. The Instance turns the events returned here into
scheduler calls; this module never touches requests.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from muxserve.instance.processes import Child, ProcessGroup
from muxserve.ipc import runtime as M
from muxserve.ipc.process import describe_exit
from muxserve.ipc.runtime import Phase

logger = logging.getLogger(__name__)


class RuntimeState(enum.Enum):
    STARTING = "starting"  # processes started, not every rank ready yet
    READY = "ready"
    BACKOFF = "backoff"  # died; starts again at ``restart_at``
    FAILED = "failed"  # restarts exhausted (or its LLM failed): never runs again


class RestartPolicy(msgspec.Struct, frozen=True):
    """What a dead runtime gets: ``max_restarts`` restarts in a row before its LLM fails (0: the first
    death fails it), ``backoff_s`` before the first (doubling with each further one); a group that
    served ``stable_s`` since its last start counts restarts from 0 again."""

    max_restarts: int = 3
    backoff_s: float = 0.5
    stable_s: float = 60.0


@dataclass
class RuntimeGroup:
    llm: str
    phase: Phase
    size: int  # processes: one per tensor-parallel rank
    state: RuntimeState = RuntimeState.STARTING
    children: list[Child] = field(default_factory=list)
    ready: set[int] = field(default_factory=set)  # pids that said Ready
    starts: int = 0  # incarnations so far
    restarts: int = 0  # restarts in a row
    ready_since: float | None = None
    restart_at: float = 0.0

    @property
    def key(self) -> tuple[str, Phase]:
        return self.llm, self.phase

    @property
    def name(self) -> str:
        return f"{self.llm}/{self.phase.value}"


@dataclass(frozen=True)
class Lost:
    """A group died and will be started again."""

    group: RuntimeGroup


@dataclass(frozen=True)
class Restored:
    """A restarted group is ready again."""

    group: RuntimeGroup


@dataclass(frozen=True)
class Failed:
    """A group died once too often: its LLM fails with ``message``."""

    group: RuntimeGroup
    message: str


Event = Lost | Restored | Failed
Spawn = Callable[[RuntimeGroup], list[Child]]  # starts one incarnation of a group (uses group.starts)


class Supervisor:
    def __init__(self, processes: ProcessGroup, spawn: Spawn, policy: RestartPolicy,
                 clock: Callable[[], float] = time.monotonic):
        self.processes = processes
        self.spawn = spawn
        self.policy = policy
        self.clock = clock
        self.groups: dict[tuple[str, Phase], RuntimeGroup] = {}
        self._failures: dict[str, str] = {}  # process name -> its last Failure message

    def add(self, llm: str, phase: Phase, size: int) -> RuntimeGroup:
        group = self.groups[(llm, phase)] = RuntimeGroup(llm, phase, size)
        self._start(group)
        return group

    def _start(self, group: RuntimeGroup) -> None:
        group.state, group.ready, group.ready_since = RuntimeState.STARTING, set(), None
        group.starts += 1
        group.children = self.spawn(group)

    # -- messages from runtimes -------------------------------------------------------------------
    def on_ready(self, msg: M.Ready) -> Event | None:
        """A rank said Ready; ``Restored`` when that completes a restarted group."""
        group = self._group_of(msg.pid)
        if group is None or group.state is not RuntimeState.STARTING:
            return None  # a process that has died since (its message was still queued)
        group.ready.add(msg.pid)
        if len(group.ready) < group.size:
            return None
        group.state, group.ready_since = RuntimeState.READY, self.clock()
        if group.starts > 1:
            logger.info("runtime %s is back (restart %d)", group.name, group.restarts)
            return Restored(group)
        return None

    def on_failure(self, msg: M.Failure) -> None:
        """A rank reports the error it is about to die of: kept for the message of its death."""
        self._failures[msg.runtime] = msg.message
        logger.error("runtime %s failed: %s", msg.runtime, msg.message)

    def _group_of(self, pid: int) -> RuntimeGroup | None:
        return next((g for g in self.groups.values() for c in g.children if c.proc.pid == pid), None)

    # -- deaths and restarts ----------------------------------------------------------------------
    def check(self) -> list[Event]:
        """Notice dead processes (each costs its group a restart) and start the groups whose back-off is over."""
        events: list[Event] = []
        for group in self.groups.values():
            dead = [c for c in group.children if c.proc.poll() is not None]
            if dead:
                events.append(self.lose(group, "; ".join(map(self._death, dead))))
        now = self.clock()
        for group in self.groups.values():
            if group.state is RuntimeState.BACKOFF and now >= group.restart_at:
                logger.info("restarting runtime %s (restart %d of at most %d)", group.name, group.restarts,
                            self.policy.max_restarts)
                self._start(group)
        return events

    def _death(self, child: Child) -> str:
        """``llm-1/decode exited with code -9 (SIGKILL)``, plus the error it reported, if any."""
        death = f"{child.name} {describe_exit(child.proc.returncode)}"
        message = self._failures.pop(child.name, None)
        return f"{death}: {message}" if message else death

    def lose(self, group: RuntimeGroup, death: str) -> Event:
        """``group`` is dead (a process died, or it cannot be reached): stop what is left of it."""
        now = self.clock()
        logger.error("runtime %s", death)
        self.processes.stop(group.children, timeout_s=5.0)
        for child in group.children:  # what the stopped ranks reported belongs to this death
            self._failures.pop(child.name, None)
        group.children = []
        if group.ready_since is not None and now - group.ready_since >= self.policy.stable_s:
            group.restarts = 0
        group.restarts += 1
        if group.restarts > self.policy.max_restarts:
            group.state = RuntimeState.FAILED
            return Failed(group, f"LLM {group.llm!r} failed: runtime {death}; {self._why_not_restarted()}")
        group.state = RuntimeState.BACKOFF
        group.restart_at = now + self.policy.backoff_s * 2 ** (group.restarts - 1)
        return Lost(group)

    def _why_not_restarted(self) -> str:
        n = self.policy.max_restarts
        if n == 0:
            return "runtimes are not restarted (--max-runtime-restarts 0)"
        return f"{n} restart{'s' if n > 1 else ''} did not bring it back"

    def retire(self, llm: str) -> None:
        """Stop every group of ``llm`` for good (the LLM failed)."""
        for group in self.groups.values():
            if group.llm == llm:
                self.processes.stop(group.children, timeout_s=5.0)
                group.children, group.state = [], RuntimeState.FAILED

    def next_restart_in(self) -> float | None:
        """Seconds until the next pending restart, if any."""
        pending = [g.restart_at for g in self.groups.values() if g.state is RuntimeState.BACKOFF]
        return max(0.0, min(pending) - self.clock()) if pending else None
