#!/usr/bin/env python
"""Offline throughput: the muxserve engine vs Hugging Face transformers ``generate``.

Both systems get the same model folder, the same random prompts (token ids drawn with
``--seed``) and the same per-request output lengths, in one process, one after the other.

* muxserve: every request is submitted at once (``engine.add_request`` with its own
  ``SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)``), then
  ``engine.step()`` runs until nothing is left (continuous batching).
* transformers: requests are cut, in order, into batches of ``--hf-batch-size``, left-padded
  to the batch's longest prompt with an attention mask and run with ``do_sample=False`` and
  ``min_new_tokens = max_new_tokens`` = the batch's largest output length. With variable
  output lengths (``--sharegpt-lengths``) every row of a batch thus generates the batch's
  longest length; only each request's own ``out_len`` tokens are counted (the extra tokens
  are the real cost of static batching).

For both: requests/s = N / elapsed, output tok/s = sum(out_len) / elapsed, total tok/s =
sum(prompt_len + out_len) / elapsed, elapsed being the fastest of ``--repeats`` timed runs.
Each system gets a short warmup; model loading is not timed.

Example (GPU): bench_offline.py --random-shape llama-3-8b --device cuda --sharegpt-lengths
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import gc
import importlib.metadata
import json
import platform
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from muxserve.engine import LLM, SamplingParams
from muxserve.engine.model_config import ModelSpec
from muxserve.engine.model_hub import resolve_model
from muxserve.ipc.devices import parse_dtype
from muxserve.progress import quiet_library_bars

DTYPES = ("bfloat16", "float16", "float32")
# Real shapes (each checkpoint's config.json), to be filled with seeded random weights.
_LLAMA3 = dict(vocab_size=128256, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
               bos_token_id=128000, eos_token_id=128001)
SHAPES = {
    "llama-3-8b": ("llama", dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 max_position_embeddings=8192,
                                 rope_parameters={"rope_type": "default", "rope_theta": 5e5})),
    "llama-3.2-1b": ("llama", dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, head_dim=64,
                                   max_position_embeddings=131072, tie_word_embeddings=True,
                                   rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 8192})),
    "qwen2.5-7b": ("qwen2", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                                 rms_norm_eps=1e-6, use_sliding_window=False, bos_token_id=151643, eos_token_id=151643,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "tiny": ("llama", dict(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                           rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
}
# ShareGPT-like lengths: log-normal (mu, sigma of log length), clipped to [4, 1024] as vLLM's
# ShareGPT filter does; the clipped means are about 161 prompt and 338 output tokens.
SHAREGPT_PROMPT, SHAREGPT_OUTPUT, LENGTH_CLIP = (4.61, 1.0), (5.51, 0.9), (4, 1024)


@dataclass
class Request:
    prompt: list[int]
    output_len: int


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default="smollm2-135m",
                     help="short model name or Hugging Face folder (default: %(default)s)")
    src.add_argument("--random-shape", choices=sorted(SHAPES),
                     help="instead of --model: seeded random weights of this real shape, saved to a temp folder")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device for both systems (default: cpu)")
    p.add_argument("--dtype", choices=DTYPES, help="model dtype (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--num-prompts", type=int, help="number of requests (default: 32 on cpu, 128 on cuda)")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request (default: %(default)s)")
    p.add_argument("--output-len", type=int, default=128, help="generated tokens per request (default: %(default)s)")
    p.add_argument("--sharegpt-lengths", action="store_true",
                   help="seeded ShareGPT-like per-request lengths (log-normal, mean ~161 prompt / ~338 output, "
                        "clipped to [4, 1024]) instead of --input-len/--output-len")
    p.add_argument("--hf-batch-size", type=int, help="transformers batch size (default: 16 on cpu, 32 on cuda)")
    p.add_argument("--skip-hf", action="store_true", help="run only the muxserve engine")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per system; the fastest is reported, "
                   "all are kept in the JSON (default: %(default)s)")
    p.add_argument("--max-num-seqs", type=int, default=256,
                   help="muxserve: max running requests (default: %(default)s)")
    p.add_argument("--kv-cache-gb", type=float, help="muxserve: KV pool size in GiB (default: the engine's: "
                   "512 MiB on cpu, most free memory on cuda; lower it if decode runs out of GPU memory)")
    p.add_argument("--cpu-threads", type=int, help="torch.set_num_threads for both systems (default: torch's "
                   "own; 1 is faster and steadier on small shared VMs)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of prompts, lengths and random weights (default: %(default)s)")
    p.add_argument("--output-json", type=Path, help="write the results as JSON here")
    p.add_argument("--output-md", type=Path, help="write the results as a markdown table here")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.num_prompts = args.num_prompts or (128 if cuda else 32)
    args.hf_batch_size = args.hf_batch_size or (32 if cuda else 16)
    if min(args.num_prompts, args.input_len, args.output_len, args.hf_batch_size, args.repeats) < 1:
        p.error("--num-prompts, --input-len, --output-len, --hf-batch-size and --repeats must be >= 1")
    return args


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def timed(run, repeats: int, device: str):
    """Call ``run()`` ``repeats`` times; return the wall times (s) and the last result."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        result = run()
        sync()
        times.append(time.perf_counter() - start)
    return times, result


def scratch_folder(shape: str) -> Path:
    """A temporary folder for a generated checkpoint of ``shape``, removed when the script exits."""
    folder = Path(tempfile.mkdtemp(prefix=f"muxserve-bench-{shape}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def build_random_model(shape: str, dtype: str, device: str, seed: int) -> Path:
    """Seeded random weights (normal, std 0.02; norms 1, biases 0) of a real shape, saved as a HF folder."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    family, fields = SHAPES[shape]
    config = (LlamaConfig if family == "llama" else Qwen2Config)(**fields)
    torch.manual_seed(seed)
    with torch.device(device):  # built on the target device: seconds even for 8B on a GPU
        model = AutoModelForCausalLM.from_config(config, dtype=parse_dtype(dtype))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                torch.nn.init.normal_(param, std=0.02)
            elif name.endswith(".bias"):
                param.zero_()
    folder = scratch_folder(shape)
    model.save_pretrained(folder)
    del model, param
    free_memory(device)
    return folder


def make_requests(args, spec: ModelSpec) -> list[Request]:
    """Seeded random prompts; lengths fixed or ShareGPT-like, kept inside the model's context."""
    rng = random.Random(args.seed)
    low = min(256, spec.vocab_size // 8)  # skip the special tokens at the start of most vocabularies
    clip = lambda n: min(LENGTH_CLIP[1], max(LENGTH_CLIP[0], round(n)))  # noqa: E731
    requests = []
    for _ in range(args.num_prompts):
        n_in, n_out = args.input_len, args.output_len
        if args.sharegpt_lengths:
            n_in, n_out = clip(rng.lognormvariate(*SHAREGPT_PROMPT)), clip(rng.lognormvariate(*SHAREGPT_OUTPUT))
        n_out = min(n_out, spec.max_position_embeddings - n_in)
        if n_out < 1:
            raise SystemExit(f"a {n_in}-token prompt leaves no room in a context of {spec.max_position_embeddings}")
        requests.append(Request([rng.randrange(low, spec.vocab_size) for _ in range(n_in)], n_out))
    return requests


def warmup_requests(requests: list[Request]) -> list[Request]:
    return [Request(r.prompt[:16], min(4, r.output_len)) for r in requests[:2]]


def run_ours(folder: Path, requests: list[Request], args) -> tuple[list[float], list[list[int]], dict]:
    kv_bytes = int(args.kv_cache_gb * 1024**3) if args.kv_cache_gb else None
    llm = LLM(str(folder), dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs,
              kv_cache_bytes=kv_bytes)
    engine = llm.engine

    def submit_and_drain(reqs: list[Request]) -> list[list[int]]:
        seqs = [engine.add_request(r.prompt, SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True))
                for r in reqs]
        while engine.has_unfinished():
            engine.step()
        return [list(s.output_token_ids) for s in seqs]

    submit_and_drain(warmup_requests(requests))
    preempted = engine.scheduler.num_preemptions
    times, outputs = timed(lambda: submit_and_drain(requests), args.repeats, args.device)
    wrong = [i for i, (o, r) in enumerate(zip(outputs, requests)) if len(o) != r.output_len]
    if wrong:
        raise RuntimeError(f"muxserve returned a wrong number of tokens for requests {wrong[:5]}")
    extra = {"preemptions_per_run": (engine.scheduler.num_preemptions - preempted) / args.repeats,
             "kv_pool_pages": engine.pool.num_pages}
    llm = engine = None  # free the pool and the weights before the next measurement
    free_memory(args.device)
    return times, outputs, extra


def hf_generate(model, batch: list[Request], device: str, pad_id: int) -> list[list[int]]:
    """One left-padded batch; every row generates the batch's largest output length."""
    width, new = max(len(r.prompt) for r in batch), max(r.output_len for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, r in enumerate(batch):
        ids[row, width - len(r.prompt):] = torch.tensor(r.prompt)
        mask[row, width - len(r.prompt):] = 1
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=new, min_new_tokens=new, pad_token_id=pad_id)
    if out.shape[1] != width + new:
        raise RuntimeError(f"transformers generated {out.shape[1] - width} tokens, expected {new}")
    return [g[: r.output_len] for g, r in zip(out[:, width:].tolist(), batch)]


def run_hf(folder: Path, requests: list[Request], args) -> tuple[list[float], list[list[int]], dict]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=parse_dtype(args.dtype)).to(args.device).eval()
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    pad_id = next(t for t in (model.config.pad_token_id, eos, 0) if t is not None)
    bs = args.hf_batch_size
    batches = [requests[i: i + bs] for i in range(0, len(requests), bs)]
    hf_generate(model, warmup_requests(requests), args.device, pad_id)
    times, outputs = timed(lambda: [o for b in batches for o in hf_generate(model, b, args.device, pad_id)],
                           args.repeats, args.device)
    generated = sum(len(b) * max(r.output_len for r in b) for b in batches)
    model = None
    free_memory(args.device)
    return times, outputs, {"batches": len(batches), "tokens_generated_incl_discarded": generated}


def same_before_eos(ours: list[int], theirs: list[int], eos: set[int]) -> bool:
    """Greedy outputs agree up to our first EOS (min_new_tokens masks EOS in transformers; ignore_eos keeps it)."""
    k = next((i for i, t in enumerate(ours) if t in eos), len(ours))
    return ours[:k] == theirs[:k]


def metrics(times: list[float], requests: list[Request]) -> dict:
    elapsed = min(times)
    out_tokens = sum(r.output_len for r in requests)
    all_tokens = out_tokens + sum(len(r.prompt) for r in requests)
    return {"elapsed_s": round(elapsed, 4), "requests_per_s": round(len(requests) / elapsed, 4),
            "output_tokens_per_s": round(out_tokens / elapsed, 2), "total_tokens_per_s": round(all_tokens / elapsed, 2),
            "all_runs_elapsed_s": [round(t, 4) for t in times]}


def _command_output(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str) -> dict:
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        name = next((line.split(":", 1)[1].strip() for line in _command_output(["lscpu"]).splitlines()
                     if line.startswith("Model name")), platform.processor() or platform.machine())
    driver = _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).splitlines()
    return {"device_name": name, "driver": driver[0] if driver else None, "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": _version("transformers"),
            "triton": _version("triton"), "python": platform.python_version(), "platform": platform.platform()}


def report(args, folder: Path, requests: list[Request], systems: dict, agree: int | None) -> dict:
    n, fixed = len(requests), not args.sharegpt_lengths
    return {
        "benchmark": "engine_offline_throughput",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name] + sys.argv), "argv": sys.argv,
        "environment": environment(args.device),
        "parameters": {
            "model": f"random:{args.random_shape}" if args.random_shape else args.model,
            "model_folder": None if args.random_shape else str(folder),
            "device": args.device, "dtype": args.dtype, "num_prompts": n,
            "lengths": "fixed" if fixed else "sharegpt-like",
            "input_len": args.input_len if fixed else None, "output_len": args.output_len if fixed else None,
            "mean_prompt_len": round(sum(len(r.prompt) for r in requests) / n, 1),
            "mean_output_len": round(sum(r.output_len for r in requests) / n, 1),
            "hf_batch_size": None if args.skip_hf else args.hf_batch_size, "max_num_seqs": args.max_num_seqs,
            "kv_cache_gb": args.kv_cache_gb, "seed": args.seed, "repeats": args.repeats,
            "reported_run": "fastest of the repeats",
            "hf_counting": "a batch runs to its largest output length; only each request's own tokens count",
        },
        "systems": systems,
        "greedy_outputs_identical_before_eos": None if agree is None else f"{agree}/{n}",
    }


def markdown(result: dict) -> str:
    env, par = result["environment"], result["parameters"]
    lengths = (f"input {par['input_len']}, output {par['output_len']}" if par["lengths"] == "fixed"
               else f"ShareGPT-like, mean input {par['mean_prompt_len']}, mean output {par['mean_output_len']}")
    rows = ["| system | elapsed s | requests/s | output tok/s | total tok/s | speedup |",
            "|---|---:|---:|---:|---:|---:|"]
    for name, s in result["systems"].items():
        speed = s.get("speedup_vs_transformers")
        rows.append(f"| {name} | {s['elapsed_s']:.2f} | {s['requests_per_s']:.3f} | {s['output_tokens_per_s']:.1f} "
                    f"| {s['total_tokens_per_s']:.1f} | {f'{speed:.2f}x' if speed else '-'} |")
    return "\n".join([
        "# Offline throughput: muxserve engine vs transformers", "",
        f"- model: {par['model']} ({par['dtype']}, {par['device']}), {par['num_prompts']} prompts, {lengths}, "
        f"transformers batch {par['hf_batch_size']}; fastest of {par['repeats']} run(s) per system",
        f"- device: {env['device_name']} (driver {env['driver']}, torch CPU threads {env['cpu_threads']}); "
        f"torch {env['torch']}, transformers {env['transformers']}, triton {env['triton']}, python {env['python']}",
        f"- date: {result['date']}; greedy outputs identical up to the first EOS: "
        f"{result['greedy_outputs_identical_before_eos']}", "",
        *rows, "", "Command:", "", "```", result["command"], "```", ""])


def main(argv=None) -> None:
    args = parse_args(argv)
    quiet_library_bars()
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    random_model = bool(args.random_shape)
    folder = build_random_model(args.random_shape, args.dtype, args.device, args.seed) if random_model \
        else resolve_model(args.model)
    try:
        spec = ModelSpec.from_folder(folder)
        requests = make_requests(args, spec)
        times, ours, extra = run_ours(folder, requests, args)
        systems, agree = {"muxserve": {**metrics(times, requests), **extra}}, None
        if not args.skip_hf:
            hf_times, theirs, hf_extra = run_hf(folder, requests, args)
            systems["transformers"] = {**metrics(hf_times, requests), **hf_extra}
            systems["muxserve"]["speedup_vs_transformers"] = round(min(hf_times) / min(times), 3)
            agree = sum(same_before_eos(a, b, set(spec.eos_token_ids)) for a, b in zip(ours, theirs))
        result = report(args, folder, requests, systems, agree)
    finally:
        if random_model:
            shutil.rmtree(folder, ignore_errors=True)
    print(markdown(result))
    for path, text in ((args.output_json, json.dumps(result, indent=2) + "\n"), (args.output_md, markdown(result))):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


if __name__ == "__main__":
    main()
