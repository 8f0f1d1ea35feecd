"""Elastic residency: where an LLM's weights may live and are now, and what the budget answers.

Types only; :class:`~muxserve.flexstore.budget.MemoryBudget` makes the transitions
(resident -> offloading -> offloaded -> waking -> resident, or waking -> offloaded on a cancel).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from muxserve.engine.kv_cache import Allocation


class Residency(str, Enum):
    """Where an LLM's weights may live (config key ``residency``)."""

    PINNED = "pinned"  # on the device for good
    ELASTIC = "elastic"  # offloaded to its host copy when idle, woken on demand

    @classmethod
    def parse(cls, value: str | Residency) -> Residency:
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"residency must be 'pinned' or 'elastic', got {value!r}") from None


class WeightState(str, Enum):
    """Where an elastic LLM's weights are now; a pinned LLM is always resident."""

    RESIDENT = "resident"
    OFFLOADING = "offloading"  # granules still held until every process has unmapped them
    OFFLOADED = "offloaded"  # holds no granule and no page; its requests are not scheduled
    WAKING = "waking"  # granules held again; weights being mapped and copied in


class BudgetError(ValueError):
    """A transition or request the budget refuses; the message names the LLM and its state."""


class OffloadRefused(BudgetError):
    """Offload of an LLM whose requests still hold pages."""


class WakeRefused(BudgetError):
    """The budget cannot hold the LLM's weights even after preempting every unprotected request."""

    def __init__(self, message: str, needed: int, free: int, whole_free: int, reclaimable: int):
        super().__init__(message)
        self.needed = needed  # granules of the weights
        self.free = free  # granules of the budget held by nobody
        self.whole_free = whole_free  # mapped KV granules with every page free
        self.reclaimable = reclaimable  # more granules that preempting every unprotected request empties


@dataclass
class ElasticAllocation(Allocation):
    """An ``Allocation`` plus the KV granules the budget mapped for it, which the owner must map
    (in every process) before the new pages are used."""

    mapped: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class OffloadPlan:
    llm: str
    granules: int  # weight granules given back by finish_offload


@dataclass(frozen=True)
class WakePlan:
    """What a wake needs before the weights are mapped: these KV granules unmapped (in every
    process) and these requests preempted (to be recomputed; per LLM, in admission order)."""

    llm: str
    granules: int  # weight granules now reserved for the LLM
    unmap: list[int] = field(default_factory=list)
    preempted: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class BudgetFigures:
    num_granules: int
    granule_bytes: int
    pinned_granules: int  # weights of pinned LLMs
    elastic_granules: int  # weights of elastic LLMs that hold theirs now
    kv_granules: int  # mapped KV granules
    kv_whole_free: int  # of them, granules with every page free
    free_granules: int  # held by nobody
    free_pages: int  # free pages of mapped granules
    states: dict[str, WeightState]
