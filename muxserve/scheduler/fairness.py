"""Bounded waiting across LLMs: a job that cannot get its SM units for too long gets the next ones.

ADBS (the paper's rules) dispatches whatever fits in the SM units left, round-robin, prefills
first. When the instance is oversubscribed, units free up one job at a time and the jobs that
need few of them (small LLMs' decodes, 3 units) always fit first; a job that needs more (a 14 B
LLM's decode at 50 %, a prefill at 90 %) finds enough free units only by chance, and a decode
batch also waits while any prefill waits for units (prefill priority). Nothing bounds that wait:
the larger LLMs starve.

``WaitGuard`` remembers since when each ready (LLM, phase) job has been held: a prefill from the
first time its units were missing, a decode from the moment its batch was ready (whatever held
it: units or prefill priority). Once one has been held for its phase's bound it is *overdue*: the
scheduler starts nothing else until that job fits (the units of the jobs in flight come back as
they end), then schedules as usual. Among several overdue jobs the one with the largest
``wait × units`` goes first, so a large job is not passed over again by a smaller one that has
waited a little longer. Every ready job therefore starts within about its bound + the
longest step in flight + the steps of the jobs overdue before it. Below the bound (an instance
that keeps up) the paper's rules decide alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from muxserve.ipc.runtime import Phase
from muxserve.scheduler.state import Dispatch, _LLMState

Key = tuple[str, Phase]


class WaitGuard:
    def __init__(self, prefill_bound_s: float, decode_bound_s: float):
        if not (prefill_bound_s > 0 and decode_bound_s > 0):
            raise ValueError(f"wait bounds must be > 0 s, got {prefill_bound_s} and {decode_bound_s}")
        self.bound_s = {Phase.PREFILL: prefill_bound_s, Phase.DECODE: decode_bound_s}
        self.held_since: dict[Key, float] = {}  # prefills whose SM units were missing
        self.reservations = 0  # how often an overdue job made the others wait

    def held(self, key: Key, now: float) -> None:
        self.held_since.setdefault(key, now)

    def clear(self, key: Key) -> None:
        self.held_since.pop(key, None)

    def overdue(self, now: float, candidates: Iterable[tuple[Key, float, int]]) -> Key | None:
        """The job to reserve for among ``(key, held since, units)``, or None when none is overdue."""
        best, best_score = None, 0.0
        for key, since, units in candidates:
            wait = now - since
            if wait >= self.bound_s[key[1]] and (best is None or wait * units > best_score):
                best, best_score = key, wait * units
        return best

    def prefill_candidates(self, ready: Callable[[str], bool], units: Callable[[str], int]):
        """Held prefills that still want to run (stale marks are dropped)."""
        out = []
        for key, since in list(self.held_since.items()):
            if ready(key[0]):
                out.append((key, since, units(key[0])))
            else:
                del self.held_since[key]
        return out


class OverloadFairness:
    """Part of MuxScheduler (as ``recovery.RuntimeRecovery``): its ``guard`` (a WaitGuard, or None
    for the policies without ``overload_fairness``), ``llms``, ``order`` and dispatch methods."""

    def _try_prefill(self, state: _LLMState) -> Dispatch:
        """``_try_prefill_once``, remembering since when the prefill has lacked SM units."""
        outcome = self._try_prefill_once(state)
        if self.guard is not None:
            key = (state.info.name, Phase.PREFILL)
            if outcome is Dispatch.NO_SM_UNITS:
                self.guard.held(key, self.clock())
            else:
                self.guard.clear(key)
        return outcome

    def _serve_overdue(self) -> int | None:
        """Start the job that has been held past the wait bound, if any (``fairness.WaitGuard``).

        Returns the jobs sent (0 or 1), or None when the overdue job still lacks SM units: then
        nothing else may start.
        """
        now = self.clock()
        candidates = self.guard.prefill_candidates(lambda n: self._wants_prefill(self.llms[n]),
                                                   lambda n: self.llms[n].info.prefill_units)
        candidates += [((n, Phase.DECODE), s.decode_ready_since, s.info.decode_units) for n, s in self.llms.items()
                       if s.running and s.decode_ready_since is not None and not self._phase_blocked(s, Phase.DECODE)]
        key = self.guard.overdue(now, candidates)
        if key is None:
            return 0
        state, pos = self.llms[key[0]], self.order.index(key[0])
        outcome = self._try_prefill(state) if key[1] is Phase.PREFILL else self._try_decode(state)
        if outcome is Dispatch.NO_SM_UNITS:
            return None
        if outcome is Dispatch.SENT:
            self.guard.reservations += 1
            if key[1] is Phase.PREFILL:
                self._prefill_ptr = (pos + 1) % len(self.order)
            else:
                self._decode_ptr = (pos + 1) % len(self.order)
        return int(outcome is Dispatch.SENT)
