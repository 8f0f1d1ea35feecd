"""Per-request state of the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from muxserve.engine.sampler import step_seed
from muxserve.engine.sampling_params import SamplingParams


class SequenceStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2  # every status from here on is finished


class FinishReason(str, enum.Enum):
    LENGTH = "length"  # reached max_tokens
    STOP = "stop"  # produced EOS or a stop token


@dataclass
class Sequence:
    """One request: its tokens, sampling settings and the KV pages it owns."""

    seq_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int | None = None  # the context limit also ends generation
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    pages: list[int] = field(default_factory=list)  # block-major: [block][layer][kv-head]
    num_preemptions: int = 0

    @property
    def step_seed(self) -> int | None:
        return step_seed(self.params.seed, len(self.output_token_ids))

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status >= SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        """Record a sampled token and finish the request if it ends here."""
        self.output_token_ids.append(token_id)
        stops = self.params.stop_token_ids
        if (token_id in self.eos_token_ids and not self.params.ignore_eos) or token_id in stops:
            self._finish(FinishReason.STOP)
        elif len(self.output_token_ids) >= self.params.max_tokens or (
            self.max_model_len is not None and self.num_tokens >= self.max_model_len
        ):
            self._finish(FinishReason.LENGTH)

    def _finish(self, reason: FinishReason) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason

    def reset_for_recompute(self) -> None:
        """After preemption: pages are gone; the next prefill recomputes prompt + output so far."""
        self.pages = []
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1
