"""What the scheduler keeps: each LLM's limits and queues, each job in flight, and the types it is given."""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from muxserve.ipc.runtime import Job, Phase
from muxserve.scheduler.request import Request


class RuntimeLink(Protocol):
    """Where the jobs of one (LLM, phase) runtime go."""

    def send(self, job: Job) -> None: ...


@dataclass
class LLMInfo:
    name: str
    prefill_units: int
    decode_units: int
    max_num_seqs: int  # the config's cap
    eos_ids: frozenset[int]
    max_model_len: int
    vocab_size: int
    architecture: str | None = None  # config.json's (the tool-call format of its family)


@dataclass
class _LLMState:
    info: LLMInfo
    waiting: deque[Request] = field(default_factory=deque)  # FCFS; preempted go to the head
    running: list[Request] = field(default_factory=list)  # prefilled, between decode steps
    executing: int = 0  # requests inside in-flight jobs
    wait_for_cache: bool = False  # a prefill found no pages: wait until some request finishes
    release: dict[Phase, list[str]] = field(default_factory=lambda: {Phase.PREFILL: [], Phase.DECODE: []})
    # How long decodable batches waited (SM units, a prefill with priority): from the moment the
    # LLM had running requests and no decode in flight until its next decode job was sent.
    decode_ready_since: float | None = None
    decode_wait_s: float = 0.0
    decode_jobs: int = 0

    @property
    def active(self) -> int:
        return len(self.running) + self.executing


@dataclass
class _Inflight:
    llm: str
    phase: Phase
    requests: list[Request]
    units: list[int]


class Dispatch(enum.Enum):
    """What trying one LLM's prefill or decode came to."""

    SENT = "sent"  # a job went out
    SKIPPED = "skipped"  # nothing to run, or its runtime is busy or down
    NO_SM_UNITS = "no_sm_units"  # a job was ready but the SM units it needs are taken


TokenCallback = Callable[[Request, int], None]
ErrorCallback = Callable[[Request], None]
