"""What the scheduler keeps: its requests (the engine's request core plus their LLM, arrival order,
timestamps and what each runtime already knows of their pages; never tensors), each LLM's limits
and queues, each job in flight, and the types it is given."""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from muxserve.engine.logprobs import TokenLogprobs
from muxserve.engine.sequence import Sequence
from muxserve.ipc.runtime import Job, JobResult, Phase, SeqInput, TokenLogprob
from muxserve.scheduler.stats import RequestRecord


@dataclass(eq=False, kw_only=True)
class Request(Sequence):
    """``finish_reason`` ``error`` means its LLM failed (see ``error``); times are time.monotonic()."""

    idx: int  # arrival order over all LLMs: FCFS ties break on it
    llm: str
    arrival: float
    pages_sent: dict[str, int] = field(default_factory=dict)  # runtime -> pages it already knows
    error: str | None = None
    submit: float | None = None
    prefill_end: float | None = None
    end: float | None = None

    def seq_input(self, runtime: str, phase: Phase) -> SeqInput:
        """What ``runtime`` needs for one step: new tokens and the pages it has not seen yet."""
        sent = self.pages_sent.get(runtime, 0)
        self.pages_sent[runtime] = len(self.pages)
        prefill = phase is Phase.PREFILL
        tokens = self.token_ids if prefill else [self.output_token_ids[-1]]
        p = self.params
        guided = p.guided.to_wire() if p.guided is not None else None
        return SeqInput(self.req_id, tokens, self.num_tokens, sent, self.pages[sent:],
                        p.temperature, p.top_p, p.top_k, p.seed, len(self.output_token_ids),
                        logprobs=p.logprobs,
                        # echo: the prompt is scored by the first prefill only (not by a recompute)
                        prompt_logprobs=p.prompt_logprobs if prefill and self.prompt_logprobs is None else None,
                        # a runtime new to a guided request (or restarted) catches up from the whole output
                        output_token_ids=list(self.output_token_ids) if guided and not prefill and sent == 0
                        else None,
                        guided=guided, logit_bias=p.logit_bias)

    def take_result(self, index: int, result: JobResult) -> bool:
        """Keep what ``result`` brings for this request (the ``index``-th of its job) besides its
        token; returns whether its grammar is complete with that token."""
        if result.logprobs and result.logprobs[index] is not None:
            self.logprobs.append(engine_logprobs(result.logprobs[index]))
        if result.prompt_logprobs and result.prompt_logprobs[index] is not None:
            self.prompt_logprobs = [engine_logprobs(lp) for lp in result.prompt_logprobs[index]]
        return index in result.grammar_done

    def preempt(self) -> None:
        """Its pages were taken back: the next prefill recomputes prompt + output so far."""
        self.reset_for_recompute()
        self.pages_sent.clear()

    def record(self) -> RequestRecord:
        return RequestRecord(
            idx=self.idx, model=self.llm, arrival=self.arrival, prompt_len=len(self.prompt_token_ids),
            output_len=len(self.output_token_ids), submit=self.submit, prefill_end=self.prefill_end,
            end=self.end, output_token_ids=list(self.output_token_ids), num_preemptions=self.num_preemptions,
        )


def engine_logprobs(lp: TokenLogprob | None) -> TokenLogprobs | None:
    """A runtime's ``TokenLogprob`` as the engine's ``TokenLogprobs``."""
    if lp is None:
        return None
    return TokenLogprobs(lp.token_id, lp.logprob, lp.rank, list(zip(lp.top_ids, lp.top_logprobs)))


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
