"""Elastic residency in the instance: offload and wake through FlexStore, notices to the runtimes, a policy.

* **Wake on demand.** Each poll, an offloaded LLM with a waiting request is woken before the
  scheduler runs: FlexStore maps its weights and copies them in from the host copy, taking memory
  from free budget, then whole free KV granules, then other LLMs' newest requests (never those
  inside in-flight jobs). Those go back to the head of their queues and are recomputed. A wake
  that cannot find room now (everything is in flight) is tried again at the next poll.
* **Make room (LRU).** With ``weight_granules`` known, a wake first checks the budget: when free
  granules plus whole free KV granules do not hold the LLM's weights, or the granules no weights
  hold would not keep ``kv_headroom`` for KV after it, idle elastic LLMs (no request waiting,
  running or holding pages, resident at least ``min_resident_s``) are offloaded, least recently
  used first, until they do; so a wake offloads idle LLMs before it preempts busy ones, and a
  wake that would leave no KV at all waits (until an LLM goes idle) instead of stalling everyone.
  A wake FlexStore still refuses offloads the next idle LLM and is tried again. An LLM with
  requests is never offloaded. This is what lets an instance hold more elastic LLMs than fit
  (``memory_budget_bytes``): those that do not fit start offloaded (``offloaded``).
* **Offload by policy.** A :class:`ResidencyPolicy` names the elastic LLMs to offload; the one
  given here, :class:`IdleTimeout`, offloads an LLM idle (no request waiting, running or holding
  pages) for ``idle_s`` that has been resident at least ``min_resident_s`` (against thrash). A
  fuller policy (offload the least recently used when memory is needed) plugs in the same way.
* **Notices.** After an offload or a wake every runtime gets a ``Sync`` (follow FlexStore's ranges
  now: on a GPU, memory unmapped by FlexStore returns to the device only once every process has
  unmapped it) and answers ``Synced``; jobs also carry the epochs, so a runtime is never behind.

Every offload and wake is recorded (:class:`ResidencyEvent`) for the instance's statistics.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from muxserve.flexstore import FlexStoreError
from muxserve.ipc import runtime as M
from muxserve.ipc.runtime import Phase

logger = logging.getLogger(__name__)
RETRY_S = 1.0  # a wake that failed (not merely deferred) is tried again after this long


def kv_pages(stats, page_bytes: int) -> int:
    """Pages for KV with every LLM resident (FlexStore's ``Stats``): the pool, or under a memory budget
    the granules no weights hold (the budget's page ids span the weights' granules too)."""
    budget = stats.budget
    if budget is None:
        return stats.num_pages
    return (budget.free_granules + budget.kv_granules) * budget.granule_bytes // page_bytes


@dataclass(frozen=True)
class ResidencyEvent:
    """One offload or wake. ``at``: time.monotonic() when it ended; ``waited``: (wake) how long the
    oldest request that asked for it had waited when it was done."""

    llm: str
    kind: str  # "offload" or "wake"
    at: float
    seconds: float  # FlexStore's time for it (wake: mapping + copy + preemption)
    nbytes: int  # device memory given back (offload) or weights copied in (wake)
    copy_seconds: float = 0.0
    preempted: int = 0  # other LLMs' requests the wake preempted
    waited: float = 0.0

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class WakeDeferred(RuntimeError):
    """A wake found no room now (the memory it needs is inside in-flight jobs); ``numbers`` say why."""

    def __init__(self, message: str, numbers: dict[str, int]):
        super().__init__(message)
        self.numbers = numbers


@dataclass(frozen=True)
class LLMActivity:
    """What a policy sees of one elastic LLM."""

    name: str
    resident: bool
    idle: bool  # no request waiting, running or holding pages
    idle_for: float  # seconds since it was last busy (0 when busy)
    resident_for: float  # seconds since its last wake (or start)


class ResidencyPolicy(Protocol):
    def to_offload(self, llms: list[LLMActivity], now: float) -> list[str]:
        """Which resident, idle elastic LLMs to offload now."""


@dataclass(frozen=True)
class IdleTimeout:
    """Offload an elastic LLM idle for ``idle_s`` and resident for at least ``min_resident_s``."""

    idle_s: float
    min_resident_s: float = 0.0

    def to_offload(self, llms: list[LLMActivity], now: float) -> list[str]:
        return [a.name for a in llms if a.resident and a.idle and a.idle_for >= self.idle_s
                and a.resident_for >= self.min_resident_s]


@dataclass
class _Elastic:
    since: float  # of the current residency (start or last wake)
    last_busy: float
    resident: bool = True


class ResidencyControl:
    """The residency part of an Instance: offload / wake of its elastic LLMs (see the module docstring).

    ``scheduler``: the MuxScheduler (its ``ResidencyTracking``); ``client``: a FlexStore client;
    ``links``: the job links of every (LLM, phase) runtime; ``policy``: None offloads only on request.
    """

    def __init__(self, elastic: list[str], scheduler, client, links: dict[tuple[str, Phase], object],
                 policy: ResidencyPolicy | None = None, clock: Callable[[], float] = time.monotonic,
                 offloaded: Iterable[str] = (), weight_granules: dict[str, int] | None = None,
                 min_resident_s: float = 0.0, kv_headroom: int = 0):
        now = clock()
        offloaded = set(offloaded)
        self.elastic = {name: _Elastic(now, now, name not in offloaded) for name in elastic}
        self.weight_granules = weight_granules  # per LLM: granules its weights take (None: no make_room)
        self.min_resident_s = min_resident_s
        self.kv_headroom = kv_headroom  # granules of KV a wake leaves for the resident LLMs (make_room)
        self.scheduler = scheduler
        self.client = client
        self.links = links
        self.policy = policy
        self.clock = clock
        self.events: list[ResidencyEvent] = []
        self._notices = itertools.count(1)
        self.unacknowledged: dict[int, set[str]] = {}  # notice id -> runtimes that have not answered
        self.deferred = 0  # wakes put off for want of memory outside in-flight jobs
        self._retry_at: dict[str, float] = {}  # LLM -> when a failed wake may be tried again

    # -- the two moves ----------------------------------------------------------------------
    def offload(self, llm: str) -> ResidencyEvent:
        """Offload ``llm`` now; ValueError if it is not elastic, resident and idle."""
        state = self._elastic(llm)
        if not state.resident:
            raise ValueError(f"{llm!r} is already offloaded")
        if not self.scheduler.is_idle(llm):
            raise ValueError(f"{llm!r} has requests waiting, running or holding pages: it is not offloaded")
        self.scheduler.set_offloaded(llm)
        try:
            reply = self.client.offload(llm)
        except BaseException:
            self.scheduler.set_resident(llm)
            raise
        state.resident = False
        self._notify(M.Sync(0, weights_epoch=reply.weights_epoch), [llm])
        event = ResidencyEvent(llm, "offload", self.clock(), reply.seconds, reply.freed_bytes)
        self.events.append(event)
        logger.info("offloaded %s in %.1f ms (%.1f MiB back to the budget)", llm, reply.seconds * 1e3,
                    reply.freed_bytes / 2**20)
        return event

    def wake(self, llm: str) -> ResidencyEvent:
        """Wake ``llm`` now; its waiting requests are scheduled from the next poll on. Raises
        :class:`WakeDeferred` when the memory it needs is inside in-flight jobs (try again later)."""
        state = self._elastic(llm)
        if state.resident:
            raise ValueError(f"{llm!r} is resident already")
        logger.info("waking %s (%d requests waiting)", llm, len(self.scheduler.llms[llm].waiting))
        try:
            reply = self.client.wake(llm, self.scheduler.protected())
        except FlexStoreError as exc:
            if exc.code == "refused":
                self.deferred += 1
                raise WakeDeferred(exc.message, exc.numbers) from None
            raise
        requeued = self.scheduler.requeue_preempted(reply.preempted)
        self.scheduler.set_resident(llm, reply.weights_epoch)
        now = self.clock()
        state.resident, state.since, state.last_busy = True, now, now
        self._notify(M.Sync(0, kv_epoch=reply.kv_epoch, weights_epoch=reply.weights_epoch), [llm])
        self._notify(M.Sync(0, kv_epoch=reply.kv_epoch), sorted(self.links_llms() - {llm}))
        waiting = self.scheduler.llms[llm].waiting
        waited = now - waiting[0].arrival if waiting else 0.0
        event = ResidencyEvent(llm, "wake", now, reply.seconds, reply.nbytes, reply.copy_seconds, len(requeued),
                               waited)
        self.events.append(event)
        logger.info("woke %s in %.1f ms (copy %.1f ms of %.1f MiB); %d requests of other LLMs preempted", llm,
                    reply.seconds * 1e3, reply.copy_seconds * 1e3, reply.nbytes / 2**20, len(requeued))
        return event

    # -- each poll --------------------------------------------------------------------------
    def tick(self) -> None:
        """Wake offloaded LLMs that have waiting requests; offload what the policy names."""
        now = self.clock()
        for name, state in self.elastic.items():
            if not self.scheduler.is_idle(name):
                state.last_busy = now
        for llm in self.scheduler.to_wake():
            if now < self._retry_at.get(llm, 0.0):
                continue
            try:
                self.wake_making_room(llm)
            except WakeDeferred as exc:
                logger.debug("wake of %s deferred: %s", llm, exc)
            except FlexStoreError as exc:  # FlexStore could not map or copy (it gave the memory back): later
                self._retry_at[llm] = now + RETRY_S
                logger.error("waking %s failed (%s: %s); trying again in %.0f s", llm, exc.code, exc.message,
                             RETRY_S)
        if self.policy is None:
            return
        for llm in self.policy.to_offload(self.activity(now), now):
            if llm in self.elastic and self.elastic[llm].resident and self.scheduler.is_idle(llm):
                self.offload(llm)

    def lru_idle(self, exclude: str = "", now: float | None = None) -> list[str]:
        """Resident elastic LLMs that may be offloaded to make room: idle (nothing waiting, running or
        holding pages), resident at least ``min_resident_s``; least recently used first."""
        now = self.clock() if now is None else now
        out = [(max(s.last_busy, s.since), name) for name, s in self.elastic.items()
               if name != exclude and s.resident and self.scheduler.is_idle(name)
               and now - s.since >= self.min_resident_s]
        return [name for _, name in sorted(out)]

    def make_room(self, llm: str) -> list[ResidencyEvent]:
        """Offload idle elastic LLMs, least recently used first, until (a) the granules no weights hold
        cover ``llm``'s weights plus ``kv_headroom`` (so the LLMs resident after the wake still have
        KV to run on) and (b) the budget's free and whole free KV granules cover its weights (so the
        wake preempts nobody). Returns the offloads; raises :class:`WakeDeferred` when (a) cannot be
        met now (every other resident LLM has requests): waking would leave no KV for anyone."""
        if not self.weight_granules:
            return []
        budget = self.client.stats().budget
        if budget is None:
            return []
        weights = self.weight_granules.get(llm, 0)
        unheld = budget.num_granules - budget.pinned_granules - budget.elastic_granules
        short_total = weights + self.kv_headroom - unheld
        short_now = weights - budget.free_granules - budget.kv_whole_free
        events = []
        for victim in self.lru_idle(exclude=llm):
            if short_total <= 0 and short_now <= 0:
                break
            logger.info("making room for %s: offloading %s (idle, least recently used)", llm, victim)
            events.append(self.offload(victim))
            short_total -= self.weight_granules.get(victim, 0)
            short_now -= self.weight_granules.get(victim, 0)
        if short_total > 0:
            self.deferred += 1
            raise WakeDeferred(f"cannot wake {llm!r} yet: its weights ({weights} granules) and {self.kv_headroom} "
                               f"granules of KV need {short_total} more granules than the budget's "
                               f"{budget.num_granules} less the weights held, and no idle LLM is left to offload",
                               {"needed": weights + self.kv_headroom, "unheld": unheld, "short": short_total})
        return events

    def wake_making_room(self, llm: str) -> ResidencyEvent:
        """Wake ``llm``, offloading idle elastic LLMs least recently used first when the budget is
        short (:meth:`make_room`, then again for as long as FlexStore refuses for want of room)."""
        if self._elastic(llm).resident:
            raise ValueError(f"{llm!r} is resident already")
        self.make_room(llm)
        return self._wake_offloading_lru(llm)

    def _wake_offloading_lru(self, llm: str) -> ResidencyEvent:
        """Wake ``llm``; while FlexStore refuses for want of room, offload the least recently used idle
        elastic LLM and try again (WakeDeferred once none is left)."""
        while True:
            try:
                return self.wake(llm)
            except WakeDeferred:
                victims = self.lru_idle(exclude=llm)
                if not victims:
                    raise
                logger.info("wake of %s refused for room: offloading %s (idle, least recently used)", llm,
                            victims[0])
                self.offload(victims[0])

    def activity(self, now: float | None = None) -> list[LLMActivity]:
        now = self.clock() if now is None else now
        out = []
        for name, s in self.elastic.items():
            idle = self.scheduler.is_idle(name)
            out.append(LLMActivity(name, s.resident, idle, now - s.last_busy if idle else 0.0, now - s.since))
        return out

    def on_synced(self, msg: M.Synced) -> None:
        waiting = self.unacknowledged.get(msg.notice_id)
        if waiting is None:
            return
        waiting.discard(msg.runtime)
        if not waiting:
            del self.unacknowledged[msg.notice_id]

    def summary(self) -> dict[str, dict[str, float]]:
        """Per elastic LLM: offloads, wakes and their mean and longest durations (ms)."""
        out = {}
        for name in self.elastic:
            row: dict[str, float] = {}
            for kind in ("offload", "wake"):
                secs = [e.seconds for e in self.events if e.llm == name and e.kind == kind]
                row[f"{kind}s"] = len(secs)
                row[f"{kind}_ms_mean"] = 1e3 * sum(secs) / len(secs) if secs else 0.0
                row[f"{kind}_ms_max"] = 1e3 * max(secs) if secs else 0.0
            row["wake_preempted"] = sum(e.preempted for e in self.events if e.llm == name and e.kind == "wake")
            out[name] = row
        return out

    # -- helpers ----------------------------------------------------------------------------
    def links_llms(self) -> set[str]:
        return {llm for llm, _ in self.links}

    def _notify(self, notice: M.Sync, llms: list[str]) -> None:
        notice_id = next(self._notices)
        notice = M.Sync(notice_id, notice.kv_epoch, notice.weights_epoch)
        runtimes = set()
        for (llm, phase), link in self.links.items():
            if llm in llms and (llm, phase) not in self.scheduler.down:
                link.send(notice)
                runtimes.add(f"{llm}/{phase.value}")
        if runtimes:
            self.unacknowledged[notice_id] = runtimes

    def _elastic(self, llm: str) -> _Elastic:
        try:
            return self.elastic[llm]
        except KeyError:
            raise ValueError(f"{llm!r} is not an elastic LLM (residency: elastic in the config); elastic: "
                             f"{sorted(self.elastic)}") from None


__all__ = ["IdleTimeout", "LLMActivity", "ResidencyControl", "ResidencyEvent", "ResidencyPolicy", "WakeDeferred",
           "kv_pages"]
