"""A request as the scheduler sees it: tokens, pages and timestamps; never tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

from muxserve.engine.sampling_params import SamplingParams
from muxserve.ipc.runtime import Phase, SeqInput
from muxserve.scheduler.stats import RequestRecord


@dataclass
class Request:
    req_id: str
    idx: int  # arrival order over all LLMs: FCFS ties break on it
    llm: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: float
    output_token_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)  # every page it owns, in block order
    pages_sent: dict[str, int] = field(default_factory=dict)  # runtime -> pages it already knows
    finish_reason: str | None = None  # stop, length, abort, or error (its LLM failed: see ``error``)
    error: str | None = None
    submit: float | None = None
    prefill_end: float | None = None
    end: float | None = None
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def seq_input(self, runtime: str, phase: Phase) -> SeqInput:
        """What ``runtime`` needs for one step: new tokens and the pages it has not seen yet."""
        sent = self.pages_sent.get(runtime, 0)
        self.pages_sent[runtime] = len(self.pages)
        if phase is Phase.PREFILL:
            tokens = self.all_token_ids
        else:
            tokens = [self.output_token_ids[-1]]
        p = self.params
        return SeqInput(self.req_id, tokens, self.num_tokens, sent, self.pages[sent:],
                        p.temperature, p.top_p, p.top_k, p.seed, len(self.output_token_ids))

    def preempt(self) -> None:
        """Its pages were taken back: the next prefill recomputes prompt + output so far."""
        self.pages = []
        self.pages_sent.clear()
        self.num_preemptions += 1

    def finish_reason_after(self, token: int, eos_ids: frozenset[int], max_model_len: int) -> str | None:
        """Why the request ends after appending ``token``, or None to go on."""
        p = self.params
        if (token in eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        if len(self.output_token_ids) >= p.max_tokens or self.num_tokens >= max_model_len:
            return "length"
        return None

    def record(self) -> RequestRecord:
        return RequestRecord(
            idx=self.idx, model=self.llm, arrival=self.arrival, prompt_len=len(self.prompt_token_ids),
            output_len=len(self.output_token_ids), submit=self.submit, prefill_end=self.prefill_end,
            end=self.end, output_token_ids=list(self.output_token_ids), num_preemptions=self.num_preemptions,
        )
