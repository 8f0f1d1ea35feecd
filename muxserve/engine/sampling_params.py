"""Per-request sampling settings, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from muxserve.engine.logprobs import check_num_top
from muxserve.engine.structured import GuidedSpec

# Seeds are signed 64-bit integers: what msgpack carries to the runtimes, and a range that
# ``sampler.step_seed`` maps one-to-one onto its keys (distinct seeds, distinct sampling streams).
SEED_MIN = -(1 << 63)
SEED_MAX = (1 << 63) - 1
TOP_K_MAX = (1 << 63) - 1  # any k at least the vocabulary size keeps every token

@dataclass
class SamplingParams:
    """How to pick the next token and when to stop.

    Attributes:
        max_tokens: upper bound on generated tokens (the prompt is not counted).
        temperature: 0 means greedy decoding; larger values flatten the distribution.
        top_p: nucleus sampling mass in (0, 1].
        top_k: keep only the k most likely tokens (at most 2**63 - 1); -1 disables the filter.
        seed: per-request random seed in [-2**63, 2**63 - 1]; equal seeds give equal samples,
            distinct seeds distinct ones.
        stop_token_ids: extra token ids that end the request (the stop token is kept).
        ignore_eos: keep generating past EOS until ``max_tokens`` (benchmarks).
        logprobs: None, or how many most likely alternatives (0-20) to return with the
            log-probability of each generated token.
        prompt_logprobs: None, or the same for every prompt token (``echo``).
        guided: a grammar the output must follow (``structured.GuidedSpec``), or None.
        logit_bias: token id -> a bias in [-100, 100] added to its logit before sampling.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    guided: GuidedSpec | None = None
    logit_bias: dict[int, float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                or not (self.top_k == -1 or 1 <= self.top_k <= TOP_K_MAX)):
            raise ValueError(f"top_k must be -1 (disabled) or in [1, {TOP_K_MAX}], got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not SEED_MIN <= self.seed <= SEED_MAX):
            raise ValueError(f"seed must be None or an integer in [{SEED_MIN}, {SEED_MAX}], got {self.seed!r}")
        bad = [t for t in self.stop_token_ids if isinstance(t, bool) or not isinstance(t, int) or t < 0]
        if bad:
            raise ValueError(f"stop_token_ids must be non-negative integers, got {bad!r}")
        self.stop_token_ids = list(self.stop_token_ids)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                check_num_top(getattr(self, name), name)
        if self.guided is not None and not isinstance(self.guided, GuidedSpec):
            raise ValueError(f"guided must be a GuidedSpec, got {type(self.guided).__name__}")
        if self.logit_bias:
            bad = {k: v for k, v in self.logit_bias.items()
                   if isinstance(k, bool) or not isinstance(k, int) or k < 0
                   or isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100}
            if bad:
                raise ValueError(f"logit_bias must map token ids to numbers in [-100, 100], got {bad!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
