"""Next-token selection: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

import torch

from muxserve.engine.sampling_params import SamplingParams


def step_generator(seed: int | None, step: int) -> torch.Generator | None:
    """The random stream for one sampling step of a seeded request.

    Derived from (seed, number of tokens generated so far) rather than carried along, so a
    request sampled by its prefill runtime and then by its decode runtime (two processes), or
    recomputed after preemption, draws exactly the numbers it would draw in one engine.
    """
    if seed is None:
        return None
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + step) % (1 << 63))


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """(B, vocab) -> (B,) int64 argmax of each row (the first one on ties): the greedy choice.

    The one op for greedy tokens, in ``sample`` and inside the captured decode graphs, so both
    paths pick the very same ids.
    """
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    """logits: (B, vocab) float32 -> one token id per row."""
    if all(p.greedy for p in params):
        return greedy_tokens(logits).tolist()
    greedy = greedy_tokens(logits).tolist()
    out = []
    for i, p in enumerate(params):
        if p.greedy:
            out.append(greedy[i])
            continue
        probs = _filtered_probs(logits[i], p).cpu()
        out.append(int(torch.multinomial(probs, 1, generator=generators[i]).item()))
    return out


def _filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p; the first token always stays.
        drop = cumulative - sorted_logits.softmax(-1) >= p.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    return logits.softmax(-1)
