"""Incremental detokenization with stop strings, for streaming and non-streaming answers alike.

Tokens arrive one at a time. Decoding each alone would split multi-byte characters (a byte-level
BPE token may hold half of an emoji) and lose the spaces that SentencePiece attaches to a
neighbour, so, as vLLM does, each step decodes a short window (from ``prefix_offset``) with and
without the new token and releases the difference only when it does not end in U+FFFD, the mark
of an incomplete character. The window starts inside the prompt so the first token decodes in
context.

Stop strings: the text is cut right before the first stop string; while streaming, the last
``max(len(stop)) - 1`` characters are held back, since they may be the start of a stop string.
The non-streaming answer is built from the same deltas, so the two always agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

INITIAL_CONTEXT = 5  # prompt tokens decoded with the first output token
_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    """Feed generated token ids with :meth:`add`; each call returns the text that may be released.

    ``tokenizer`` may be None (a model folder without one): every delta is then empty.
    """

    def __init__(self, tokenizer: Any | None, prompt_token_ids: Sequence[int] = (),
                 stop: Sequence[str] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-INITIAL_CONTEXT:]) if tokenizer is not None else []
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self.stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # every character decoded so far, cut before a stop string once found
        self._released = 0  # characters of ``text`` already returned
        self.stopped = False  # a stop string was found: the request is over
        self.matched: str | None = None  # the stop string that ended it

    def add(self, token_id: int) -> str:
        """Take one generated token; return the new text that is safe to send."""
        if self.stopped:
            return ""
        if self.tokenizer is not None:
            self._ids.append(token_id)
            self._append(self._decode_new(final=False))
        return self._release(final=self.stopped)

    def flush(self) -> str:
        """The request ended: release everything, an incomplete character included (as decode() shows it)."""
        if not self.stopped and self.tokenizer is not None:
            self._append(self._decode_new(final=True))
        return self._release(final=True)

    # -- internals ------------------------------------------------------------------------------
    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_new(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or (new_text.endswith(_INCOMPLETE) and not final):
            return ""  # nothing new yet, or half a character: wait for the next token
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text):]

    def _append(self, delta: str) -> None:
        if not delta:
            return
        start = len(self.text)
        self.text += delta
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, max(0, start - len(s) + 1))) >= 0]
        if hits:
            cut, self.matched = min(hits, key=lambda hit: hit[0])
            self.text = self.text[:cut]
            self.stopped = True

    def _release(self, final: bool) -> str:
        end = len(self.text) if final else max(self._released, len(self.text) - self._hold)
        out = self.text[self._released:end]
        self._released = end
        return out
