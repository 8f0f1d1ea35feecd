"""Structured outputs: grammars that constrain decoding, as a per-request mask of the logits.

A request asks for a JSON object, a JSON schema, a regular expression or one of fixed choices
(``GuidedSpec``, built from OpenAI's ``response_format`` or vLLM's ``guided_*`` fields by
``muxserve.server.structured_request``). ``GrammarCache`` compiles each spec once per tokenizer with
xgrammar and keeps the result; a ``GuidedMatcher`` follows one request through its generated
tokens. Before each sampling step ``fill_bitmask`` writes one row of a (B, ceil(vocab/32)) int32
bitmask per request on the host (rows of unconstrained requests allow everything), and the sampler
calls ``mask_logits``, which sets the forbidden logits to -inf on the logits' device for the whole
batch at once.

Why xgrammar: it had the cheapest per-step mask of the three libraries measured (xgrammar,
llguidance, outlines-core; ``benchmark/results/structured_output_cpu.md``), compiles a schema in a
few milliseconds, handles recursive JSON (``json_object``) and ships CPU wheels. Its own CPU apply
kernel was slower than a compiled torch one, so the apply is ours (the same code on CPU and GPU).

A matcher is a function of (spec, tokens generated so far): ``advance`` takes the whole output and
accepts only the tokens it has not seen, so a prefill runtime, a decode runtime (another process)
and a request recomputed after preemption all reach the same state without shipping it.

JSON is generated compact with OpenAI's separators (``", "``, ``": "``): allowing any whitespace
lets small models loop on newlines until ``max_tokens``, and the output would not parse.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

KINDS = ("json_object", "json_schema", "regex", "choice", "tagged_json", "grammar")


class GrammarError(ValueError):
    """A spec that cannot be compiled; ``param`` is the request field that holds it (a 400)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GuidedSpec:
    """What a request's output must match: the cache key and what travels to the runtimes.

    kind: ``json_object`` (any JSON object), ``json_schema`` (``text`` is the schema as JSON),
    ``regex`` (``text`` is the expression), ``choice`` (``text`` is a JSON list of strings, the
    output is exactly one of them) or ``tagged_json`` (``text`` is JSON ``{"begin", "schema",
    "end"}``: the literal ``begin``, a JSON value of ``schema``, then ``end``; tool calls) or
    ``grammar`` (``text`` is an EBNF grammar whose start rule is ``root``).
    param: the request field it came from, named in errors (not part of the key).
    """

    kind: str
    text: str = ""
    param: str = "response_format"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"guided decoding kind must be one of {', '.join(KINDS)}, got {self.kind!r}")

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.text

    def to_wire(self) -> list[str]:
        """A msgpack-friendly form for the job messages of the runtimes."""
        return [self.kind, self.text, self.param]

    @classmethod
    def from_wire(cls, wire: Sequence[str]) -> GuidedSpec:
        return cls(*wire)

    @classmethod
    def json_schema(cls, schema: Any, param: str = "response_format") -> GuidedSpec:
        """``schema``: a dict, a bool or its JSON text; ValueError naming ``param`` if it is none."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise GrammarError(f"{param} must be a JSON schema, got text that is not JSON: {exc}", param) from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"{param} must be a JSON schema (an object), got {type(schema).__name__}", param)
        # Keys keep their order: the output writes properties in the schema's order.
        return cls("json_schema", json.dumps(schema, ensure_ascii=False), param)

    @classmethod
    def regex(cls, pattern: Any, param: str = "guided_regex") -> GuidedSpec:
        if not isinstance(pattern, str) or not pattern:
            raise GrammarError(f"{param} must be a non-empty string, got {pattern!r}", param)
        return cls("regex", pattern, param)

    @classmethod
    def grammar(cls, text: Any, param: str = "guided_grammar") -> GuidedSpec:
        if not isinstance(text, str) or not text.strip():
            raise GrammarError(f"{param} must be a non-empty EBNF grammar, got {text!r}", param)
        return cls("grammar", text, param)

    @classmethod
    def choice(cls, choices: Any, param: str = "guided_choice") -> GuidedSpec:
        if (not isinstance(choices, list) or not choices
                or not all(isinstance(c, str) and c for c in choices)):
            raise GrammarError(f"{param} must be a non-empty list of non-empty strings, got {choices!r}", param)
        return cls("choice", json.dumps(choices, ensure_ascii=False), param)

    @classmethod
    def tagged_json(cls, begin: str, schema: dict, end: str, param: str = "tool_choice") -> GuidedSpec:
        text = json.dumps({"begin": begin, "schema": schema, "end": end}, ensure_ascii=False)
        return cls("tagged_json", text, param)


_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def _reason(exc: Exception) -> str:
    """xgrammar's message without its log prefix (time, source file and line)."""
    return _LOG_PREFIX.sub("", str(exc).strip()).strip()


def _literal(text: str) -> str:
    """``text`` as an EBNF string literal (JSON's escapes are EBNF's)."""
    return json.dumps(text, ensure_ascii=False)


class GrammarCache:
    """Compiled grammars of one tokenizer, by spec, most recently used kept.

    ``vocab_size``: the model's (its logits' width, which may exceed the tokenizer's); tokens past
    the tokenizer are never allowed. ``stop_token_ids``: the model's EOS ids; a grammar allows
    them only where the output is complete.
    """

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Iterable[int], max_entries: int = 256,
                 max_threads: int = 4):
        import xgrammar

        self._xgr = xgrammar
        self.vocab_size = vocab_size
        stop = sorted(set(stop_token_ids))
        # No EOS ids (a model without any): the tokenizer's own, as xgrammar finds them.
        self.info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                            stop_token_ids=stop or None)
        self.stop_token_ids = sorted(self.info.stop_token_ids)
        self._compiler = xgrammar.GrammarCompiler(self.info, max_threads=max_threads, cache_enabled=False)
        self._entries: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()  # the server compiles on a worker thread
        self.max_entries = max_entries
        self.compilations = 0  # grammars compiled (not found in the cache)

    def compile(self, spec: GuidedSpec):
        """The compiled grammar of ``spec``; ``GrammarError`` naming ``spec.param`` if it has none."""
        with self._lock:
            if spec.key in self._entries:
                self._entries.move_to_end(spec.key)
                return self._entries[spec.key]
        try:
            compiled = self._compile(spec)
        except GrammarError:
            raise
        except Exception as exc:
            raise GrammarError(f"{spec.param} could not be compiled into a grammar: {_reason(exc)}",
                               spec.param) from None
        with self._lock:
            self.compilations += 1
            self._entries[spec.key] = compiled
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return compiled

    def matcher(self, spec: GuidedSpec) -> GuidedMatcher:
        return GuidedMatcher(self._xgr.GrammarMatcher(self.compile(spec)), self.stop_token_ids, self.vocab_size)

    def _compile(self, spec: GuidedSpec):
        c, xgr = self._compiler, self._xgr
        if spec.kind == "json_object":
            # Any JSON object (OpenAI's json_object mode), compact like the schemas.
            return c.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if spec.kind == "json_schema":
            return c.compile_json_schema(spec.text, any_whitespace=False, strict_mode=True)
        if spec.kind == "regex":
            return c.compile_regex(spec.text)
        if spec.kind == "grammar":
            return c.compile_grammar(spec.text)
        if spec.kind == "choice":
            return c.compile_grammar("root ::= " + " | ".join(_literal(s) for s in json.loads(spec.text)))
        parts = json.loads(spec.text)
        pieces = [xgr.Grammar.from_json_schema(json.dumps(parts["schema"]), any_whitespace=False, strict_mode=True)]
        if parts["begin"]:
            pieces.insert(0, xgr.Grammar.from_ebnf(f"root ::= {_literal(parts['begin'])}"))
        if parts["end"]:
            pieces.append(xgr.Grammar.from_ebnf(f"root ::= {_literal(parts['end'])}"))
        return c.compile_grammar(xgr.Grammar.concat(*pieces) if len(pieces) > 1 else pieces[0])


_caches: dict[tuple[str, int], GrammarCache] = {}
_caches_lock = threading.Lock()


def grammar_cache_for(folder, vocab_size: int, stop_token_ids: Iterable[int]) -> GrammarCache:
    """The process's ``GrammarCache`` of the tokenizer in model folder ``folder`` (made once)."""
    key = (str(folder), vocab_size)
    with _caches_lock:
        cache = _caches.get(key)
        if cache is None:
            from transformers import AutoTokenizer

            cache = _caches[key] = GrammarCache(AutoTokenizer.from_pretrained(folder), vocab_size, stop_token_ids)
        return cache


class GuidedMatcher:
    """Where one request stands in its grammar."""

    def __init__(self, matcher, stop_token_ids: Sequence[int], vocab_size: int):
        self._m = matcher
        self._stop = list(stop_token_ids)
        self._vocab = vocab_size
        self.num_accepted = 0  # generated tokens taken so far
        self.finished = False  # the output is complete: a stop token was taken, or only one may follow

    def accept(self, token_id: int) -> None:
        """Take the next generated token; ValueError if the grammar forbids it (a mask not applied)."""
        if not self._m.accept_token(token_id):
            raise ValueError(f"token {token_id} is not allowed by the grammar after {self.num_accepted} tokens")
        self.num_accepted += 1
        self.finished = self._m.is_terminated() or (self._m.is_completed() and self._only_stop_follows())

    def advance(self, output_token_ids: Sequence[int]) -> None:
        """Take the tokens of ``output_token_ids`` (every token generated so far) not taken yet."""
        for token in output_token_ids[self.num_accepted:]:
            self.accept(token)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into ``bitmask[row]`` (int32 words, host memory)."""
        self._m.fill_next_token_bitmask(bitmask, row)

    def _only_stop_follows(self) -> bool:
        mask = torch.empty((1, bitmask_width(self._vocab)), dtype=torch.int32)
        self.fill(mask, 0)
        for t in self._stop:  # clear the stop tokens' bits: is anything else left?
            mask[0, t // 32] &= ~(1 << (t % 32))
        return not bool(mask.any())


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allocate_bitmask(batch: int, vocab_size: int) -> torch.Tensor:
    """A (batch, ceil(vocab/32)) int32 host bitmask allowing every token (pinned when CUDA is there,
    so the copy to the device does not wait)."""
    return torch.full((batch, bitmask_width(vocab_size)), -1, dtype=torch.int32,
                      pin_memory=torch.cuda.is_available())


_batch_matcher = None


def fill_bitmask(matchers: Sequence[GuidedMatcher | None], vocab_size: int) -> torch.Tensor | None:
    """The bitmask of a step: row i from ``matchers[i]``, all tokens allowed where it is None.
    None when no row is constrained (the sampler then skips the mask). The rows are filled by
    xgrammar's batched fill, on its threads."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return None
    global _batch_matcher
    if _batch_matcher is None:
        import xgrammar

        _batch_matcher = xgrammar.BatchGrammarMatcher()
    bitmask = allocate_bitmask(len(matchers), vocab_size)
    _batch_matcher.batch_fill_next_token_bitmask([matchers[i]._m for i in rows], bitmask, rows)
    return bitmask


def mask_logits(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``logits`` (B, vocab) with every token whose bit is 0 in ``bitmask`` (B, ceil(vocab/32))
    set to -inf; a new tensor, so the raw logits stay for log-probabilities. Runs on the logits'
    device for the whole batch (the bitmask is copied there once).

    The unpacking and the fill are fused by ``torch.compile`` (C++ on CPU, Triton on GPU; about
    12x faster than eager on CPU at batch 32, ``benchmark/results/structured_output_cpu.md``); the
    first call compiles (seconds). Where compiling fails (no C++ compiler) the eager code runs.
    """
    global _mask_impl
    words = bitmask.to(logits.device, non_blocking=True)
    if _mask_impl is None:
        try:
            compiled = torch.compile(_mask_eager, dynamic=True)
            compiled(logits[:1], words[:1])
            _mask_impl = compiled
        except Exception as exc:
            logger.warning("torch.compile of the logits mask failed (%s: %s); using eager torch",
                           type(exc).__name__, exc)
            _mask_impl = _mask_eager
    return _mask_impl(logits, words)


def _mask_eager(logits: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    # Word w, bit j is token 32 w + j: repeat each word 32 times, shift by [0..31, 0..31, ...].
    shifts = torch.arange(32, dtype=torch.int32, device=words.device).repeat(words.shape[1])
    bits = (words.repeat_interleave(32, dim=1) >> shifts) & 1
    return logits.masked_fill(bits[:, :logits.shape[1]] == 0, float("-inf"))


_mask_impl = None
