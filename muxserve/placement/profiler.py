"""Cost profiler: prefill and decode-step latency of our engine, the placement optimizer's input.

    python -m muxserve.muxsched.profile --model smollm2-135m --batch-sizes 1,2,4,8 \\
        --seq-lens 32,64,128 --output costs.json                                    # CPU
    python -m muxserve.muxsched.profile --model llama-8b=random:/models/llama-3-8b --device cuda \\
        --dtype bf16 --sm-percentages 30,40,50,60,70,80,90,100 --mps-dir /tmp/mps --output costs.json

It writes the original's cost table (``examples/placement/llama.json``), all keys strings::

    {model: {num_gpus: {sm_percent: {batch_size: {seq_len: {"prefill": ms, "decoding": ms}}}}}}

``prefill`` is one prefill step of ``batch_size`` prompts of ``seq_len`` tokens; ``decoding`` is
one decode step of ``batch_size`` sequences holding ``seq_len`` tokens each. ``-1`` marks a cell
that was not measured (the KV pool or the device memory cannot hold it, or the prefill is over
``--max-prefill-tokens``). Each cell is the median of ``--repeats`` timed runs after
``--warmup`` runs.

SM percentages need NVIDIA MPS (started with ``scripts/start_mps.sh DIR``): with ``--mps-dir``,
each percentage is measured in a child process started with ``CUDA_MPS_PIPE_DIRECTORY=DIR/nvidia-mps``,
``CUDA_MPS_LOG_DIRECTORY=DIR/nvidia-log`` and ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` (it must be set
before CUDA starts). Without ``--mps-dir`` only 100 is possible.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from muxserve.errors import InputError, command_status
from muxserve.ipc.runtime import Phase
from muxserve.placement.costs import load_cost_table

logger = logging.getLogger("muxserve.profile")

NOT_MEASURED = -1


class ProfileSettings(msgspec.Struct, frozen=True):
    key: str  # the model's name in the cost table
    model: str  # short name, folder, .gguf or random:FOLDER
    batch_sizes: tuple[int, ...]
    seq_lens: tuple[int, ...]
    device: str = "cpu"
    dtype: str = "float32"
    warmup: int = 1
    repeats: int = 3
    max_prefill_tokens: int = 32768
    seed: int = 0


def parse_model(text: str) -> tuple[str, str]:
    """``KEY=MODEL`` or ``MODEL`` (then the key is the model string itself)."""
    key, sep, model = text.partition("=")
    if not sep:
        return text, text
    if not key or not model:
        raise argparse.ArgumentTypeError(f"expected MODEL or KEY=MODEL, got {text!r}")
    return key, model


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return tuple(sorted(set(values)))


def build_engine(settings: ProfileSettings):
    """An LLMEngine whose pool holds the largest cell (on a GPU: at most half the free memory)."""
    import torch

    from muxserve.engine.kv_cache import DEFAULT_PAGE_BYTES, KVLayout
    from muxserve.engine.llm_engine import EngineConfig, LLMEngine
    from muxserve.engine.loader import checkpoint, load_model
    from muxserve.engine.model_config import ModelSpec
    from muxserve.engine.model_hub import resolve_model
    from muxserve.ipc.devices import parse_device, parse_dtype

    random_weights = settings.model.startswith("random:")
    name = settings.model.removeprefix("random:")
    try:
        folder = resolve_model(name)
        device, dtype = parse_device(settings.device), parse_dtype(settings.dtype)
        spec = ModelSpec.from_folder(folder)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"model {settings.model!r}: {e}") from None
    weights = checkpoint(folder, spec, dtype, device, "random" if random_weights else "auto", settings.seed)
    model = load_model(spec, dtype, device, weights)
    layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, dtype, DEFAULT_PAGE_BYTES)
    kv_bytes = max(settings.batch_sizes) * layout.pages_for(max(settings.seq_lens) + 1) * DEFAULT_PAGE_BYTES
    if device.type == "cuda":
        kv_bytes = min(kv_bytes, torch.cuda.mem_get_info(device)[0] // 2 // DEFAULT_PAGE_BYTES * DEFAULT_PAGE_BYTES)
    config = EngineConfig(model=str(folder), dtype=settings.dtype, device=settings.device, kv_cache_bytes=kv_bytes,
                          max_model_len=max(settings.seq_lens) + 2)
    return LLMEngine(config, model=model)


class Profiler:
    """Times ``engine.runner.step`` on batches of sequences that own pages of the engine's pool."""

    def __init__(self, engine, settings: ProfileSettings):
        import torch

        self.engine = engine
        self.settings = settings
        self.torch = torch
        self.gen = torch.Generator().manual_seed(settings.seed)

    def _sync(self) -> None:
        if self.engine.device.type == "cuda":
            self.torch.cuda.synchronize(self.engine.device)

    def _timed_ms(self, seqs, phase: Phase) -> float:
        runner = self.engine.runner
        for _ in range(self.settings.warmup):
            runner.step(seqs, phase)
        self._sync()
        times = []
        for _ in range(self.settings.repeats):
            start = time.perf_counter()
            runner.step(seqs, phase)
            self._sync()
            times.append(time.perf_counter() - start)
        return round(statistics.median(times) * 1000, 4)

    def _batch(self, bs: int, seq_len: int, decode: bool):
        """``bs`` sequences of ``seq_len`` prompt tokens (plus one output token for decode), with pages."""
        from muxserve.engine.sampling_params import SamplingParams
        from muxserve.engine.sequence import Sequence

        vocab = self.engine.spec.vocab_size
        params = SamplingParams(max_tokens=2, temperature=0)
        seqs = []
        for i in range(bs):
            prompt = self.torch.randint(0, vocab, (seq_len,), generator=self.gen).tolist()
            seqs.append(Sequence(f"profile-{i}", prompt, params, output_token_ids=[prompt[-1]] if decode else []))
        request = [(s.req_id, s.num_tokens) for s in seqs]
        allocator, name = self.engine.allocator, self.engine.model_name
        if not allocator.can_allocate(name, request):
            return None
        got = allocator.allocate(name, request)
        for s in seqs:
            s.pages = got.new_pages[s.req_id]
        return seqs

    def cell(self, bs: int, seq_len: int) -> dict[str, float]:
        out = {}
        for key, phase in (("prefill", Phase.PREFILL), ("decoding", Phase.DECODE)):
            if phase is Phase.PREFILL and bs * seq_len > self.settings.max_prefill_tokens:
                out[key] = NOT_MEASURED
                continue
            seqs = self._batch(bs, seq_len, phase is Phase.DECODE)
            if seqs is None:
                out[key] = NOT_MEASURED
                continue
            try:
                out[key] = self._timed_ms(seqs, phase)
            except self.torch.OutOfMemoryError:
                out[key] = NOT_MEASURED
                self.torch.cuda.empty_cache()
            finally:
                self.engine.allocator.free(self.engine.model_name, [s.req_id for s in seqs])
        return out

    def grid(self, progress: bool = True) -> dict[str, dict[str, dict[str, float]]]:
        from muxserve.progress import Progress

        s = self.settings
        cells = [(bs, sl) for bs in s.batch_sizes for sl in s.seq_lens]
        table: dict[str, dict[str, dict[str, float]]] = {}
        with Progress(len(cells), f"profiling {s.key}", "cell", enabled=progress) as bar:
            for bs, sl in cells:
                table.setdefault(str(bs), {})[str(sl)] = self.cell(bs, sl)
                bar.update()
        return table


def profile_here(settings: ProfileSettings) -> dict[str, Any]:
    """Profile in this process (whatever SM share it runs with): {bs: {sl: cell}}."""
    engine = build_engine(settings)
    return Profiler(engine, settings).grid()


def profile_under_mps(settings: ProfileSettings, percentage: int, mps_dir: str) -> dict[str, Any]:
    """Profile in a child process started with ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=percentage``."""
    env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=os.path.join(mps_dir, "nvidia-mps"),
               CUDA_MPS_LOG_DIRECTORY=os.path.join(mps_dir, "nvidia-log"),
               CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=str(percentage))
    with tempfile.TemporaryDirectory(prefix="muxserve-profile-") as tmp:
        out = Path(tmp) / "cells.json"
        cmd = [sys.executable, "-m", "muxserve.muxsched.profile", "--worker-output", str(out),
               "--model", f"{settings.key}={settings.model}",
               "--batch-sizes", ",".join(map(str, settings.batch_sizes)),
               "--seq-lens", ",".join(map(str, settings.seq_lens)), "--device", settings.device,
               "--dtype", settings.dtype, "--warmup", str(settings.warmup), "--repeats", str(settings.repeats),
               "--max-prefill-tokens", str(settings.max_prefill_tokens), "--seed", str(settings.seed)]
        logger.info("profiling %s at %d%% SMs in a child process", settings.key, percentage)
        done = subprocess.run(cmd, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"profiling {settings.key} at {percentage}% SMs failed (exit {done.returncode})")
        return json.loads(out.read_text())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m muxserve.muxsched.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=parse_model, action="append", required=True, metavar="[KEY=]MODEL",
                   help="model to profile (repeatable); KEY names it in the table (default: MODEL). "
                        "MODEL: short name, folder, .gguf file or random:FOLDER (random weights, FOLDER/config.json)")
    p.add_argument("--batch-sizes", type=_ints, default=(1, 2, 4, 8, 16, 32, 64, 128, 256))
    p.add_argument("--seq-lens", type=_ints, default=(32, 64, 128, 256, 512))
    p.add_argument("--sm-percentages", type=_ints, default=(100,), help="needs --mps-dir unless only 100")
    p.add_argument("--mps-dir", default=None, help="MPS folder of scripts/start_mps.sh (nvidia-mps, nvidia-log)")
    p.add_argument("--num-gpus", type=int, default=1,
                   help="mesh size; only 1 (larger meshes: the placement's --estimate-tp)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (fp32, bf16, fp16)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per cell")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per cell (the median is kept)")
    p.add_argument("--max-prefill-tokens", type=int, default=32768, help="skip (-1) larger prefill cells")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts and random weights")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch intra-op threads (default: torch's)")
    p.add_argument("--output", default=None, help="cost table JSON to write")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--merge", action="store_true", help="add the measured cells to the existing --output")
    p.add_argument("--worker-output", default=None, help=argparse.SUPPRESS)  # child process of --mps-dir
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    if args.num_gpus != 1:
        raise InputError(f"--num-gpus {args.num_gpus}: the profiler measures one GPU per model; the placement "
                         "estimates larger meshes from it (--estimate-tp)")
    if args.mps_dir is None and args.sm_percentages != (100,):
        raise InputError(f"--sm-percentages {','.join(map(str, args.sm_percentages))} needs --mps-dir "
                         "(start MPS with scripts/start_mps.sh DIR)")
    if max(args.sm_percentages) > 100:
        raise InputError(f"SM percentages must be at most 100, got {max(args.sm_percentages)}")
    if args.warmup < 0 or args.repeats < 1:
        raise InputError(f"--warmup must be >= 0 and --repeats >= 1, got {args.warmup} and {args.repeats}")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    settings = [ProfileSettings(key, model, args.batch_sizes, args.seq_lens, args.device, args.dtype, args.warmup,
                                args.repeats, args.max_prefill_tokens, args.seed) for key, model in args.model]
    if args.worker_output:
        Path(args.worker_output).write_text(json.dumps(profile_here(settings[0])))
        return {}
    if args.output is None:
        raise InputError("--output is required")
    out = Path(args.output)
    table: dict = {}
    if out.exists():
        if args.merge:
            table = load_cost_table(out)
        elif not args.overwrite:
            raise InputError(f"output file {out} already exists; pass --overwrite to replace it or --merge to add "
                             "to it")
    if args.mps_dir is not None and not args.device.startswith("cuda"):
        logger.warning("--mps-dir on %s: SM percentages have no effect off the GPU", args.device)
    for s in settings:
        by_sm = table.setdefault(s.key, {}).setdefault(str(args.num_gpus), {})
        for pct in args.sm_percentages:
            cells = profile_here(s) if args.mps_dir is None else profile_under_mps(s, pct, args.mps_dir)
            for bs, row in cells.items():
                by_sm.setdefault(str(pct), {}).setdefault(bs, {}).update(row)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1, sort_keys=False) + "\n")
    return table


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return command_status(lambda: _main(argv))


def _main(argv) -> int:
    args = parse_args(argv)
    table = run(args)
    if args.output and not args.worker_output:
        cells = sum(len(row) for m in table.values() for g in m.values() for s in g.values() for row in s.values())
        print(f"wrote {args.output}: {len(table)} model(s), {cells} cells")
    return 0
