"""Several choices per request (``n``, ``best_of``) and log-probabilities as OpenAI writes them.

``n`` choices are ``n`` sequences in the engine, seeded ``seed``, ``seed + 1``, ... (wrapping in the
signed 64-bit range) so the same request gives the same choices; without a seed each choice draws
its own random seed. ``best_of`` generates that many and answers the ``n`` of highest cumulative
log-probability (of the raw distribution, as the logprobs are).

Completions: ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` (``top_logprobs`` a
dict token -> logprob per position; the first prompt token of ``echo`` has None). Chat:
``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}``.
A token's text is its own decoding; ``-inf`` is written -9999.0 (JSON has no infinity), as vLLM does.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

from muxserve.engine.logprobs import TokenLogprobs
from muxserve.engine.sampling_params import SEED_MAX, SEED_MIN

_SPAN = SEED_MAX - SEED_MIN + 1


def choice_seeds(seed: int | None, count: int) -> list[int | None]:
    """The seed of each of ``count`` choices: one choice keeps ``seed``."""
    if count == 1:
        return [seed]
    if seed is None:
        return [random.randint(SEED_MIN, SEED_MAX) for _ in range(count)]
    return [(seed + i - SEED_MIN) % _SPAN + SEED_MIN for i in range(count)]


def cumulative_logprob(entries: Sequence[TokenLogprobs | None]) -> float:
    return sum(e.logprob for e in entries if e is not None)


def best_indices(scores: Sequence[float], n: int) -> list[int]:
    """The indices of the ``n`` highest scores, best first (ties: the earlier choice)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:n]


def _finite(value: float) -> float:
    return max(value, -9999.0) if not math.isnan(value) else -9999.0


class TokenText:
    """Each token's own text, as logprobs show it (``token_id:N`` without a tokenizer, as vLLM)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            if self.tokenizer is None:
                text = f"token_id:{token_id}"
            else:
                text = self.tokenizer.decode([token_id])
            self._cache[token_id] = text
        return text


class CompletionLogprobs:
    """The ``logprobs`` object of one completion choice, built a token (or a chunk) at a time.

    ``offset``: where the first token's text starts in the choice's text (the prompt's length when it
    is echoed after it).
    """

    def __init__(self, text: TokenText, offset: int = 0):
        self.text = text
        self.offset = offset

    def chunk(self, items: Sequence[tuple[int, TokenLogprobs | None]]) -> dict[str, Any]:
        """``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` of ``(token id, its
        logprobs)`` pairs (None: a token without any, the first of an echoed prompt)."""
        tokens, values, tops, offsets = [], [], [], []
        for token_id, entry in items:
            token = self.text(token_id)
            tokens.append(token)
            offsets.append(self.offset)
            self.offset += len(token)
            if entry is None:
                values.append(None)
                tops.append(None)
            else:
                values.append(_finite(entry.logprob))
                tops.append({self.text(t): _finite(v) for t, v in entry.top})
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(text: TokenText, entries: Sequence[TokenLogprobs | None]) -> dict[str, Any]:
    """``{"content": [...]}`` of a chat choice (or of one chunk's tokens)."""
    content = []
    for e in entries:
        if e is None:
            continue
        token = text(e.token_id)
        content.append({"token": token, "logprob": _finite(e.logprob), "bytes": list(token.encode("utf-8")),
                        "top_logprobs": [{"token": text(t), "logprob": _finite(v),
                                          "bytes": list(text(t).encode("utf-8"))} for t, v in e.top]})
    return {"content": content}
