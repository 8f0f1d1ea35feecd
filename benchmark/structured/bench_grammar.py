"""Structured-output libraries compared on one tokenizer: xgrammar, llguidance, outlines-core.

For each library and JSON schema: the one-time cost (tokenizer preparation, grammar compilation),
the per-step cost of one request (fill its row of the token bitmask, then accept the token) while
decoding a valid answer token by token, the same for a batch of requests (each library's batched
fill where it has one), and the cost of applying a (B, words) bitmask to (B, vocab) logits.

    python -m benchmark.structured.bench_grammar --batch 32 --out log/grammar.json

Runs on CPU; ``--device cuda`` also times the apply on the GPU (the masks are filled on the host).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from importlib.metadata import version

import torch

SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                              "member": {"type": "boolean"}},
             "required": ["name", "age", "member"]},
    "nested": {"type": "object", "properties": {
        "id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
        "kind": {"enum": ["book", "film", "song"]},
        "author": {"type": "object", "properties": {"first": {"type": "string"}, "last": {"type": "string"},
                                                    "born": {"type": "number"}},
                   "required": ["first", "last"]}},
        "required": ["id", "tags", "kind", "author"]},
    "wide": {"type": "object", "properties": {f"field_{i}": {"type": ["string", "integer", "null"]}
                                              for i in range(24)},
             "required": [f"field_{i}" for i in range(0, 24, 2)]},
}
INSTANCES = {
    "flat": {"name": "Ada Lovelace", "age": 36, "member": True},
    "nested": {"id": 1843, "tags": ["analytical engine", "notes", "Bernoulli numbers"], "kind": "book",
               "author": {"first": "Ada", "last": "Lovelace", "born": 1815.12}},
    "wide": {f"field_{i}": (f"value {i}" if i % 3 == 0 else i if i % 3 == 1 else None) for i in range(24)},
}


def timed(fn, repeat: int = 1):
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return out, (time.perf_counter() - start) / repeat


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab: int):
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self.vocab = vocab

    def compile(self, schema):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def bitmask(self, batch):
        return self.xgr.allocate_token_bitmask(batch, self.vocab)

    def fill(self, matcher, bitmask, row):
        matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, matcher, token):
        assert matcher.accept_token(token), token

    def done(self, matcher):
        return matcher.is_completed()

    def fill_batch(self, matchers, bitmask):
        if not hasattr(self, "_batch"):
            self._batch = self.xgr.BatchGrammarMatcher(max_threads=os.cpu_count())
        self._batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def apply(self, logits, bitmask):
        self.xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True))


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab: int):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        self.executor = llguidance.LLExecutor(num_threads=os.cpu_count())
        self.vocab = vocab

    def compile(self, schema):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        message = self.ll.LLMatcher.validate_grammar(grammar, self.tokenizer)
        assert not message, message
        # llguidance builds its lexer lazily: the first mask is part of the preparation.
        matcher = self.matcher(grammar)
        matcher.compute_bitmask()
        return grammar

    def matcher(self, compiled):
        return self.ll.LLMatcher(self.tokenizer, compiled)

    def bitmask(self, batch):
        return self.ll.torch.allocate_token_bitmask(batch, self.vocab)

    def fill(self, matcher, bitmask, row):
        self.ll.torch.fill_next_token_bitmask(matcher, bitmask, row)

    def accept(self, matcher, token):
        assert matcher.consume_token(token), matcher.get_error()

    def done(self, matcher):
        return matcher.is_accepting()

    def fill_batch(self, matchers, bitmask):
        self.ll.torch.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def apply(self, logits, bitmask):
        self.ll.torch.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True))


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tokenizer, vocab: int):
        import outlines_core

        self.oc = outlines_core
        self.vocab = vocab
        self.vocabulary = outlines_core.Vocabulary(tokenizer.eos_token_id, _byte_tokens(tokenizer, vocab))

    def compile(self, schema):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def bitmask(self, batch):
        return torch.full((batch, (self.vocab + 31) // 32), -1, dtype=torch.int32)

    def fill(self, matcher, bitmask, row):
        view = bitmask[row]
        matcher.write_mask_into(view.data_ptr(), view.numel(), 4)

    def accept(self, matcher, token):
        matcher.advance(token, return_tokens=False)

    def done(self, matcher):
        return matcher.is_finished()

    def fill_batch(self, matchers, bitmask):
        for i, m in enumerate(matchers):  # no batched fill
            self.fill(m, bitmask, i)

    def apply(self, logits, bitmask):
        torch_apply(logits, bitmask.to(logits.device, non_blocking=True))  # its own kernel needs torch.compile


def _byte_tokens(tokenizer, vocab: int) -> dict:
    """{token text: [ids]} for outlines-core: byte-level BPE pieces decoded to their text."""
    decoder = {c: b for b, c in _bytes_to_unicode().items()}
    out: dict[str, list[int]] = {}
    special = set(tokenizer.all_special_ids)
    for token, i in tokenizer.get_vocab().items():
        if i >= vocab or i in special:
            continue
        text = bytes(decoder[c] for c in token).decode("utf-8", errors="replace")
        out.setdefault(text, []).append(i)
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-character map of byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def torch_apply(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """A plain torch apply: unpack the int32 words into bits, fill the forbidden logits with -inf."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).bool().flatten(1)[:, :logits.shape[1]]
    logits.masked_fill_(~allowed, float("-inf"))


def measure(lib, tokenizer, batch: int, devices: list[str]) -> dict:
    result = {"library": lib.name}
    for name, schema in SCHEMAS.items():
        tokens = tokenizer.encode(json.dumps(INSTANCES[name]), add_special_tokens=False)
        compiled, compile_s = timed(lambda: lib.compile(schema))
        # One request: fill then accept, token by token.
        matcher, bitmask = lib.matcher(compiled), lib.bitmask(1)
        fills = []
        for t in tokens:
            _, s = timed(lambda: lib.fill(matcher, bitmask, 0))
            fills.append(s)
            row = bitmask[0]
            assert (int(row[t // 32]) >> (t % 32)) & 1, f"{lib.name} forbids token {t} of a valid answer"
            lib.accept(matcher, t)
        assert lib.done(matcher), f"{lib.name}: the grammar is not complete after the whole answer"
        # A batch: every row at the same position of its own copy of the answer.
        matchers, bitmask = [lib.matcher(compiled) for _ in range(batch)], lib.bitmask(batch)
        batch_fills = []
        for t in tokens:
            _, s = timed(lambda: lib.fill_batch(matchers, bitmask))
            batch_fills.append(s)
            for m in matchers:
                lib.accept(m, t)
        result[name] = {"answer_tokens": len(tokens), "compile_ms": compile_s * 1e3,
                        "fill_us_mean": statistics.mean(fills) * 1e6,
                        "fill_us_p50": statistics.median(fills) * 1e6, "fill_us_max": max(fills) * 1e6,
                        f"batch{batch}_fill_ms_mean": statistics.mean(batch_fills) * 1e3}
    for device in devices:
        logits = torch.randn(batch, lib.vocab, device=device)
        bitmask = lib.bitmask(batch)
        bitmask[:, ::3] = 0
        lib.apply(logits.clone(), bitmask)  # warm-up (kernel compilation)
        work = logits.clone()

        def step():
            lib.apply(work, bitmask)
            if device != "cpu":
                torch.cuda.synchronize()

        _, s = timed(step, repeat=50)
        result[f"apply_b{batch}_{device}_us"] = s * 1e6
        from muxserve.engine.structured import mask_logits

        def ours():
            mask_logits(logits, bitmask)
            if device != "cpu":
                torch.cuda.synchronize()

        _, s = timed(ours, repeat=50)
        result[f"muxserve_mask_logits_b{batch}_{device}_us"] = s * 1e6
        ref = logits.clone()
        torch_apply(ref, bitmask.to(device))
        assert torch.equal(work, ref), f"{lib.name}: apply differs from the reference"
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m",
                        help="model whose tokenizer the grammars are built for (default: smollm2-135m)")
    parser.add_argument("--batch", type=int, default=32, help="requests per batched mask fill and apply (default: 32)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda also times the mask apply on the GPU (default: cpu)")
    parser.add_argument("--libraries", default="xgrammar,llguidance,outlines-core",
                        help="comma-separated grammar libraries to measure (default: all three)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from muxserve.engine.model_hub import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    vocab = len(tokenizer)
    devices = ["cpu"] + (["cuda"] if args.device == "cuda" else [])
    classes = {c.name: c for c in (XGrammar, LLGuidance, OutlinesCore)}
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "torch_threads": torch.get_num_threads(), "vocab": vocab, "batch": args.batch, "results": []}
    for name in args.libraries.split(","):
        lib, setup_s = timed(lambda: classes[name](tokenizer, vocab))
        res = measure(lib, tokenizer, args.batch, devices)
        res["version"] = version(name)
        res["tokenizer_setup_ms"] = setup_s * 1e3
        report["results"].append(res)
        print(json.dumps(res, indent=1), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
