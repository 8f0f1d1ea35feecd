"""A request as the scheduler sees it: the engine's request core plus its LLM, arrival order,
timestamps and what each runtime already knows of its pages; never tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

from muxserve.engine.sequence import Sequence
from muxserve.ipc.runtime import Phase, SeqInput
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
        tokens = self.token_ids if phase is Phase.PREFILL else [self.output_token_ids[-1]]
        p = self.params
        return SeqInput(self.req_id, tokens, self.num_tokens, sent, self.pages[sent:],
                        p.temperature, p.top_p, p.top_k, p.seed, len(self.output_token_ids))

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
