"""Log-probabilities of sampled and prompt tokens, for a whole batch at once on the device.

What they are the log-probabilities of: the model's raw distribution, ``log_softmax`` of the step's
logits before temperature, top-k/top-p and any structured-output mask. That is vLLM's default
(``logprobs_mode="raw_logprobs"``), so evaluation harnesses that score answers by log-likelihood
get the same numbers from any temperature, and a grammar that forbids a token does not make the
remaining ones look more likely than the model thinks they are.

A step computes one ``log_softmax`` over the rows that ask, one ``topk`` at the largest count of
the batch, one ``gather`` of the chosen tokens and their ranks, packs everything into one tensor and
copies it to the host once. Ranks follow vLLM: 1 + the number of tokens strictly more likely.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs (and vLLM's default --max-logprobs)


@dataclass
class TokenLogprobs:
    """The log-probability of one token and, if asked, of the most likely tokens at its position."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), most likely first


def check_num_top(value: object, field_name: str = "top_logprobs") -> int:
    """``value`` as a count of top log-probabilities, or ValueError naming ``field_name``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise ValueError(f"{field_name} must be an integer in [0, {MAX_TOP_LOGPROBS}], got {value!r}")
    return value


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor | Sequence[int],
                   num_top: Sequence[int | None]) -> list[TokenLogprobs | None]:
    """Per row of a step: the log-probability and rank of ``token_ids[i]`` and its ``num_top[i]``
    most likely alternatives; None for rows whose ``num_top[i]`` is None (they did not ask).

    ``logits``: (B, vocab) on any device, any float dtype (computed in float32). ``token_ids``:
    the B sampled ids, a device tensor (no copy) or a list. One device-to-host transfer in all.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, vocab), got shape {tuple(logits.shape)}")
    batch = logits.shape[0]
    if len(num_top) != batch or len(token_ids) != batch:
        raise ValueError(f"{batch} rows of logits but {len(token_ids)} token ids and {len(num_top)} counts")
    rows = [i for i, k in enumerate(num_top) if k is not None]
    for i in rows:
        check_num_top(num_top[i])
    out: list[TokenLogprobs | None] = [None] * batch
    if not rows:
        return out
    device = logits.device
    ids = torch.as_tensor(token_ids, dtype=torch.int64).to(device, non_blocking=True)
    if len(rows) < batch:  # only the rows that ask pay for the log_softmax
        index = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
        logits, ids = logits.index_select(0, index), ids.index_select(0, index)
    ks = [num_top[i] for i in rows]
    packed = _pack(logits, ids, max(ks))
    for row, k, values in zip(rows, ks, packed.tolist()):  # the one transfer
        out[row] = _unpack(values, k)
    return out


def prompt_logprobs(logits: torch.Tensor, token_ids: torch.Tensor | Sequence[int],
                    num_top: int = 0) -> list[TokenLogprobs | None]:
    """The log-probability of each prompt token given the tokens before it (``echo``).

    ``logits``: (T, vocab), row t computed at prompt position t (what follows token t) by the
    prefill; ``token_ids``: the T prompt tokens. Returns T entries: None for the first token
    (nothing precedes it, as OpenAI and vLLM answer), then token t's log-probability from row
    t - 1, with its rank and ``num_top`` alternatives.
    """
    check_num_top(num_top, "logprobs")
    if logits.dim() != 2 or logits.shape[0] != len(token_ids):
        raise ValueError(f"prompt logits must be (T, vocab) for T = {len(token_ids)} prompt tokens, "
                         f"got shape {tuple(logits.shape)}")
    if len(token_ids) < 2:
        return [None] * len(token_ids)
    ids = torch.as_tensor(token_ids, dtype=torch.int64)[1:]
    following = token_logprobs(logits[:-1], ids, [num_top] * (len(token_ids) - 1))
    return [None, *following]


def logits_rows(query_lens: Sequence[int], all_positions: Sequence[bool]) -> tuple[list[int], list[tuple[int, int]]]:
    """Which rows of a packed prefill's hidden states to turn into logits.

    A request that asks for prompt log-probabilities needs every position's logits, any other only
    its last one. Returns (indices into the packed hidden states, per request (start, length) of its
    rows among those logits): a request's next-token logits are always its last row there.
    """
    indices: list[int] = []
    spans: list[tuple[int, int]] = []
    start = 0
    for n, every in zip(query_lens, all_positions, strict=True):
        wanted = range(start, start + n) if every else range(start + n - 1, start + n)
        spans.append((len(indices), len(wanted)))
        indices.extend(wanted)
        start += n
    return indices, spans


def _pack(logits: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """(R, vocab) logits, (R,) chosen ids -> (R, 3 + 2k) float64 rows [id, logprob, rank, k top
    logprobs, k top ids] (ids and ranks are exact in float64)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, ids[:, None])  # (R, 1)
    rank = (logprobs > chosen).sum(-1, keepdim=True) + 1
    parts = [ids[:, None].double(), chosen.double(), rank.double()]
    if k:
        top_values, top_ids = logprobs.topk(k, dim=-1)
        parts += [top_values.double(), top_ids.double()]
    return torch.cat(parts, dim=1).cpu()


def _unpack(values: list[float], k: int) -> TokenLogprobs:
    """A row of ``_pack`` -> the row's token and its first ``k`` alternatives."""
    width = (len(values) - 3) // 2
    top_values, top_ids = values[3:3 + width], values[3 + width:]
    return TokenLogprobs(token_id=int(values[0]), logprob=values[1], rank=int(values[2]),
                         top=[(int(top_ids[j]), top_values[j]) for j in range(k)])
