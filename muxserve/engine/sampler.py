"""Next-token selection: greedy, temperature, top-k, top-p, per-request seeds.

The whole batch is sampled at once on the logits' device, with one synchronization for the token
ids. Each row draws by inverting its cumulative distribution at one uniform number ``u``: a seeded
request's ``u`` is a hash of (seed, tokens generated so far), exact in Python integers, so a seed
draws the same tokens on CPU and GPU, alone or in any batch, in a prefill runtime and a decode
runtime (two processes), and after preemption. Unseeded rows take ``u`` from torch's CPU generator.

Top-k and top-p only need a row's most likely tokens: they run on ``topk`` candidates (the largest
top-k of the batch, at least ``TOP_P_CANDIDATES`` for rows with top-p alone) instead of a sort of
the whole vocabulary, with probabilities normalized over the whole vocabulary. A top-p row whose
nucleus reaches past its candidates (a nearly flat distribution) makes the batch sort it all.
"""

from __future__ import annotations

import torch

from muxserve.engine.sampling_params import SamplingParams
from muxserve.engine.structured import mask_logits

TOP_P_CANDIDATES = 1024
_MASK64 = (1 << 64) - 1


def step_seed(seed: int | None, step: int) -> int | None:
    """The 64-bit key of one sampling step of a seeded request: (seed, tokens generated so far).

    Derived rather than carried along, so every process that samples the request's next token
    derives the same key. For a given step the key is a bijection of the seed's 64 bits (SplitMix64
    of its two's complement, then XOR the step), so the seeds of ``SamplingParams`` (the signed
    64-bit range) never share a stream; hashing the seed first keeps two seeds' key sequences
    from being shifts of each other.
    """
    if seed is None:
        return None
    return splitmix64(seed & _MASK64) ^ step


def splitmix64(x: int) -> int:
    """SplitMix64's output function (S. Vigna): a 64-bit hash, on Python ints."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seeded_uniform(key: int) -> float:
    """A number in [0, 1) of 53 random bits, a pure function of ``step_seed``'s key."""
    return (splitmix64(key) >> 11) * 2.0**-53


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """(B, vocab) -> (B,) int64 argmax of each row (the first one on ties): the greedy choice.

    The one op for greedy tokens, in ``sample`` and inside the captured decode graphs, so both
    paths pick the very same ids.
    """
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int | None],
           bitmask: torch.Tensor | None = None) -> list[int]:
    """logits: (B, vocab) float32 -> one token id per row; ``seeds[i]``: ``step_seed`` of row i.

    ``bitmask``: the step's structured-output mask (``structured.fill_bitmask``); tokens it forbids
    are never drawn.
    """
    if bitmask is not None:
        logits = mask_logits(logits, bitmask)
    greedy = greedy_tokens(logits)
    if all(p.greedy for p in params):
        return greedy.tolist()
    vocab, dev = logits.shape[1], logits.device
    filtered = [_filtering(p, vocab) for p in params]
    unseeded = torch.rand(len(params), dtype=torch.float64).tolist()
    uniform = [r if key is None else seeded_uniform(key) for key, r in zip(seeds, unseeded)]
    # Greedy rows get neutral settings (their filters must not send the batch to a full sort).
    settings = torch.tensor([[1.0, 1.0, vocab, 1, 0, r] if p.greedy else
                             [p.temperature, p.top_p, _top_k(p, vocab), 0, f, r]
                             for p, f, r in zip(params, filtered, uniform)],
                            dtype=torch.float64).to(dev, non_blocking=True)  # one copy to the device
    temperature, top_p, top_k, is_greedy, is_filtered, u = settings.unbind(1)
    scaled = logits / temperature[:, None].float()
    if not any(filtered):
        drawn = _invert_cdf(scaled.softmax(-1), u)
    else:
        probs, ids = candidate_probs(scaled, params, top_k, top_p)
        drawn = ids.gather(1, _invert_cdf(probs, u)[:, None])[:, 0]
        if not all(filtered):  # rows without filters draw from the whole vocabulary
            drawn = torch.where(is_filtered.bool(), drawn, _invert_cdf(scaled.softmax(-1), u))
    return torch.where(is_greedy.bool(), greedy, drawn).tolist()


def _top_k(p: SamplingParams, vocab: int) -> int:
    return p.top_k if 0 < p.top_k < vocab else vocab


def _filtering(p: SamplingParams, vocab: int) -> bool:
    """Whether a row samples through top-k or top-p (not greedy, not the whole distribution)."""
    return not p.greedy and (_top_k(p, vocab) < vocab or p.top_p < 1.0)


def candidate_probs(scaled: torch.Tensor, params: list[SamplingParams], top_k: torch.Tensor,
                    top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each filtering row's distribution after its top k, then its top-p nucleus (of what top k
    left), on its most likely tokens: (probabilities (B, n), unnormalized and zero outside the
    filters, in order of decreasing logit; their token ids). The most likely token always stays.

    ``scaled``: logits over temperature; ``top_k`` (vocab where off), ``top_p``: (B,) settings.
    Rows without filters are not meaningful here.
    """
    vocab = scaled.shape[1]
    ks = [_top_k(p, vocab) for p in params if _filtering(p, vocab)]
    largest_k = max((k for k in ks if k < vocab), default=0)
    top_p_only = vocab in ks
    n = min(vocab, max(TOP_P_CANDIDATES, largest_k)) if top_p_only else largest_k
    lse = scaled.logsumexp(-1, keepdim=True)
    if n < vocab:
        values, ids = scaled.topk(n, dim=-1)
        probs, fits = _filter(values, lse, top_k, top_p, vocab)
        if fits:
            return probs, ids
    # Some top-p nucleus reaches past the candidates: sort the whole vocabulary.
    values, ids = scaled.sort(dim=-1, descending=True, stable=True)
    return _filter(values, lse, top_k, top_p, vocab)[0], ids


def _filter(values: torch.Tensor, lse: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
            vocab: int) -> tuple[torch.Tensor, bool]:
    """Probabilities of the candidates ``values`` (decreasing scaled logits) after the filters, and
    whether every top-p nucleus lies within them (synchronizes when there are fewer than vocab)."""
    probs = (values - lse).exp()  # shares of the whole vocabulary
    rank = torch.arange(values.shape[1], device=values.device)
    probs = probs.masked_fill(rank[None, :] >= top_k[:, None], 0.0)
    has_top_k = top_k < vocab
    kept = probs.sum(-1)
    fits = values.shape[1] == vocab or not bool((~has_top_k & (top_p < 1.0) & (kept < top_p)).any())
    # top-p is a share of what top k left; without top k, of the whole vocabulary.
    mass = torch.where(has_top_k, kept, 1.0)
    drop = ((probs.cumsum(-1) - probs) >= (top_p * mass)[:, None]) & (top_p < 1.0)[:, None]
    return probs.masked_fill(drop, 0.0), fits


def _invert_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(B, n) unnormalized probabilities, (B,) uniforms in [0, 1) -> (B,) int64 index of each draw.

    The first index whose cumulative mass (float64) exceeds ``u`` times the row's total: a token
    of zero probability is never drawn.
    """
    cdf = probs.double().cumsum(-1)
    target = (u * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, target, right=True)[:, 0].clamp_max_(probs.shape[1] - 1)
