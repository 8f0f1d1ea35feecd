"""What the API's per-request features cost a decode step: logprobs and a JSON-schema mask.

Times ``ModelRunner.execute`` decode steps of one batch (default 32 sequences of 512 tokens of
context) in each mode, the same sequences and pages every time:

- ``greedy``: no feature (on CUDA the argmax runs inside the decode graph);
- ``sampled``: temperature 1 (the logits come back to the sampler: the baseline of the rest);
- ``logprobs``: greedy, plus each token's logprob and its top ``--top-logprobs`` alternatives;
- ``json``: greedy under a JSON schema for every row (fill the batch bitmask on the host with
  xgrammar, apply it on the device, each matcher takes its token); a matcher whose answer is
  complete starts over, so every step is masked;
- ``json+logprobs``: both.

It prints and writes (``--output-json``) the median step time of each mode and its overhead over
``greedy`` and ``sampled``. The target on a GPU: ``logprobs`` and ``json`` at most 10 % slower
than the step without them.

    python -m benchmark.serve.bench_api_features --model /models/Llama-3.1-8B-Instruct --output-json log/api.json
    python -m benchmark.serve.bench_api_features --device cpu --batch 4 --context 64 --steps 5   # smoke run

``--model``: a short name, folder or GGUF with a tokenizer (default: the embedded SmolLM2-135M; on a
GPU its steps are short, so the host-side costs weigh more than with a larger model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmark.engine.bench_gpu import GREEDY, Ours, check_device
from benchmark.engine.bench_offline import environment
from muxserve.engine.llm_engine import EngineConfig, LLMEngine
from muxserve.engine.model_config import end_token_ids
from muxserve.engine.structured import GuidedSpec, grammar_cache_for
from muxserve.ipc.runtime import Phase

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
    "kind": {"enum": ["book", "film", "song"]}, "score": {"type": "number"}},
    "required": ["name", "age", "tags", "kind", "score"]}
MODES = ("greedy", "sampled", "logprobs", "json", "json+logprobs")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="short name, model folder or .gguf, with a tokenizer (default: smollm2-135m)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda (default; the numbers that count) or cpu (a smoke run of the script)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="weights and KV dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--batch", type=int, default=32, help="sequences per decode step (default: 32)")
    p.add_argument("--context", type=int, default=512, help="context tokens of each sequence (default: 512)")
    p.add_argument("--steps", type=int, default=50, help="timed decode steps per mode (default: 50)")
    p.add_argument("--warmup", type=int, default=5,
                   help="untimed steps first in each mode (graph capture, torch.compile of the mask; default: 5)")
    p.add_argument("--top-logprobs", type=int, default=5, help="alternatives per token in the logprobs modes "
                                                                 "(0-20, default: 5)")
    p.add_argument("--schema", default=None,
                   help="a JSON schema file for the json modes (default: a flat object of five fields)")
    p.add_argument("--kv-cache-gb", type=float, default=None,
                   help="KV pool size in GiB (default: what the batch needs, plus room)")
    p.add_argument("--eager", action="store_true", help="no CUDA graphs (every mode runs eagerly)")
    p.add_argument("--output-json", default=None, help="write the results here as JSON")
    return p


def _params(mode: str, top: int):
    params = GREEDY
    if mode == "sampled":
        params = dataclasses.replace(params, temperature=1.0, seed=1)
    if "logprobs" in mode:
        params = dataclasses.replace(params, logprobs=top)
    return params


def time_mode(bench: Ours, mode: str, args, spec: GuidedSpec, grammars, vocab: int) -> list[float]:
    """Wall times (s) of ``args.steps`` decode steps of ``mode`` (after ``args.warmup`` untimed ones)."""
    seqs = bench.make_seqs([args.context] * args.batch, args.steps + args.warmup + 8, vocab,
                           _params(mode, args.top_logprobs))
    guided = mode.startswith("json")
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    try:
        times = []
        for i in range(args.warmup + args.steps):
            if guided:
                for s in seqs:
                    if s.matcher is None or s.matcher.finished:
                        s.matcher = grammars.matcher(spec)  # a complete answer starts over
            sync()
            start = time.perf_counter()
            out = bench.runner.execute(seqs, Phase.DECODE)
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
            for s, t in zip(seqs, out.tokens):
                s.output_token_ids.append(t)
        return times
    finally:
        bench.free(seqs)


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    check_device(p, args.device)
    if args.batch < 1 or args.context < 2 or args.steps < 1 or args.warmup < 0:
        p.error("--batch and --steps must be >= 1, --context >= 2, --warmup >= 0")
    if not 0 <= args.top_logprobs <= 20:
        p.error(f"--top-logprobs must be in [0, 20], got {args.top_logprobs}")
    schema = SCHEMA if args.schema is None else json.loads(Path(args.schema).read_text())
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    max_len = args.context + args.steps + args.warmup + 64
    kv = args.kv_cache_gb
    config = EngineConfig(model=args.model, dtype=dtype, device=args.device, max_num_seqs=max(args.batch, 8),
                          max_model_len=max_len, enforce_eager=args.eager,
                          **({"kv_cache_bytes": int(kv * 1024**3)} if kv else {}))
    engine = LLMEngine(config)
    bench = Ours.on_engine(engine)
    vocab = engine.spec.vocab_size
    grammars = grammar_cache_for(engine.folder, vocab, end_token_ids(engine.folder, engine.spec))
    spec = GuidedSpec.json_schema(schema)
    grammars.compile(spec)
    results = {}
    for mode in MODES:
        times = time_mode(bench, mode, args, spec, grammars, vocab)
        results[mode] = {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
                         "steps": len(times)}
        print(f"{mode:>14}: median {results[mode]['median_ms']:8.3f} ms  min {results[mode]['min_ms']:8.3f} ms",
              flush=True)
    for mode in MODES:
        for base in ("greedy", "sampled"):
            results[mode][f"overhead_vs_{base}_pct"] = 100 * (results[mode]["median_ms"] /
                                                              results[base]["median_ms"] - 1)
    print("overhead vs greedy / vs sampled: " + ", ".join(
        f"{m} {results[m]['overhead_vs_greedy_pct']:+.1f} % / {results[m]['overhead_vs_sampled_pct']:+.1f} %"
        for m in MODES[2:]))
    if args.output_json:
        doc = {"benchmark": "api_features_decode_step", "model": args.model, "device": args.device, "dtype": dtype,
               "batch": args.batch, "context": args.context, "top_logprobs": args.top_logprobs, "schema": schema,
               "cuda_graphs": engine.runner.graphs is not None, "modes": results,
               "environment": environment(args.device), "command": " ".join(sys.argv)}
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
