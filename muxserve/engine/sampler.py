"""Next-token selection: greedy, temperature, top-k, top-p, per-request seeds.

The whole batch is sampled at once on the logits' device, with one synchronization for the
token ids. A row draws by the exponential race: with ``E_v ~ Exp(1)`` independent, ``argmax_v
p_v / E_v`` is distributed as ``p`` (what ``torch.multinomial`` draws, without its per-row host
round trip). Unseeded rows take their ``E`` from the device's random generator. Seeded rows take
theirs from a hash of (seed, tokens generated so far, token id) in integer tensor ops, which give
the same bits on every device: a seed draws the same tokens on CPU and GPU, in any batch, and in
a prefill runtime and a decode runtime (two processes), or after preemption.
"""

from __future__ import annotations

import torch

from muxserve.engine.sampling_params import SamplingParams

_MASK32 = 0xFFFFFFFF


def step_seed(seed: int | None, step: int) -> int | None:
    """The key of one sampling step of a seeded request: (seed, tokens generated so far).

    Derived rather than carried along, so every process that samples the request's next token
    derives the same key.
    """
    if seed is None:
        return None
    return (seed * 0x9E3779B1 + step) % (1 << 63)


def _mix32(x):
    """lowbias32 (C. Wellons), a 32-bit integer hash, on ints or int64 tensors of values < 2**32.

    The second multiplier is written as its negative residue mod 2**32 so that no product leaves
    the int64 range (where the result would depend on the device's overflow behaviour).
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * (0x846CA68B - (1 << 32))) & _MASK32
    return x ^ (x >> 16)


def _row_keys(key: int) -> tuple[int, int]:
    """Two 32-bit keys of a step key (Python ints: exact on every platform)."""
    lo, hi = key & _MASK32, (key >> 32) & _MASK32
    k1 = _mix32(lo ^ _mix32(hi ^ 0x243F6A88))
    return k1, _mix32(k1 ^ 0x85A308D3)


def seeded_exponentials(keys: list[int], vocab: int, device: torch.device | str) -> torch.Tensor:
    """(len(keys), vocab) float32 Exp(1) variates, a pure function of (key, token id)."""
    k = torch.tensor([_row_keys(key) for key in keys], dtype=torch.int64, device=device)
    v = torch.arange(vocab, dtype=torch.int64, device=device)
    bits = _mix32(_mix32(v[None, :] ^ k[:, :1]) ^ k[:, 1:])
    uniform = (bits.double() + 0.5) * 2.0**-32  # in (0, 1), exact in float64
    return (-torch.log(uniform)).float()


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """(B, vocab) -> (B,) int64 argmax of each row (the first one on ties): the greedy choice.

    The one op for greedy tokens, in ``sample`` and inside the captured decode graphs, so both
    paths pick the very same ids.
    """
    return logits.argmax(dim=-1)


def filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """(B, vocab) float32 logits -> each row's sampling distribution: its temperature, then its top
    k, then its top-p nucleus (of what top k left). Greedy rows get temperature 1 (unused)."""
    vocab = logits.shape[1]
    settings = torch.tensor([[p.temperature if not p.greedy else 1.0, p.top_p,
                              p.top_k if 0 < p.top_k < vocab else vocab] for p in params],
                            dtype=torch.float32).to(logits.device, non_blocking=True)
    temperature, top_p, top_k = settings.unbind(1)
    scaled = logits / temperature[:, None]
    if any(0 < p.top_k < vocab or p.top_p < 1.0 for p in params if not p.greedy):
        scaled = _filter_top_k_top_p(scaled, top_k, top_p)
    return scaled.softmax(-1)


def _filter_top_k_top_p(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every logit outside its row's top k, then outside its top-p nucleus. The most
    likely token always stays; of equal logits the lower token id ranks first."""
    ordered, order = scaled.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(scaled.shape[1], device=scaled.device)
    ordered = ordered.masked_fill(rank[None, :] >= top_k[:, None], float("-inf"))
    probs = ordered.softmax(-1)
    # Drop a token once the mass before it already reaches top_p.
    drop = (probs.cumsum(-1) - probs) >= top_p[:, None]
    ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.empty_like(scaled).scatter_(1, order, ordered)


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int | None]) -> list[int]:
    """logits: (B, vocab) float32 -> one token id per row; ``seeds[i]``: ``step_seed`` of row i."""
    greedy = greedy_tokens(logits)
    if all(p.greedy for p in params):
        return greedy.tolist()
    vocab, dev = logits.shape[1], logits.device
    probs = filtered_probs(logits, params)
    seeded = [i for i, s in enumerate(seeds) if s is not None]
    if not seeded:
        race = torch.empty_like(probs).exponential_()
    else:
        race = torch.empty_like(probs)
        race[seeded] = seeded_exponentials([seeds[i] for i in seeded], vocab, dev)
        unseeded = [i for i, s in enumerate(seeds) if s is None]
        if unseeded:
            race[unseeded] = torch.empty(len(unseeded), vocab, device=dev).exponential_()
    # An exponential variate of exactly 0 (possible in float32) would turn 0 / 0 into NaN.
    drawn = (probs / race.clamp_min_(torch.finfo(torch.float32).tiny)).argmax(dim=-1)
    is_greedy = torch.tensor([p.greedy for p in params]).to(dev, non_blocking=True)
    return torch.where(is_greedy, greedy, drawn).tolist()
