"""What the cluster's front door costs: the same requests sent to one instance directly and through
``muxserve cluster up``'s front door, alternating, on a cluster started here (a Ray of its own).

    python -m benchmark.cluster.bench_frontdoor --placement examples/cluster/placement --model llm-2 \\
        --result-file benchmark/results/cluster_frontdoor_cpu.json -- --device cpu

Measured per path: the latency of one-token completions sent one after another (median, p90), and
the wall time of concurrent streaming completions of ``--stream-tokens`` tokens (requests/s,
tokens/s, median time between chunks). Flags after ``--`` go to every instance.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(args, flags: list[str], key: str, state: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "MUXSERVE_CLUSTER_DIR": str(state), "PYTHONUNBUFFERED": "1"}
    log = open(state / "up.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "muxserve.cluster", "up", args.placement, "--port", str(port),
                             "--name", "bench", "--api-key", key, "--log-dir", str(state / "logs"), "--", *flags],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"cluster up exited with {proc.returncode}; see {state / 'up.log'}")
        f = state / "bench.json"
        if f.is_file() and json.loads(f.read_text()).get("serving"):
            return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    sys.exit(f"the cluster did not serve within {args.start_timeout} s; see {state / 'up.log'}")


async def sequential(client: httpx.AsyncClient, url: str, model: str, n: int) -> list[float]:
    out = []
    for i in range(n):
        start = time.perf_counter()
        r = await client.post(f"{url}/v1/completions", json={"model": model, "prompt": [1 + i % 50] * 8,
                                                              "max_tokens": 1, "temperature": 0})
        r.raise_for_status()
        out.append(time.perf_counter() - start)
    return out


async def concurrent(client: httpx.AsyncClient, url: str, model: str, n: int, tokens: int) -> dict:
    gaps: list[float] = []

    async def one(i: int) -> None:
        body = {"model": model, "prompt": [1 + i % 50] * 8, "max_tokens": tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            r.raise_for_status()
            last = None
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append(now - last)
                    last = now

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - start
    return {"requests": n, "wall_s": wall, "requests_per_s": n / wall, "tokens_per_s": n * tokens / wall,
            "median_itl_ms": float(np.median(gaps) * 1e3)}


async def measure(args, front: str, direct: str, key: str) -> dict:
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=300, headers=headers, trust_env=False) as client:
        await sequential(client, front, args.model, 10)  # warm both paths
        await sequential(client, direct, args.model, 10)
        lat = {"direct": [], "front door": []}
        conc = {"direct": [], "front door": []}
        for _ in range(args.rounds):  # alternate, so that load from elsewhere hits both alike
            for name, url in (("direct", direct), ("front door", front)):
                lat[name] += await sequential(client, url, args.model, args.requests // args.rounds)
                conc[name].append(await concurrent(client, url, args.model, args.concurrency, args.stream_tokens))
    out = {}
    for name in lat:
        ms = np.asarray(lat[name]) * 1e3
        runs = conc[name]
        out[name] = {"one_token_latency_ms": {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
                                              "n": len(ms)},
                     "concurrent_streams": {k: float(np.median([r[k] for r in runs]))
                                            for k in ("requests_per_s", "tokens_per_s", "median_itl_ms")}}
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--placement", required=True, help="placement folder or placement.json")
    p.add_argument("--model", required=True, help="the LLM to send requests to")
    p.add_argument("--requests", type=int, default=200, help="one-token requests per path (default: 200)")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent streams per round (default: 16)")
    p.add_argument("--stream-tokens", type=int, default=32, help="tokens per stream (default: 32)")
    p.add_argument("--rounds", type=int, default=4, help="alternations of the two paths (default: 4)")
    p.add_argument("--start-timeout", type=float, default=900.0,
                   help="seconds to wait for the cluster to serve (default: 900)")
    p.add_argument("--result-file", help="write the figures as JSON")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    key = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="bench-frontdoor-") as tmp:
        proc, front = start_cluster(args, flags, key, Path(tmp))
        try:
            info = httpx.get(f"{front}/cluster", headers={"Authorization": f"Bearer {key}"}, trust_env=False).json()
            direct = next(i["url"] for i in info["instances"] if args.model in i["llms"])
            figures = asyncio.run(measure(args, front, direct, key))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(300)
    doc = {"command": sys.argv, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                            "python": platform.python_version()},
           "model": args.model, "figures": figures}
    for name, f in figures.items():
        lat, c = f["one_token_latency_ms"], f["concurrent_streams"]
        print(f"{name:>10}: one-token latency p50 {lat['p50']:.1f} ms, p90 {lat['p90']:.1f} ms; {args.concurrency} "
              f"streams of {args.stream_tokens} tokens: {c['requests_per_s']:.2f} req/s, {c['tokens_per_s']:.1f} "
              f"tok/s, median gap {c['median_itl_ms']:.1f} ms")
    if args.result_file:
        Path(args.result_file).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
