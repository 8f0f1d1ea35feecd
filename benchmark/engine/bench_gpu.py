#!/usr/bin/env python
"""One-GPU engine benchmark next to the hardware's limits, with transformers as same-run baseline.

For each random-weight model shape (real shapes, bf16), in one process:

1. ceilings measured in this run: device-to-device copy bandwidth (bytes read + written) and a
   bf16 8192^3 matrix product;
2. transformers (sdpa): decode step latency per (batch, context), prefill time, and (``--e2e``)
   offline generation of the first ``--hf-e2e-requests`` requests as one batch;
3. muxserve (triton backend, CUDA graphs): decode step latency per (batch, context) measured as
   wall time of ``ModelRunner.step`` (host preparation, graph replay and sampling included),
   eager latency at a few points, prefill throughput, and (``--e2e``) offline throughput on
   ``--e2e-requests`` ShareGPT-like requests submitted at once;
4. (``--step-breakdown``) each decode point again with ``muxserve.engine.cuda_graph.StepTimer``:
   per step the host preparation before ``graph.replay()``, the graph's GPU time (CUDA events
   around the replay only), the replay call's host time, what follows the graph (token copy or
   sampling, synchronization) and the wall time; medians over ``--breakdown-steps`` steps.

Decode floor = (weight bytes read per step + KV bytes of every cached token) / copy bandwidth;
the input embedding is not counted (a step reads B rows of it). Prefill efficiency = model FLOPs
(2 x linear weights x tokens + causal attention) / time, next to the measured matmul peak.
Both models hold the same weights (ours copied from the transformers model).

Example: python -m benchmark.engine.bench_gpu --shape llama-3-8b --e2e --output-json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmark.engine.bench_offline import SHAPES, environment, hf_generate, make_requests, scratch_folder
from muxserve.engine.cuda_graph import StepTimer
from muxserve.engine.llm_engine import EngineConfig, LLMEngine
from muxserve.engine.loader import load_model, random_checkpoint
from muxserve.engine.model_config import ModelSpec
from muxserve.engine.parallel import SINGLE, TensorParallel
from muxserve.engine.sampling_params import SamplingParams
from muxserve.engine.sequence import Sequence, SequenceStatus
from muxserve.ipc.runtime import Phase

GiB = 1024**3
REPO = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)
# Sampling settings timed at --sampled-points: what API clients send most (temperature alone, top-p),
# top-k with top-p, and the same with a seed per request.
SAMPLED = {
    "temperature 1": dataclasses.replace(GREEDY, temperature=1.0),
    "temperature 0.8, top-p 0.95": dataclasses.replace(GREEDY, temperature=0.8, top_p=0.95),
    "temperature 0.8, top-p 0.95, top-k 50": dataclasses.replace(GREEDY, temperature=0.8, top_p=0.95, top_k=50),
    "temperature 0.8, top-p 0.95, top-k 50, seeded": dataclasses.replace(GREEDY, temperature=0.8, top_p=0.95, top_k=50,
                                                                         seed=1),
}
DEV = "cuda"  # --device cpu: a slow dry run of the whole script (tiny shape), for checking it


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cuda_time(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median seconds of ``fn`` timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    if DEV != "cuda":
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def ceilings() -> dict:
    n = 2 * GiB if DEV == "cuda" else 2**26
    m = 8192 if DEV == "cuda" else 512
    a = torch.randint(0, 255, (n,), dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    t = cuda_time(lambda: b.copy_(a))
    a = b = None
    x = torch.randn(m, m, dtype=torch.bfloat16, device=DEV)
    y = torch.randn(m, m, dtype=torch.bfloat16, device=DEV)
    tm = cuda_time(lambda: x @ y)
    x = y = None
    free()
    return {"copy_bandwidth_GBps": round(2 * n / t / 1e9, 1), "bf16_matmul_TFLOPs": round(2 * m**3 / tm / 1e12, 1)}


def free() -> None:
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


def build_hf(shape: str, seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    family, fields = SHAPES[shape]
    config = (LlamaConfig if family == "llama" else Qwen2Config)(**fields)
    torch.manual_seed(seed)
    with torch.device(DEV):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(std=0.02)
            elif name.endswith(".bias"):
                p.zero_()
    folder = scratch_folder(shape)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)  # config only: our engine reads shapes from it
    return model.eval(), folder


def shape_folder(shape: str) -> Path | None:
    """The folder of a model shape: ``shape`` itself or ``examples/shapes/<shape>``, whichever has a config.json."""
    for folder in (Path(shape), REPO / "examples" / "shapes" / shape):
        if (folder / "config.json").is_file():
            return folder
    return None


def add_shape_argument(p: argparse.ArgumentParser) -> None:
    """``--shape`` of the scripts that take any model shape (see ``parsed_shape``)."""
    p.add_argument("--shape", default="llama-3-8b",
                   help="a folder under examples/shapes, or any folder with a config.json (default: llama-3-8b)")


def parsed_shape(p: argparse.ArgumentParser, shape: str) -> Path:
    """The folder of ``--shape``, or the parser's usage error naming it."""
    folder = shape_folder(shape)
    if folder is None:
        p.error(f"--shape {shape!r}: no config.json there or under examples/shapes/")
    return folder


def cuda_shape(p: argparse.ArgumentParser, shape: str) -> tuple[Path, ModelSpec]:
    """``parsed_shape`` and its spec, for the kernel benchmarks that need a GPU (a usage error without one)."""
    folder = parsed_shape(p, shape)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (and triton)")
    return folder, ModelSpec.from_folder(folder)


def check_device(p: argparse.ArgumentParser, device: str) -> None:
    """``--device cuda`` on a machine without CUDA is a usage error, not a traceback mid-run."""
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA GPU (none is visible); --device cpu runs a dry run of the script")


def random_model(folder: Path, dtype: torch.dtype, device: torch.device, parallel: TensorParallel = SINGLE):
    """(model, spec): the shape with FlexStore's seeded random weights (``parallel``: one rank's slice)."""
    spec = ModelSpec.from_folder(folder)
    return load_model(spec, dtype, device, random_checkpoint(spec, dtype, device, seed=0), parallel), spec


def ours_from_hf(hf, folder: Path):
    spec = ModelSpec.from_folder(folder)
    return load_model(spec, torch.bfloat16, torch.device(DEV), ((n, p.data) for n, p in hf.named_parameters())), spec


def weight_bytes(model, spec) -> int:
    total = 0
    for name, p in model.named_parameters():
        if name.startswith("embed_tokens") and not spec.tie_word_embeddings:
            continue
        total += p.numel() * p.element_size()
    return total


def linear_params(spec) -> int:
    h, q, kv, i = spec.hidden_size, spec.q_size, spec.kv_size, spec.intermediate_size
    return spec.num_layers * (h * (q + 2 * kv) + q * h + 3 * h * i)


def prefill_flops(spec, lens: list[int]) -> float:
    tokens = sum(lens)
    attn = spec.num_layers * spec.num_heads * spec.head_dim * 2 * sum(n * n for n in lens)  # QK^T + PV, causal half
    return 2 * linear_params(spec) * tokens + attn + 2 * len(lens) * spec.hidden_size * spec.vocab_size


# -- transformers --------------------------------------------------------------------------------
@torch.inference_mode()
def hf_decode_latency(hf, batch: int, ctx: int, vocab: int, steps: int = 6) -> float | None:
    try:
        past = _random_cache(hf, batch, ctx)
        nxt = torch.randint(256, vocab, (batch, 1), device=DEV)
        times = []
        for i in range(steps + 1):
            sync()
            t0 = time.perf_counter()
            out = hf(input_ids=nxt, past_key_values=past, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            nxt.tolist()
            if i:
                times.append(time.perf_counter() - t0)
            past = out.past_key_values
        del past, out
        return statistics.median(times)
    except torch.OutOfMemoryError:
        return None
    finally:
        free()


def _random_cache(hf, batch: int, ctx: int):
    """A DynamicCache holding ``ctx`` random tokens per sequence (what a prefill would leave)."""
    from transformers import DynamicCache

    cfg = hf.config
    heads = cfg.num_key_value_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache = DynamicCache(config=cfg)
    for layer in range(cfg.num_hidden_layers):
        k = torch.randn(batch, heads, ctx, dim, dtype=torch.bfloat16, device=DEV)
        cache.update(k, torch.randn_like(k), layer)
    return cache


@torch.inference_mode()
def hf_prefill_time(hf, lens: list[int], vocab: int) -> float:
    ids = torch.randint(256, vocab, (len(lens), lens[0]), device=DEV)  # equal lengths: no padding
    return cuda_time(lambda: hf(input_ids=ids, use_cache=False, logits_to_keep=1), warmup=1, reps=3)


# -- muxserve ------------------------------------------------------------------------------------
class Ours:
    """Timing of this engine's steps on made-up sequences (``on_engine``: an engine built elsewhere)."""

    def __init__(self, model, folder: Path, kv_gb: float, max_num_seqs: int):
        config = EngineConfig(model=str(folder), dtype="bfloat16", device=DEV, kv_cache_bytes=int(kv_gb * GiB),
                              max_num_seqs=max_num_seqs, max_model_len=4096)
        self._attach(LLMEngine(config, model=model))

    @classmethod
    def on_engine(cls, engine: LLMEngine) -> Ours:
        bench = cls.__new__(cls)
        bench._attach(engine)
        return bench

    def _attach(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.runner = engine.runner
        engine.pool.view(engine.layout).normal_()  # random KV: never time on zeros
        self._ids = 0

    def make_seqs(self, lens: list[int], extra: int, vocab: int, params: SamplingParams = GREEDY) -> list[Sequence]:
        e = self.engine
        seqs = []
        for n in lens:
            self._ids += 1
            sid = f"bench{self._ids}"
            seq = Sequence(sid, torch.randint(256, vocab, (n,)).tolist(), params, frozenset(), None)
            got = e.allocator.allocate(e.model_name, [(sid, n + extra)]).new_pages
            if sid not in got:
                self.free(seqs)
                raise RuntimeError(f"the KV cache holds {e.allocator.max_tokens(e.model_name)} tokens, too few for "
                                   f"{len(lens)} sequences of {n + extra} tokens; give the benchmark more KV memory")
            seq.pages = got[sid]
            seq.status = SequenceStatus.RUNNING
            seqs.append(seq)
        return seqs

    def free(self, seqs):
        ids = [s.req_id for s in seqs]
        self.engine.allocator.free(self.engine.model_name, ids)
        self.runner.release(ids)

    def decode_latency(self, batch: int, ctx: int, vocab: int, steps: int = 20, eager: bool = False,
                       params: SamplingParams = GREEDY) -> float:
        """Median wall time of a decode step (of ``steps`` after two warm-up steps)."""
        seqs = self.make_seqs([ctx] * batch, steps + 8, vocab, params)
        graphs = self.runner.graphs
        if eager:
            self.runner.graphs = None
        try:
            times = []
            for i in range(steps + 2):
                sync()
                t0 = time.perf_counter()
                tokens = self.runner.step(seqs, Phase.DECODE)
                if i >= 2:
                    times.append(time.perf_counter() - t0)
                for s, t in zip(seqs, tokens):
                    s.output_token_ids.append(t)
            return statistics.median(times)
        finally:
            self.runner.graphs = graphs
            self.free(seqs)

    def decode_breakdown(self, batch: int, ctx: int, vocab: int, steps: int = 40) -> dict | None:
        """Medians (s) of the parts of graph decode steps (see ``StepTimer``); None without graphs."""
        if self.runner.graphs is None or not self.runner.graphs.can_run(batch):
            return None
        seqs = self.make_seqs([ctx] * batch, steps + 8, vocab)
        timer = StepTimer()
        try:
            for i in range(steps + 2):
                if i == 2:  # the first steps may capture the graph
                    self.runner.step_timer = timer
                sync()
                tokens = self.runner.step(seqs, Phase.DECODE)
                for s, t in zip(seqs, tokens):
                    s.output_token_ids.append(t)
        finally:
            self.runner.step_timer = None
            self.free(seqs)
        recs = timer.records
        out = {k: statistics.median(r[k] for r in recs)
               for k in ("prep_s", "replay_gpu_s", "launch_s", "sample_s", "wall_s")}
        out["host_s"] = statistics.median(r["wall_s"] - r["replay_gpu_s"] for r in recs)  # wall outside the graph
        out["max_prep_s"] = max(r["prep_s"] for r in recs)  # steps where a new page block is copied
        out["steps"] = len(recs)
        return out

    def prefill_time(self, lens: list[int], vocab: int) -> float:
        seqs = self.make_seqs(lens, 0, vocab)
        try:
            return cuda_time(lambda: self.runner.step(seqs, Phase.PREFILL), warmup=1, reps=3)
        finally:
            self.free(seqs)

    def e2e(self, requests) -> float:
        e = self.engine
        sync()
        t0 = time.perf_counter()
        seqs = [e.add_request(r.prompt, SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True))
                for r in requests]
        while e.has_unfinished():
            e.step()
        sync()
        elapsed = time.perf_counter() - t0
        if any(len(s.output_token_ids) != r.output_len for s, r in zip(seqs, requests)):
            raise RuntimeError("wrong number of output tokens")
        return elapsed


def count_x_len(text: str) -> tuple[int, int]:
    """``--prefill`` / ``--eager-points`` / ``--sampled-points`` values: "AxB" with positive integers."""
    parts = text.split("x")
    if len(parts) != 2 or not all(x.isdigit() and int(x) > 0 for x in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not COUNTxLEN (two positive integers, e.g. 32x512)")
    return int(parts[0]), int(parts[1])


def points(*texts: str) -> list[tuple[int, int]]:
    return [count_x_len(t) for t in texts]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", required=True, choices=sorted(SHAPES))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    # argparse converts a string default with ``type`` but not a list of them: the defaults are parsed here.
    p.add_argument("--prefill", type=count_x_len, nargs="+", default=points("1x2048", "8x256"),
                   help="prefill batches as COUNTxLEN (default: 1x2048 8x256)")
    p.add_argument("--eager-points", type=count_x_len, nargs="*", default=points("1x512", "32x512"),
                   help="decode BATCHxCTX points also timed without CUDA graphs (default: 1x512 32x512)")
    p.add_argument("--sampled-points", type=count_x_len, nargs="*", default=points("1x512", "32x512", "128x512"),
                   help="decode BATCHxCTX points also timed with every request sampling, for each setting of "
                        "SAMPLED (temperature; top-p; top-k and top-p; seeded; default: 1x512 32x512 128x512)")
    p.add_argument("--step-breakdown", action="store_true",
                   help="time every decode point again, split into host preparation, graph replay (GPU), "
                        "sampling and wall (CUDA graphs only)")
    p.add_argument("--breakdown-steps", type=int, default=40, help="timed steps per point for --step-breakdown")
    p.add_argument("--e2e", action="store_true", help="also run offline throughput on ShareGPT-like requests")
    p.add_argument("--e2e-requests", type=int, default=256)
    p.add_argument("--hf-e2e-requests", type=int, default=32,
                   help="transformers runs the first N requests as one batch (its batch size)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--kv-cache-gb", type=float, default=36.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: dry run for checking the script")
    p.add_argument("--output-json", type=Path)
    args = p.parse_args(argv)
    check_device(p, args.device)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    global DEV
    DEV = args.device
    now = datetime.datetime.now(datetime.timezone.utc)
    result = {"benchmark": "engine_gpu", "date": now.isoformat(timespec="seconds"),
              "command": shlex.join(["python"] + sys.argv), "environment": environment(DEV),
              "shape": args.shape, "dtype": "bfloat16"}

    def save():
        if args.output_json:
            args.output_json.parent.mkdir(parents=True, exist_ok=True)
            args.output_json.write_text(json.dumps(result, indent=2) + "\n")

    result["ceilings"] = ceil = ceilings()
    log(f"ceilings {ceil}")
    save()
    hf, folder = build_hf(args.shape, args.seed)
    vocab = hf.config.vocab_size
    points = [(b, c) for c in args.contexts for b in args.batches]
    ns = argparse.Namespace(num_prompts=args.e2e_requests, input_len=0, output_len=0, sharegpt_lengths=True,
                            seed=args.seed)
    hf_res: dict = {"decode_s": {}, "prefill_s": {}}
    result["transformers"] = hf_res
    if not args.skip_hf:
        for b, c in points:
            hf_res["decode_s"][f"{b}x{c}"] = t = hf_decode_latency(hf, b, c, vocab)
            log(f"hf decode b={b} ctx={c}: {t}")
            save()
        for cnt, n in args.prefill:
            hf_res["prefill_s"][f"{cnt}x{n}"] = hf_prefill_time(hf, [n] * cnt, vocab)
        log(f"hf prefill {hf_res['prefill_s']}")
        save()
    model, spec = ours_from_hf(hf, folder)
    requests = make_requests(ns, spec) if args.e2e else []
    if args.e2e and not args.skip_hf:
        batch = requests[: args.hf_e2e_requests]
        pad = hf.config.eos_token_id if isinstance(hf.config.eos_token_id, int) else 0
        hf_generate(hf, batch[:2], DEV, pad)  # warm up
        sync()
        t0 = time.perf_counter()
        hf_generate(hf, batch, DEV, pad)
        sync()
        el = time.perf_counter() - t0
        out_tok = sum(r.output_len for r in batch)
        hf_res["e2e"] = {"requests": len(batch), "batch_size": len(batch), "elapsed_s": round(el, 3),
                         "output_tokens": out_tok, "output_tokens_per_s": round(out_tok / el, 1)}
        log(f"hf e2e {hf_res['e2e']}")
        save()
    del hf
    free()

    wbytes = weight_bytes(model, spec)
    kv_per_token = spec.num_layers * spec.num_kv_heads * spec.head_dim * 2 * 2
    ours = Ours(model, folder, args.kv_cache_gb, max(256, max(args.batches)))
    res: dict = {"decode_s": {}, "decode_eager_s": {}, "floor_s": {}, "prefill_s": {}, "weight_bytes": wbytes,
                 "kv_bytes_per_token": kv_per_token}
    result["muxserve"] = res
    bw = ceil["copy_bandwidth_GBps"] * 1e9
    for b, c in points:
        key = f"{b}x{c}"
        res["decode_s"][key] = t = ours.decode_latency(b, c, vocab)
        res["floor_s"][key] = floor = (wbytes + b * c * kv_per_token) / bw
        log(f"ours decode b={b} ctx={c}: {t * 1e3:.2f} ms, floor {floor * 1e3:.2f} ms, x{t / floor:.2f}")
        save()
    if args.step_breakdown:
        res["decode_breakdown"] = {}
        for b, c in points:
            key = f"{b}x{c}"
            d = ours.decode_breakdown(b, c, vocab, args.breakdown_steps)
            if d is None:
                log(f"ours decode breakdown b={b} ctx={c}: no CUDA graph for this batch (or no CUDA), skipped")
                continue
            res["decode_breakdown"][key] = d
            floor = res["floor_s"][key]
            log(f"ours decode breakdown b={b} ctx={c}: wall {d['wall_s'] * 1e3:.3f} ms = host prep "
                f"{d['prep_s'] * 1e3:.3f} + graph GPU {d['replay_gpu_s'] * 1e3:.3f} (x{d['replay_gpu_s'] / floor:.2f} "
                f"floor) + after graph {d['sample_s'] * 1e3:.3f} ms (medians); "
                f"replay call {d['launch_s'] * 1e3:.3f} ms, "
                f"outside the graph {d['host_s'] * 1e3:.3f} ms")
            save()
    for b, c in args.eager_points:
        p = f"{b}x{c}"
        res["decode_eager_s"][p] = t = ours.decode_latency(b, c, vocab, eager=True)
        log(f"ours eager decode {p}: {t * 1e3:.2f} ms")
    for b, c in args.sampled_points:
        p = f"{b}x{c}"
        for name, params in SAMPLED.items():
            res.setdefault("decode_sampled_s", {}).setdefault(name, {})[p] = t = ours.decode_latency(
                b, c, vocab, params=params)
            log(f"ours decode {p}, sampled ({name}): {t * 1e3:.2f} ms")
    res["graph_sizes_captured"] = ours.runner.graphs.captured if ours.runner.graphs else []
    for cnt, n in args.prefill:
        key = f"{cnt}x{n}"
        t = ours.prefill_time([n] * cnt, vocab)
        flops = prefill_flops(spec, [n] * cnt)
        res["prefill_s"][key] = t
        res.setdefault("prefill_TFLOPs", {})[key] = round(flops / t / 1e12, 1)
        res.setdefault("prefill_tokens_per_s", {})[key] = round(cnt * n / t, 1)
        log(f"ours prefill {key}: {t * 1e3:.1f} ms, {flops / t / 1e12:.0f} TFLOP/s")
        save()
    if args.e2e:
        if ours.runner.graphs is not None:
            ours.runner.graphs.capture_all()  # capture outside the timed run, as a server does at start
        ours.e2e(requests[:4])  # warm up
        el = ours.e2e(requests)
        out_tok = sum(r.output_len for r in requests)
        res["e2e"] = {"requests": len(requests), "max_num_seqs": ours.engine.config.max_num_seqs,
                      "elapsed_s": round(el, 3), "output_tokens": out_tok,
                      "output_tokens_per_s": round(out_tok / el, 1),
                      "mean_prompt_len": round(sum(len(r.prompt) for r in requests) / len(requests), 1),
                      "mean_output_len": round(out_tok / len(requests), 1),
                      "preemptions": ours.engine.scheduler.num_preemptions}
        log(f"ours e2e {res['e2e']}")
        sub = requests[: args.hf_e2e_requests]
        el = ours.e2e(sub)
        out_tok = sum(r.output_len for r in sub)
        res["e2e_same_as_hf"] = {"requests": len(sub), "elapsed_s": round(el, 3),
                                 "output_tokens_per_s": round(out_tok / el, 1)}
        log(f"ours e2e on the transformers subset {res['e2e_same_as_hf']}")
        save()
    save()
    log("done")


if __name__ == "__main__":
    main()
