#!/usr/bin/env python
"""FlexStore micro-benchmarks: page allocation round trips and model attach time.

1. **Transport floor**: round trips of an empty ``Ping`` on the same connection.
2. **Decode-batch allocation**: a FlexStore process serves a model with the KV geometry of
   Llama-3-8B (32 layers, 8 kv-heads, head_dim 128, bf16: 32 tokens per 16 KiB page, 256 pages
   per token block) but tiny other weights. A client replays decode steps of ``B`` running
   requests (64 and 256 by default): every step is one ``FlexStoreClient.allocate(model,
   [(id, tokens + 1) for each request])`` over the real socket, timed end to end (encode, send,
   allocate, reply, decode, rebuild of the ``Allocation``). Contexts start staggered, so about
   1/32 of the requests cross a page boundary each step and get 256 new pages; a request that
   reaches ``--max-context`` is freed and restarts (that ``free`` is not in the timing). The
   server-side share (``FlexStoreManager.handle_bytes`` in process, no socket) is measured on the
   same replay.
3. **Attach**: FlexStore loads a model of ``--attach-shape`` with random weights; the client
   times ``FlexStoreClient.attach`` (request, mapping of weights and pool, model built on meta
   and bound to the shared weights): the first attach in this process (cold: includes torch's
   one-time meta-device setup) and the mean of ``--attach-repeats`` more.

Example (CPU):  python -m benchmark.flexstore.bench_flexstore
Example (GPU):  python -m benchmark.flexstore.bench_flexstore --device cuda --attach-shape llama-3-8b
Writes ``benchmark/results/flexstore_<device>.json`` unless ``--output-json`` says otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from muxserve.flexstore import FlexStoreClient, FlexStoreConfig, FlexStoreProcess, ModelEntry
from muxserve.flexstore import protocol as P

RESULTS = Path(__file__).resolve().parents[1] / "results"
LLAMA3_ROPE = {"rope_type": "default", "rope_theta": 500000.0}
# config.json fields of real checkpoints (random weights); "kv-8b" has Llama-3-8B's KV geometry only.
SHAPES = {
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192,
                         tie_word_embeddings=True),
    "llama-8b-4layers": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192),
    "kv-8b": dict(vocab_size=256, hidden_size=128, intermediate_size=128, num_hidden_layers=32,
                  num_attention_heads=8, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--address", default="tcp://127.0.0.1:47391", help="FlexStore endpoint (tcp:// or ipc://)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--iterations", type=int, default=2000, help="timed decode steps per batch size")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--max-context", type=int, default=128, help="tokens at which a request is freed and restarts")
    p.add_argument("--kv-cache-bytes", type=int, default=3 * 2**30, help="pool for the allocation replay")
    p.add_argument("--attach-shape", choices=sorted(SHAPES), default=None,
                   help="model shape for the attach timing (default: llama-3-8b on cuda, llama-3.2-1b on cpu)")
    p.add_argument("--attach-repeats", type=int, default=5)
    p.add_argument("--skip-attach", action="store_true")
    p.add_argument("--output-json", type=Path, default=None)
    return p.parse_args(argv)


def write_config(folder: Path, shape: str) -> Path:
    cfg = dict(SHAPES[shape], architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5,
               rope_parameters=LLAMA3_ROPE, bos_token_id=1, eos_token_id=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def summarize(samples_ns: list[int]) -> dict:
    ms = sorted(s / 1e6 for s in samples_ns)
    return {"mean_ms": statistics.fmean(ms), "p50_ms": ms[len(ms) // 2], "p99_ms": ms[int(len(ms) * 0.99)],
            "min_ms": ms[0], "n": len(ms)}


class DecodeReplay:
    """B running requests; each step asks for room for one more token per request."""

    def __init__(self, batch: int, max_context: int):
        self.max_context = max_context
        self.next_id = 0
        self.ids, self.tokens = [], []
        for i in range(batch):  # staggered contexts: a steady 1/page_tokens of boundary crossings
            self.ids.append(self._new_id())
            self.tokens.append(1 + (i * max_context) // batch)

    def _new_id(self) -> str:
        self.next_id += 1
        return f"req-{self.next_id}"

    def step_request(self) -> list[tuple[str, int]]:
        return [(rid, n + 1) for rid, n in zip(self.ids, self.tokens)]

    def advance(self) -> list[str]:
        """Grow every context by one; requests that reach max_context finish (ids to free)."""
        finished = []
        for i in range(len(self.ids)):
            self.tokens[i] += 1
            if self.tokens[i] >= self.max_context:
                finished.append(self.ids[i])
                self.ids[i], self.tokens[i] = self._new_id(), 1
        return finished


def bench_allocation(client: FlexStoreClient, model: str, batch: int, args) -> dict:
    replay = DecodeReplay(batch, args.max_context)
    client.allocate(model, [(rid, n) for rid, n in zip(replay.ids, replay.tokens)])  # the "prefills"
    samples, new_pages, preempted = [], 0, 0
    for it in range(args.warmup + args.iterations):
        request = replay.step_request()
        t0 = time.perf_counter_ns()
        result = client.allocate(model, request)
        dt = time.perf_counter_ns() - t0
        if it >= args.warmup:
            samples.append(dt)
            new_pages += sum(map(len, result.new_pages.values()))
        preempted += len(result.preempted)
        finished = replay.advance()
        if finished:
            client.free(model, finished)
    client.allocate(model, replay.step_request())  # requests restarted by the last step hold nothing yet
    client.free(model, replay.ids)
    out = summarize(samples)
    out.update(batch=batch, new_pages_per_step=new_pages / args.iterations, preempted=preempted)
    return out


def bench_ping(client: FlexStoreClient, args) -> dict:
    """Round trip of an empty request: the socket and both message loops, no allocator."""
    samples = []
    for it in range(args.warmup + args.iterations):
        t0 = time.perf_counter_ns()
        client.call(P.Ping())
        if it >= args.warmup:
            samples.append(time.perf_counter_ns() - t0)
    return summarize(samples)


def bench_server_side(config: FlexStoreConfig, model: str, batch: int, args) -> dict:
    """The same replay through FlexStoreManager.handle_bytes in this process: the server's share."""
    from muxserve.flexstore.manager import FlexStoreManager

    manager = FlexStoreManager(config)
    try:
        replay = DecodeReplay(batch, args.max_context)
        manager.handle(P.Allocate(model, [(rid, n) for rid, n in zip(replay.ids, replay.tokens)]))
        samples = []
        for it in range(args.warmup + args.iterations):
            data = P.encode(P.Allocate(model, replay.step_request()))
            t0 = time.perf_counter_ns()
            manager.handle_bytes(data)
            dt = time.perf_counter_ns() - t0
            if it >= args.warmup:
                samples.append(dt)
            finished = replay.advance()
            if finished:
                manager.handle(P.Free(model, finished))
    finally:
        manager.close()
    return summarize(samples)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    attach_shape = args.attach_shape or ("llama-3-8b" if device.type == "cuda" else "llama-3.2-1b")
    results = {"device": str(device), "address": args.address, "python": platform.python_version(),
               "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
               "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    with tempfile.TemporaryDirectory(prefix="bench-flexstore-") as tmp:
        folder = write_config(Path(tmp) / "kv-8b", "kv-8b")
        config = FlexStoreConfig(models=(ModelEntry("kv8b", str(folder), "bfloat16", "random"),),
                                 address=args.address, device=args.device, kv_cache_bytes=args.kv_cache_bytes)
        with FlexStoreProcess(config, log_file=Path(tmp) / "flexstore.log", log_level="WARNING") as store:
            with store.client() as client:
                layout = client.info().models[0].layout
                results["layout"] = {"num_layers": layout.num_layers, "num_kv_heads": layout.num_kv_heads,
                                     "head_dim": layout.head_dim, "dtype": layout.dtype,
                                     "page_tokens": layout.page_tokens, "pages_per_block": layout.pages_per_block,
                                     "num_pages": client.num_pages}
                results["ping"] = bench_ping(client, args)
                p = results["ping"]
                print(f"ping (transport floor): mean {p['mean_ms']:.3f} ms  p50 {p['p50_ms']:.3f} ms  "
                      f"p99 {p['p99_ms']:.3f} ms", flush=True)
                results["allocation"] = []
                for batch in args.batch_sizes:
                    r = bench_allocation(client, "kv8b", batch, args)
                    results["allocation"].append(r)
                    print(f"allocate, decode batch {batch:4d}: mean {r['mean_ms']:.3f} ms  p50 {r['p50_ms']:.3f} ms  "
                          f"p99 {r['p99_ms']:.3f} ms  ({r['new_pages_per_step']:.0f} new pages/step, n={r['n']})",
                          flush=True)
        for r in results["allocation"]:
            s = bench_server_side(config, "kv8b", r["batch"], args)
            r["server_side"] = s
            print(f"  server share, batch {r['batch']:4d}: mean {s['mean_ms']:.3f} ms  p50 {s['p50_ms']:.3f} ms  "
                  f"p99 {s['p99_ms']:.3f} ms", flush=True)
        if not args.skip_attach:
            results["attach"] = bench_attach(Path(tmp), attach_shape, args)
    out = args.output_json or RESULTS / f"flexstore_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return results


def bench_attach(tmp: Path, shape: str, args) -> dict:
    folder = write_config(tmp / shape, shape)
    config = FlexStoreConfig(models=(ModelEntry("m", str(folder), "bfloat16", "random"),), address=args.address,
                             device=args.device, kv_cache_bytes=64 * 2**20)
    t0 = time.perf_counter()
    with FlexStoreProcess(config, log_file=tmp / "flexstore-attach.log", log_level="WARNING") as store:
        load_s = time.perf_counter() - t0
        with store.client(timeout_s=120) as client:
            weight_bytes = client.info().models[0].weight_bytes
            times = []
            for _ in range(1 + args.attach_repeats):
                t = time.perf_counter()
                attached = client.attach("m")
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
                attached.close()
                del attached
    r = {"shape": shape, "weight_bytes": weight_bytes, "flexstore_start_and_load_s": load_s,
         "first_attach_ms": times[0] * 1e3, "attach_ms_mean": statistics.fmean(times[1:]) * 1e3 if times[1:] else None}
    print(f"attach {shape} ({weight_bytes / 2**30:.2f} GiB of weights): first {r['first_attach_ms']:.1f} ms, "
          f"then {r['attach_ms_mean']:.1f} ms mean; FlexStore start + random load {load_s:.1f} s", flush=True)
    return r


if __name__ == "__main__":
    main(sys.argv[1:])
