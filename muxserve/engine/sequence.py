"""One request's core state, shared by the offline engine and the multiplexed scheduler: its tokens,
its stop rule, the checks it must pass, the KV pages it owns."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from muxserve.engine.logprobs import TokenLogprobs
from muxserve.engine.sampler import step_seed
from muxserve.engine.sampling_params import SamplingParams


class SequenceStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2  # every status from here on is finished


class FinishReason(str, enum.Enum):
    """Why a request ended; its value is what the API and the statistics show."""

    LENGTH = "length"  # reached max_tokens or the context
    STOP = "stop"  # produced EOS or a stop token
    ABORT = "abort"  # dropped before it ended (client gone, drain, deadline)
    ERROR = "error"  # its LLM failed

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class RequestLimits:
    """What a request of one model must fit: its context, its vocabulary and the KV pool."""

    max_model_len: int
    vocab_size: int
    max_tokens: int  # tokens one request can hold with the whole KV pool


def check_request(prompt_token_ids: list[int], params: SamplingParams, limits: RequestLimits,
                  model: str | None = None) -> None:
    """Raise ValueError if the request can never run: an empty prompt, one that fills the context,
    token ids outside the vocabulary, or more tokens than the KV pool holds. ``model`` names it."""
    who = f"LLM {model!r}: " if model else ""
    n = len(prompt_token_ids)
    if n == 0:
        raise ValueError(f"{who}prompt is empty")
    if n >= limits.max_model_len:
        raise ValueError(f"{who}prompt of {n} tokens does not fit the model's context of {limits.max_model_len} tokens")
    bad = [t for t in prompt_token_ids if not 0 <= t < limits.vocab_size]
    if bad:
        raise ValueError(f"{who}prompt token ids out of the vocabulary [0, {limits.vocab_size}): {bad[:5]}")
    total = min(n + params.max_tokens, limits.max_model_len)
    if total > limits.max_tokens:
        raise ValueError(f"{who}request needs {total} tokens of KV cache but the whole pool holds "
                         f"{limits.max_tokens}; raise kv_cache_bytes or lower max_tokens")


@dataclass(eq=False)
class Sequence:
    """One request: its tokens, sampling settings and the KV pages it owns.

    ``append_token`` applies the stop rule: EOS (unless ``ignore_eos``), a stop token or a complete
    grammar ends it with ``stop``; ``max_tokens`` generated tokens or a full context end it with ``length``.
    """

    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int | None = None  # the context limit also ends generation
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    pages: list[int] = field(default_factory=list)  # block-major: [block][layer][kv-head]
    num_preemptions: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per output token (params.logprobs)
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # params.prompt_logprobs, once prefilled
    matcher: object | None = None  # structured.GuidedMatcher of params.guided, where this process steps it

    @property
    def step_seed(self) -> int | None:
        return step_seed(self.params.seed, len(self.output_token_ids))

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status >= SequenceStatus.FINISHED

    def append_token(self, token_id: int, grammar_done: bool = False) -> FinishReason | None:
        """Record a sampled token; finish the request and return why if it ends here.

        ``grammar_done``: its structured output is complete with this token (``stop``)."""
        self.output_token_ids.append(token_id)
        p = self.params
        if ((token_id in self.eos_token_ids and not p.ignore_eos) or token_id in p.stop_token_ids
                or grammar_done):
            self.finish(FinishReason.STOP)
        elif len(self.output_token_ids) >= p.max_tokens or (
            self.max_model_len is not None and self.num_tokens >= self.max_model_len
        ):
            self.finish(FinishReason.LENGTH)
        return self.finish_reason

    def finish(self, reason: FinishReason) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason

    def reset_for_recompute(self) -> None:
        """After preemption: pages are gone; the next prefill recomputes prompt + output so far."""
        self.pages = []
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1
