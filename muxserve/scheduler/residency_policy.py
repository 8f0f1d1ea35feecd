"""Which LLMs hold their weights on the device: the residency policy of elastic memory.

Pure decisions on a clock passed in (no I/O, no time source of its own). The scheduler keeps a
:class:`ResidencyTracker` up to date with its events (arrival, admission, finish, wake done,
offload done), and asks a policy for a :class:`Decision` whenever something changed or the
decision's ``next_check`` time has come::

    decision = policy.decide(now, tracker.snapshot(), MemoryView(budget, free, kv_demand))

and carries it out in this order: every ``offload`` (FlexStore ``Offload(model)``), then, once
those and any offload in progress have finished, every ``wake`` (FlexStore
``Wake(model, protected)``). ``refused`` wakes are answered with an error to the LLM's waiting
requests; ``deferred`` wakes are asked again at ``retry_at`` or at the next event. ``drain`` names
LLMs whose waiting requests must not be admitted now (the swap baseline stops the resident LLM
to hand the device over).

:class:`LRUPolicy` (elastic residency):

* the first request of an offloaded LLM wakes it; wakes go in order of each LLM's oldest
  waiting request; a wake needs room for the weights *and* the KV of that request
  (``wake_kv_bytes``): so the weights held never leave less than one request's KV, and resident
  LLMs whose requests all wait (none in flight, none offloadable) cannot lock each other out;
* a wake takes free budget first, then bytes of offloads in progress, then offloads idle LLMs,
  least recently used first; an LLM with requests waiting or in flight is never offloaded, nor
  one resident for less than ``min_resident_s`` (no thrash), nor a pinned one;
* a wake that cannot be made now is *deferred* (``NO_ROOM``, with the LLMs in the way and when
  a protection ends); the wakes of younger waiters wait behind it (``BEHIND``), as a smaller LLM
  taking the free bytes could otherwise starve the oldest waiter for good;
* a wake of an LLM whose weights exceed the budget less the pinned weights is *refused*
  (:class:`WakeRefusal`, with the numbers), as no offload can ever make room;
* busy LLMs' KV demand beyond the free bytes (after the wakes) offloads more idle LLMs, LRU first;
* with ``offload_on_timeout``, an LLM idle (nothing waiting or in flight) for ``idle_timeout_s``
  and resident for ``min_resident_s`` is offloaded even without memory pressure.

:class:`SwapPolicy` (the benchmark baseline of one engine per model behind a swapping router,
as llama-swap): one LLM resident per mesh, holding the whole budget; the device goes to the LLM
of the oldest waiting request once the resident LLM has no request in flight and has held it
for ``min_hold_s``; until then the resident LLM is drained (its waiting requests, younger than
the oldest one, wait). Unlike the LRU policy it offloads an LLM whose requests wait: that is the
baseline's behaviour; it never offloads one with requests in flight.

:func:`kv_quota_inputs` turns weights + KV of one budget into the inputs of the ADBS quota
(``QuotaManager``): the KV pages left once the weights held are counted, shared by resident LLMs.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from muxserve.flexstore.residency import WeightState

__all__ = ["Decision", "DeferReason", "DeferredWake", "LLMActivity", "LRUPolicy", "MemoryView", "Offload",
           "OffloadReason", "QuotaInputs", "RefusalReason", "RESIDENCY_POLICIES", "ResidencyPolicy", "ResidencyTracker",
           "SwapPolicy", "Wake", "WakeRefusal", "WeightState", "held_bytes", "kv_quota_inputs", "make_policy"]

HELD = (WeightState.RESIDENT, WeightState.WAKING, WeightState.OFFLOADING)  # states whose weights take budget


@dataclass(frozen=True)
class LLMActivity:
    """What the policy knows of one LLM at one instant."""

    name: str
    weight_bytes: int  # its weights on this device (one rank's shard under tensor parallelism)
    state: WeightState = WeightState.RESIDENT
    waiting: int = 0  # requests queued, not admitted
    running: int = 0  # requests admitted (in a job or holding pages)
    last_active: float = 0.0  # last arrival, admission or finish
    resident_since: float = 0.0  # when it last became resident (start or wake done)
    oldest_wait: float | None = None  # arrival time of its oldest waiting request
    pinned: bool = False  # never offloaded
    wake_kv_bytes: int = 0  # KV its oldest waiting request needs to be admitted (prompt x KV bytes per token)

    @property
    def wake_bytes(self) -> int:
        """What a wake must find: the weights and room for the first request."""
        return self.weight_bytes + self.wake_kv_bytes

    @property
    def busy(self) -> bool:
        return self.waiting > 0 or self.running > 0

    @property
    def held(self) -> bool:
        return self.state in HELD


@dataclass(frozen=True)
class MemoryView:
    """The device budget as the policy sees it (bytes)."""

    budget_bytes: int  # weights + KV may use this much
    free_bytes: int  # held by neither weights nor mapped KV
    kv_demand_bytes: int = 0  # KV that resident busy LLMs want now beyond what they hold


class OffloadReason(str, enum.Enum):
    IDLE_TIMEOUT = "idle_timeout"  # idle for idle_timeout_s
    WAKE = "wake"  # makes room for a wake
    KV = "kv"  # makes room for busy LLMs' KV
    SWAP = "swap"  # the swap baseline hands the device to another LLM


class RefusalReason(str, enum.Enum):
    TOO_BIG = "too_big"  # weights exceed the budget less the pinned weights


class DeferReason(str, enum.Enum):
    NO_ROOM = "no_room"  # idle LLMs cannot free enough now (busy ones or within min_resident_s)
    BEHIND = "behind"  # an older waiter is deferred; this wake waits its turn
    HOLD = "hold"  # swap: the resident LLM has requests in flight or holds the device for min_hold_s


@dataclass(frozen=True)
class Offload:
    llm: str
    bytes: int
    reason: OffloadReason
    for_llm: str | None = None  # the LLM whose wake it makes room for


@dataclass(frozen=True)
class Wake:
    llm: str
    bytes: int


@dataclass(frozen=True)
class WakeRefusal:
    llm: str
    reason: RefusalReason
    needed_bytes: int
    budget_bytes: int
    pinned_bytes: int
    message: str


@dataclass(frozen=True)
class DeferredWake:
    llm: str
    reason: DeferReason
    needed_bytes: int
    available_bytes: int  # free + in-progress offloads + what offloadable idle LLMs would free
    blocked_by: tuple[str, ...] = ()  # LLMs that hold memory and may not be offloaded now
    retry_at: float | None = None  # when a min_resident_s / min_hold_s protection ends, if that helps


@dataclass(frozen=True)
class Decision:
    offload: tuple[Offload, ...] = ()
    wake: tuple[Wake, ...] = ()
    refused: tuple[WakeRefusal, ...] = ()
    deferred: tuple[DeferredWake, ...] = ()
    drain: tuple[str, ...] = ()  # stop admitting these LLMs' waiting requests for now
    candidates: tuple[str, ...] = ()  # idle for idle_timeout_s (offloaded or not), LRU first
    next_check: float | None = None  # the next time the decision may change without an event

    @property
    def empty(self) -> bool:
        return not (self.offload or self.wake or self.refused or self.deferred or self.drain)


class ResidencyPolicy(Protocol):
    def decide(self, now: float, llms: Sequence[LLMActivity], memory: MemoryView) -> Decision: ...


def held_bytes(llms: Iterable[LLMActivity]) -> int:
    """Weight bytes that take budget now: resident, waking and offloading LLMs."""
    return sum(m.weight_bytes for m in llms if m.held)


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _refusal(m: LLMActivity, memory: MemoryView, pinned: int) -> WakeRefusal | None:
    room = memory.budget_bytes - pinned
    need = m.wake_bytes
    if need <= room:
        return None
    kv = f" and {m.wake_kv_bytes} B of KV for its first request" if m.wake_kv_bytes else ""
    return WakeRefusal(
        m.name, RefusalReason.TOO_BIG, need, memory.budget_bytes, pinned,
        f"cannot wake {m.name!r}: its weights need {m.weight_bytes} B ({_mib(m.weight_bytes)}){kv} but the budget "
        f"of {memory.budget_bytes} B ({_mib(memory.budget_bytes)}) less {pinned} B ({_mib(pinned)}) of pinned "
        f"weights leaves {room} B ({_mib(room)}) even with every other LLM offloaded")


def _by_oldest_wait(m: LLMActivity) -> tuple:
    return (m.oldest_wait if m.oldest_wait is not None else math.inf, m.name)


@dataclass(frozen=True)
class LRUPolicy:
    """Elastic residency: wake on demand, offload least recently used idle LLMs (module docstring)."""

    idle_timeout_s: float = 60.0
    min_resident_s: float = 10.0
    offload_on_timeout: bool = True

    def __post_init__(self):
        if self.idle_timeout_s < 0 or self.min_resident_s < 0:
            raise ValueError(f"idle_timeout_s ({self.idle_timeout_s}) and min_resident_s ({self.min_resident_s}) "
                             "must be >= 0")

    def _protected_until(self, m: LLMActivity) -> float:
        return m.resident_since + self.min_resident_s

    def _offloadable(self, now: float, m: LLMActivity) -> bool:
        return (m.state is WeightState.RESIDENT and not m.pinned and not m.busy
                and now >= self._protected_until(m))

    def decide(self, now: float, llms: Sequence[LLMActivity], memory: MemoryView) -> Decision:
        pinned = sum(m.weight_bytes for m in llms if m.pinned)
        pending = sum(m.weight_bytes for m in llms if m.state is WeightState.OFFLOADING)
        free = memory.free_bytes + pending  # wakes run after offloads in progress finish
        victims = sorted((m for m in llms if self._offloadable(now, m)), key=lambda m: (m.last_active, m.name))
        offloads: list[Offload] = []
        wakes: list[Wake] = []
        refused: list[WakeRefusal] = []
        deferred: list[DeferredWake] = []
        retry: list[float] = []
        head_blocked = False
        for m in sorted((m for m in llms if m.state is WeightState.OFFLOADED and m.waiting > 0), key=_by_oldest_wait):
            refusal = _refusal(m, memory, pinned)
            if refusal is not None:
                refused.append(refusal)
                continue
            if head_blocked:
                deferred.append(DeferredWake(m.name, DeferReason.BEHIND, m.wake_bytes, free))
                continue
            if m.wake_bytes <= free:  # its first request's KV stays counted until the next decision
                wakes.append(Wake(m.name, m.weight_bytes))
                free -= m.wake_bytes
                continue
            take, got = [], free
            for v in victims:
                if got >= m.wake_bytes:
                    break
                take.append(v)
                got += v.weight_bytes
            if got >= m.wake_bytes:
                for v in take:
                    victims.remove(v)
                    offloads.append(Offload(v.name, v.weight_bytes, OffloadReason.WAKE, m.name))
                wakes.append(Wake(m.name, m.weight_bytes))
                free = got - m.wake_bytes
                continue
            # Not now: the free bytes stay for it (they are fewer than it needs), later waiters wait.
            head_blocked = True
            able = {v.name for v in victims}
            holders = [h for h in llms if h.state is WeightState.RESIDENT and not h.pinned and h.name not in able]
            until = [self._protected_until(h) for h in holders if not h.busy and self._protected_until(h) > now]
            retry_at = min(until) if until else None
            if retry_at is not None:
                retry.append(retry_at)
            deferred.append(DeferredWake(m.name, DeferReason.NO_ROOM, m.wake_bytes, got,
                                         tuple(h.name for h in holders), retry_at))
            free = 0
        # Busy LLMs' KV beyond the free bytes: more idle LLMs, LRU first (a partial cover still helps).
        kv_short = memory.kv_demand_bytes - max(0, free)
        while kv_short > 0 and victims and not head_blocked:
            v = victims.pop(0)
            offloads.append(Offload(v.name, v.weight_bytes, OffloadReason.KV))
            kv_short -= v.weight_bytes
            free += v.weight_bytes
        timed_out = sorted((m for m in llms if not m.busy and not m.pinned
                            and now - m.last_active >= self.idle_timeout_s), key=lambda m: (m.last_active, m.name))
        if self.offload_on_timeout:
            for v in list(victims):
                if now - v.last_active >= self.idle_timeout_s:
                    victims.remove(v)
                    offloads.append(Offload(v.name, v.weight_bytes, OffloadReason.IDLE_TIMEOUT))
        # Next time something changes without an event: an idle timeout or a protection ending.
        chosen = {o.llm for o in offloads}
        for m in llms:
            if m.state is not WeightState.RESIDENT or m.pinned or m.busy or m.name in chosen:
                continue
            if self.offload_on_timeout:
                retry.append(max(m.last_active + self.idle_timeout_s, self._protected_until(m)))
        future = [t for t in retry if t > now]
        return Decision(tuple(offloads), tuple(wakes), tuple(refused), tuple(deferred), (),
                        tuple(m.name for m in timed_out), min(future) if future else None)


@dataclass(frozen=True)
class SwapPolicy:
    """The swapping-router baseline: one LLM resident per mesh (module docstring)."""

    min_hold_s: float = 5.0

    def __post_init__(self):
        if self.min_hold_s < 0:
            raise ValueError(f"min_hold_s must be >= 0, got {self.min_hold_s}")

    def decide(self, now: float, llms: Sequence[LLMActivity], memory: MemoryView) -> Decision:
        pinned = sum(m.weight_bytes for m in llms if m.pinned)
        refused = []
        waiting = []
        for m in sorted((m for m in llms if m.waiting > 0 and not m.pinned), key=_by_oldest_wait):
            refusal = _refusal(m, memory, pinned) if m.state is WeightState.OFFLOADED else None
            if refusal is not None:
                refused.append(refusal)
            else:
                waiting.append(m)
        holders = [m for m in llms if m.held and not m.pinned]
        if not waiting:
            return Decision(refused=tuple(refused))
        target = waiting[0]
        others = [h for h in holders if h.name != target.name]
        if target.held:  # resident, waking or still offloading: only the others may have to go
            idle = tuple(Offload(h.name, h.weight_bytes, OffloadReason.SWAP, target.name) for h in others
                         if h.state is WeightState.RESIDENT and h.running == 0
                         and now >= h.resident_since + self.min_hold_s)
            return Decision(offload=idle if target.state is WeightState.RESIDENT else (), refused=tuple(refused),
                            drain=tuple(h.name for h in others if h.state is WeightState.RESIDENT and h.waiting))
        blocking = [h for h in others if h.state is not WeightState.OFFLOADING
                    and (h.running > 0 or now < h.resident_since + self.min_hold_s
                         or h.state is WeightState.WAKING)]
        if blocking:
            until = [h.resident_since + self.min_hold_s for h in blocking
                     if h.running == 0 and h.state is WeightState.RESIDENT and h.resident_since + self.min_hold_s > now]
            retry_at = max(until) if until and all(h.running == 0 for h in blocking) else None
            held = memory.free_bytes + sum(h.weight_bytes for h in others)
            return Decision(refused=tuple(refused),
                            deferred=(DeferredWake(target.name, DeferReason.HOLD, target.weight_bytes, held,
                                                   tuple(h.name for h in blocking), retry_at),),
                            drain=tuple(h.name for h in blocking if h.state is WeightState.RESIDENT),
                            next_check=retry_at)
        offloads = tuple(Offload(h.name, h.weight_bytes, OffloadReason.SWAP, target.name)
                         for h in others if h.state is WeightState.RESIDENT)
        return Decision(offload=offloads, wake=(Wake(target.name, target.weight_bytes),), refused=tuple(refused))


RESIDENCY_POLICIES = ("lru", "swap")


def make_policy(name: str, idle_timeout_s: float = 60.0, min_resident_s: float = 10.0,
                min_hold_s: float = 5.0) -> LRUPolicy | SwapPolicy:
    """The policy of a name (``lru``: elastic residency; ``swap``: the swapping-router baseline)."""
    if name == "lru":
        return LRUPolicy(idle_timeout_s=idle_timeout_s, min_resident_s=min_resident_s)
    if name == "swap":
        return SwapPolicy(min_hold_s=min_hold_s)
    raise ValueError(f"unknown residency policy {name!r}; choose from {', '.join(RESIDENCY_POLICIES)}")


class ResidencyTracker:
    """The bookkeeping behind :class:`LLMActivity`: the scheduler reports its events here.

    Waiting requests are kept as arrival times (oldest first), so the policies can order wakes
    by the oldest waiting request."""

    def __init__(self):
        self._llms: dict[str, LLMActivity] = {}
        self._arrivals: dict[str, list[tuple[float, int]]] = {}  # (arrival time, KV bytes), oldest first

    def register(self, name: str, weight_bytes: int, state: WeightState = WeightState.RESIDENT,
                 pinned: bool = False, now: float = 0.0) -> None:
        if name in self._llms:
            raise ValueError(f"LLM {name!r} is already registered")
        if weight_bytes < 0:
            raise ValueError(f"weight_bytes of {name!r} must be >= 0, got {weight_bytes}")
        if pinned and state is not WeightState.RESIDENT:
            raise ValueError(f"pinned LLM {name!r} must be resident, not {state.value}")
        self._llms[name] = LLMActivity(name, weight_bytes, state, last_active=now, resident_since=now, pinned=pinned)
        self._arrivals[name] = []

    def _get(self, name: str) -> LLMActivity:
        try:
            return self._llms[name]
        except KeyError:
            raise KeyError(f"unknown LLM {name!r}; registered: {sorted(self._llms)}") from None

    def _set(self, name: str, **changes) -> None:
        m = replace(self._get(name), **changes)
        arrivals = self._arrivals[name]
        self._llms[name] = replace(m, waiting=len(arrivals), oldest_wait=arrivals[0][0] if arrivals else None,
                                   wake_kv_bytes=arrivals[0][1] if arrivals else 0)

    def arrive(self, name: str, now: float, count: int = 1, kv_bytes: int = 0) -> None:
        """``count`` requests arrive; ``kv_bytes``: the KV one needs to be admitted (its prompt)."""
        self._get(name)
        self._arrivals[name].extend([(now, kv_bytes)] * count)
        self._set(name, last_active=now)

    def admit(self, name: str, now: float, count: int = 1) -> None:
        """``count`` waiting requests (oldest first) are admitted: waiting -> running."""
        arrivals = self._arrivals[name]
        if count > len(arrivals):
            raise ValueError(f"{name!r} has {len(arrivals)} requests waiting, cannot admit {count}")
        del arrivals[:count]
        self._set(name, running=self._get(name).running + count, last_active=now)

    def finish(self, name: str, now: float, count: int = 1) -> None:
        """``count`` running requests finished (or were aborted)."""
        m = self._get(name)
        if count > m.running:
            raise ValueError(f"{name!r} has {m.running} requests running, cannot finish {count}")
        self._set(name, running=m.running - count, last_active=now)

    def requeue(self, name: str, arrivals: Sequence[tuple[float, int]]) -> None:
        """Running requests preempted back to the queue, as (arrival time, KV bytes to be admitted)."""
        m = self._get(name)
        if len(arrivals) > m.running:
            raise ValueError(f"{name!r} has {m.running} requests running, cannot requeue {len(arrivals)}")
        self._arrivals[name] = sorted(self._arrivals[name] + list(arrivals))
        self._set(name, running=m.running - len(arrivals))

    def set_state(self, name: str, state: WeightState, now: float) -> None:
        """A transition done by FlexStore; becoming resident starts the ``min_resident_s`` clock."""
        m = self._get(name)
        if m.pinned and state is not WeightState.RESIDENT:
            raise ValueError(f"pinned LLM {name!r} cannot become {state.value}")
        if state in (WeightState.OFFLOADING, WeightState.OFFLOADED) and m.running:
            raise ValueError(f"{name!r} has {m.running} requests in flight; it cannot be {state.value}")
        since = now if state is WeightState.RESIDENT and m.state is not WeightState.RESIDENT else m.resident_since
        self._set(name, state=state, resident_since=since)

    def get(self, name: str) -> LLMActivity:
        return self._get(name)

    def snapshot(self) -> list[LLMActivity]:
        return list(self._llms.values())


@dataclass(frozen=True)
class QuotaInputs:
    """What ``QuotaManager`` needs once weights and KV share one budget."""

    total_pages: int  # KV pages of the budget left after the weights held
    members: tuple[str, ...]  # LLMs that get a quota: resident ones
    weight_bytes: int  # weights held (resident, waking, offloading, pinned)
    excluded: tuple[str, ...] = field(default=())  # offloaded / waking / offloading: no quota now


def kv_quota_inputs(budget_bytes: int, page_bytes: int, llms: Iterable[LLMActivity]) -> QuotaInputs:
    """Weights + KV of one budget -> the ADBS quota's inputs.

    The quota rule splits KV pages among LLMs by rate x pages per token. With elastic residency
    weights and KV share the budget, so the pages to split are

        total_pages = (budget_bytes - weight bytes held) // page_bytes

    where weights are held by resident, waking and offloading LLMs (pinned ones always). Only
    resident LLMs take part (``members``): an offloaded or waking LLM's requests are not
    scheduled, so its share goes to the others; build the ``QuotaManager`` again (or move its
    pages) whenever the members change, i.e. after each wake or offload. An offload grows
    ``total_pages`` by the LLM's weights; a wake shrinks it.
    """
    if page_bytes < 1:
        raise ValueError(f"page_bytes must be >= 1, got {page_bytes}")
    llms = list(llms)
    weights = held_bytes(llms)
    if weights > budget_bytes:
        raise ValueError(f"weights held ({weights} B) exceed the budget of {budget_bytes} B")
    members = tuple(m.name for m in llms if m.state is WeightState.RESIDENT)
    excluded = tuple(m.name for m in llms if m.state is not WeightState.RESIDENT)
    return QuotaInputs((budget_bytes - weights) // page_bytes, members, weights, excluded)

