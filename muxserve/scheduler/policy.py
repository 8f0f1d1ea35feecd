"""The scheduling approaches of the original, as flags the one scheduler loop reads.

    adbs       prefill first, round-robin over LLMs; decodes fill the SM units left;
               KV quotas split by rate and adapted periodically (MuxServe); a job held
               past the wait bound gets the next SM units, an LLM with requests waiting at
               its quota gets quota from the under-used ones (scheduler/fairness.py)
    adbs-paper adbs exactly as the paper: no wait bound, quota moves by decode batch use only
               (an oversubscribed instance can starve the LLMs whose jobs need the most SM
               units, and keep the larger LLMs at their first quota)
    fix-adbs   adbs with quotas fixed at start (split by pages per token, not by rate)
    fix        fixed quotas; an LLM's prefill and decode never run at the same time
    roundrobin adbs without quotas; a prefill blocked on SM units ends the round
    fcfs       strict first-come-first-served over all LLMs, no quotas; with MPS off this is
               temporal multiplexing
"""

from __future__ import annotations

import enum

import msgspec


class QuotaMode(str, enum.Enum):
    ADAPTIVE = "adaptive"  # initial split by rate, adapted every few seconds
    FIXED = "fixed"  # split by pages per token at start, never changed
    NONE = "none"  # the config's max_num_seqs only


class SchedulePolicy(msgspec.Struct, frozen=True):
    """One schedule approach as flags of the scheduler loop.

    ``fcfs_order``: pick the LLM of the oldest request instead of round-robin;
    ``stop_on_blocked_prefill``: a prefill blocked on SM units ends the round;
    ``exclusive_phases``: prefill and decode of one LLM never overlap;
    ``prefill_mps_reduction``: the prefill runtime starts this many points lower;
    ``overload_fairness``: a job held longer than the scheduler's wait bound is served next, and
    an LLM whose admission is saturated (requests waiting at its quota) is hungry for the quota's
    adaptation (scheduler/fairness.py, QuotaManager.adapt).
    """

    name: str
    quota: QuotaMode
    fcfs_order: bool = False
    stop_on_blocked_prefill: bool = False
    exclusive_phases: bool = False
    prefill_mps_reduction: int = 0
    overload_fairness: bool = False


POLICIES = {
    "adbs": SchedulePolicy("adbs", QuotaMode.ADAPTIVE, overload_fairness=True),
    "adbs-paper": SchedulePolicy("adbs-paper", QuotaMode.ADAPTIVE),
    "fix-adbs": SchedulePolicy("fix-adbs", QuotaMode.FIXED, overload_fairness=True),
    "fix": SchedulePolicy("fix", QuotaMode.FIXED, exclusive_phases=True, prefill_mps_reduction=10),
    "roundrobin": SchedulePolicy("roundrobin", QuotaMode.NONE, stop_on_blocked_prefill=True),
    "fcfs": SchedulePolicy("fcfs", QuotaMode.NONE, fcfs_order=True),
}


def get_policy(name: str) -> SchedulePolicy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown schedule approach {name!r}; choose from {', '.join(POLICIES)}") from None
