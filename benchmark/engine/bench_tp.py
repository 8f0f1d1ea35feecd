#!/usr/bin/env python
"""Tensor parallelism of one model: decode and prefill speed per TP size, and greedy agreement with TP=1.

For each ``--tp`` size, ``tp`` processes (one per GPU, NCCL; gloo on CPU) each build their shard
of a random-weight model shape (``examples/shapes/<shape>``, bf16) as FlexStore would (every
rank's weights are its slice of the same whole random model, so TP sizes compute the same
function) and run one ``LLMEngine``. Measured on every rank alike, reported by rank 0:

- decode step latency (wall time of ``ModelRunner.step``, host work and sampling included) per
  batch at ``--ctx`` tokens of context, with CUDA graphs unless ``--eager``;
- prefill time of one ``--prefill`` token prompt;
- greedy tokens of a few random prompts, compared with TP=1's: how many match exactly and the
  mean length of the common prefix (bf16 all-reduces sum in another order than one GPU's matmul,
  so near-ties may flip late tokens; exact parity is tested on tiny fp32 models).

Example: python -m benchmark.engine.bench_tp --shape llama-3-8b --tp 1 2 4 --output-json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmark.engine import bench_gpu
from muxserve.engine.llm_engine import EngineConfig, LLMEngine
from muxserve.engine.model_config import ModelSpec
from muxserve.engine.parallel import SINGLE, join_group
from muxserve.engine.sampling_params import SamplingParams

GiB = 1024**3
PARITY_PROMPT_LENS = (16, 64, 200, 500)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_gpu.add_shape_argument(p)
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="TP sizes to run (default: 1 2)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64], help="decode batch sizes")
    p.add_argument("--ctx", type=int, default=512, help="context tokens of each decoding sequence (default: 512)")
    p.add_argument("--prefill", type=int, default=2048, help="prompt tokens of the prefill measurement")
    p.add_argument("--parity-tokens", type=int, default=64, help="greedy tokens per parity prompt (default: 64)")
    p.add_argument("--kv-cache-gb", type=float, default=8.0, help="KV pool per rank in GiB (default: 8)")
    p.add_argument("--eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--hang-dump-s", type=float, default=300,
                   help="a rank still running after this many seconds prints every thread's stack and exits")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: gloo ranks, float32, a dry run of the script on a tiny shape")
    p.add_argument("--output-json", help="write the results here (and a .md table next to it)")
    args = p.parse_args(argv)
    folder = bench_gpu.parsed_shape(p, args.shape)
    args.folder = str(folder)
    context = ModelSpec.from_folder(folder).max_position_embeddings
    if args.ctx + 64 > context or args.prefill + 8 > context:
        p.error(f"--ctx {args.ctx} / --prefill {args.prefill} do not fit the context of {args.shape} "
                f"({context} tokens, with room for the timed steps)")
    bench_gpu.check_device(p, args.device)
    if args.device == "cuda":
        count = torch.cuda.device_count()
        too_big = [t for t in args.tp if t > count]
        if too_big:
            p.error(f"--tp {too_big} need more GPUs than the {count} visible")
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log(rank: int, tp: int, msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} tp{tp} rank{rank}] {msg}", file=sys.stderr, flush=True)


def _rank_main(rank: int, tp: int, port: int, args: argparse.Namespace, out: str) -> None:
    import faulthandler

    faulthandler.dump_traceback_later(args.hang_dump_s, exit=True)  # a stuck collective shows where it hangs
    torch.manual_seed(0)  # every rank draws the same prompts
    bench_gpu.DEV = args.device
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    dtype_name = "bfloat16" if args.device == "cuda" else "float32"
    dtype = getattr(torch, dtype_name)
    parallel = join_group(tp, rank, f"tcp://127.0.0.1:{port}", device) if tp > 1 else SINGLE
    _log(rank, tp, "joined the group")
    try:
        model, spec = bench_gpu.random_model(Path(args.folder), dtype, device, parallel)
        _log(rank, tp, "weights ready")
        config = EngineConfig(model=args.folder, dtype=dtype_name, device=str(device),
                              kv_cache_bytes=int(args.kv_cache_gb * GiB), max_num_seqs=max(args.batches),
                              max_model_len=max(args.ctx + 64, args.prefill + 8, max(PARITY_PROMPT_LENS) + 72),
                              tensor_parallel_size=tp, enforce_eager=args.eager)
        engine = LLMEngine(config, model=model, parallel=parallel)
        _log(rank, tp, "engine ready")
        bench = bench_gpu.Ours.on_engine(engine)
        result = {"tp": tp, "cuda_graphs": engine.runner.graphs is not None, "decode_ms": {}}
        for batch in args.batches:
            result["decode_ms"][str(batch)] = bench.decode_latency(batch, args.ctx, spec.vocab_size) * 1e3
            _log(rank, tp, f"decode batch {batch}: {result['decode_ms'][str(batch)]:.2f} ms")
        result["prefill_ms"] = bench.prefill_time([args.prefill], spec.vocab_size) * 1e3
        _log(rank, tp, f"prefill {result['prefill_ms']:.1f} ms")
        result["parity_tokens"] = _greedy(engine, spec.vocab_size, args.parity_tokens)
        faulthandler.cancel_dump_traceback_later()
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    except BaseException:
        if tp > 1:  # leave without NCCL teardown (below), but as a failure
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        raise
    if tp > 1:
        # NCCL teardown with decode graphs (holding the communicator's kernels) still alive can
        # block; the rank is done, so it leaves without it.
        sys.stderr.flush()
        os._exit(0)


def _greedy(engine: LLMEngine, vocab: int, max_tokens: int) -> list[list[int]]:
    room = engine.max_model_len - max_tokens - 1
    prompts = [torch.randint(256, vocab, (min(n, room),)).tolist() for n in PARITY_PROMPT_LENS]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    seqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    return [list(s.output_token_ids) for s in seqs]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run(args: argparse.Namespace) -> dict:
    import torch.multiprocessing as mp

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for tp in args.tp:
            out = f"{tmp}/tp{tp}.json"
            t0 = time.perf_counter()
            mp.spawn(_rank_main, args=(tp, _free_port(), args, out), nprocs=tp, join=True)
            results.append(json.loads(Path(out).read_text()))
            print(f"tp {tp}: decode ms {results[-1]['decode_ms']}, prefill {results[-1]['prefill_ms']:.2f} ms "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    reference = next((r for r in results if r["tp"] == 1), None)
    for r in results:
        if reference is not None:
            pairs = list(zip(reference["parity_tokens"], r["parity_tokens"]))
            r["parity"] = {"prompts": len(pairs), "exact": sum(a == b for a, b in pairs),
                           "mean_common_prefix": statistics.mean(_common_prefix(a, b) for a, b in pairs),
                           "tokens_per_prompt": args.parity_tokens}
    return {"shape": Path(args.folder).name, "device": _device_name(args), "ctx": args.ctx,
            "prefill_tokens": args.prefill, "command": "python " + shlex.join(sys.argv), "results": results}


def _device_name(args) -> str:
    if args.device != "cuda":
        return "cpu"
    return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}; torch {torch.__version__}"


def markdown(report: dict) -> str:
    res = report["results"]
    base = next((r for r in res if r["tp"] == 1), res[0])
    batches = list(base["decode_ms"])
    lines = [f"# Tensor parallelism: {report['shape']} (random weights)", "",
             f"- device: {report['device']}", f"- command: `{report['command']}`", "",
             f"Decode step latency (ms) at {report['ctx']} tokens of context, and prefill of one "
             f"{report['prefill_tokens']}-token prompt (speed-up vs TP={base['tp']} in brackets):", "",
             "| TP | CUDA graphs | " + " | ".join(f"decode b{b}" for b in batches) + " | prefill |",
             "|---:|---|" + "---:|" * (len(batches) + 1)]
    for r in res:
        cells = [f"{r['decode_ms'][b]:.2f} ({base['decode_ms'][b] / r['decode_ms'][b]:.2f}x)" for b in batches]
        cells.append(f"{r['prefill_ms']:.1f} ({base['prefill_ms'] / r['prefill_ms']:.2f}x)")
        lines.append(f"| {r['tp']} | {'yes' if r['cuda_graphs'] else 'no'} | " + " | ".join(cells) + " |")
    parity = [r for r in res if "parity" in r and r["tp"] != 1]
    if parity:
        lines += ["", "Greedy agreement with TP=1:", ""]
        for r in parity:
            p = r["parity"]
            lines.append(f"- TP={r['tp']}: {p['exact']}/{p['prompts']} prompts identical over "
                         f"{p['tokens_per_prompt']} tokens; mean common prefix {p['mean_common_prefix']:.1f} tokens")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    report = run(args)
    text = markdown(report)
    print(text)
    if args.output_json:
        path = Path(args.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))
        path.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
