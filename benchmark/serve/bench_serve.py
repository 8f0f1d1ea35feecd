"""Replay a MuxServe workload JSON against an OpenAI-compatible server and report `vllm bench serve` metrics.

Each request of the workload (muxserve/muxsched/workload.py format: model_name, prompt token ids,
output_len, arrival) is sent at its arrival time as a streaming ``POST /v1/completions`` with the
prompt as a list of token ids, ``max_tokens=output_len``, ``ignore_eos=true`` and
``stream_options.include_usage``, so any OpenAI-compatible server (MuxServe, vLLM, SGLang) can be
driven the same way. Reported per model and overall: request and output-token throughput, TTFT,
TPOT (excluding the first token), ITL (gaps between streamed chunks) and E2E latency, as mean,
median and P99 in milliseconds, in vLLM's printed layout and JSON keys.

    python -m benchmark.serve.bench_serve --base-url http://127.0.0.1:8000 \\
        --workload-file examples/basic/sharedgpt_n3_rate_3_2_1.json --result-file log/bench_serve.json

Load stays on this machine: the server must resolve to a loopback address. Concurrency, request
count and total duration are bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

import aiohttp
import numpy as np

from muxserve import files
from muxserve.workload.workload_file import WorkloadRequest, load_workload


@dataclass
class Result:
    idx: int
    model: str
    prompt_len: int
    expected_output_len: int
    success: bool = False
    error: str = ""
    output_tokens: int = 0
    ttft: float = 0.0  # seconds
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    start: float = 0.0  # seconds from the start of the run


def check_loopback(base_url: str) -> None:
    host = urlparse(base_url).hostname
    if not host:
        raise SystemExit(f"error: --base-url {base_url!r} has no host")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as e:
        raise SystemExit(f"error: cannot resolve {host!r}: {e}") from None
    remote = sorted(a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback)
    if remote:
        raise SystemExit(f"error: {host!r} resolves to non-loopback addresses {remote}; this load generator "
                         "only targets servers on this machine (127.0.0.0/8, ::1)")


async def send_one(session: aiohttp.ClientSession, url: str, req: WorkloadRequest, model: str, t0: float,
                   timeout_s: float) -> Result:
    res = Result(req.idx, model, len(req.prompt_token_ids), req.output_len)
    body = {"model": model, "prompt": req.prompt_token_ids, "max_tokens": req.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    res.start = start - t0
    last = start
    chunks = 0
    try:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return res
            async for raw in resp.content:  # one SSE line at a time
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    res.error = str(msg["error"].get("message", msg["error"]))
                    return res
                now = time.perf_counter()
                if msg.get("choices"):
                    if chunks == 0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                    chunks += 1
                if msg.get("usage"):
                    res.output_tokens = msg["usage"]["completion_tokens"]
        res.latency = last - start
        res.output_tokens = res.output_tokens or chunks
        res.success = chunks > 0
        if not res.success:
            res.error = "no token streamed"
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def replay(args, requests: list[WorkloadRequest], models: dict[str, str]) -> tuple[list[Result], float]:
    url = args.base_url.rstrip("/") + args.endpoint
    sem = asyncio.Semaphore(args.max_concurrency)
    connector = aiohttp.TCPConnector(limit=args.max_concurrency)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        t0 = time.perf_counter()

        async def one(req: WorkloadRequest) -> Result:
            delay = req.arrival * args.time_scale - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            async with sem:
                return await send_one(session, url, req, models[req.llm], t0, args.request_timeout)

        tasks = [asyncio.ensure_future(one(r)) for r in requests]
        done, pending = await asyncio.wait(tasks, timeout=args.max_duration)
        for t in pending:  # bounded in time: whatever is left is cancelled and counted as failed
            t.cancel()
        duration = time.perf_counter() - t0
    results = []
    for req, task in zip(requests, tasks):
        if task in done and not task.cancelled():
            results.append(task.result())
        else:
            results.append(Result(req.idx, models[req.llm], len(req.prompt_token_ids), req.output_len,
                                  error=f"not finished within --max-duration {args.max_duration} s"))
    return results, duration


def _stats(values: list[float], name: str, percentiles: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float) * 1000.0 if values else np.zeros(1)
    out = {f"mean_{name}_ms": float(arr.mean()), f"median_{name}_ms": float(np.median(arr)),
           f"std_{name}_ms": float(arr.std())}
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = float(np.percentile(arr, p))
    return out


def summarize(results: list[Result], duration: float, percentiles: list[float]) -> dict:
    ok = [r for r in results if r.success]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    summary = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "wrong_output_len": sum(r.output_tokens != r.expected_output_len for r in ok),
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": out_tokens / duration if duration > 0 else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration > 0 else 0.0,
    }
    summary.update(_stats([r.ttft for r in ok], "ttft", percentiles))
    summary.update(_stats(tpots, "tpot", percentiles))
    summary.update(_stats([g for r in ok for g in r.itl], "itl", percentiles))
    summary.update(_stats([r.latency for r in ok], "e2el", percentiles))
    return summary


def format_block(title: str, s: dict, percentiles: list[float]) -> str:
    lines = [f"{' ' + title + ' ':=^60}",
             f"{'Successful requests:':<40}{s['completed']:<10}",
             f"{'Failed requests:':<40}{s['failed']:<10}",
             f"{'Benchmark duration (s):':<40}{s['duration']:<10.2f}",
             f"{'Total input tokens:':<40}{s['total_input_tokens']:<10}",
             f"{'Total generated tokens:':<40}{s['total_output_tokens']:<10}",
             f"{'Request throughput (req/s):':<40}{s['request_throughput']:<10.2f}",
             f"{'Output token throughput (tok/s):':<40}{s['output_throughput']:<10.2f}",
             f"{'Total token throughput (tok/s):':<40}{s['total_token_throughput']:<10.2f}"]
    for key, name, header in (("ttft", "TTFT", "Time to First Token"),
                              ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
                              ("itl", "ITL", "Inter-token Latency"), ("e2el", "E2EL", "End-to-end Latency")):
        lines.append(f"{header:-^60}")
        lines.append(f"{f'Mean {name} (ms):':<40}{s[f'mean_{key}_ms']:<10.2f}")
        lines.append(f"{f'Median {name} (ms):':<40}{s[f'median_{key}_ms']:<10.2f}")
        for p in percentiles:
            lines.append(f"{f'P{p:g} {name} (ms):':<40}{s[f'p{p:g}_{key}_ms']:<10.2f}")
    lines.append("=" * 60)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (default: http://127.0.0.1:8000)")
    p.add_argument("--endpoint", default="/v1/completions", help="completions path (default: /v1/completions)")
    p.add_argument("--workload-file", required=True, help="workload JSON (muxserve/muxsched/workload.py format)")
    p.add_argument("--model-map", nargs="*", default=[], metavar="WORKLOAD_NAME=SERVED_NAME",
                   help="send a workload LLM's requests to another served model name (default: same name)")
    p.add_argument("--num-requests", type=int, default=None, help="replay only the first N requests by arrival")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply arrival times (0: send everything at once; 0.5: twice the rate)")
    p.add_argument("--max-concurrency", type=int, default=256, help="requests in flight at most (default: 256)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (default: 600)")
    p.add_argument("--max-duration", type=float, default=3600.0,
                   help="stop the run after this many seconds; unfinished requests count as failed (default: 3600)")
    p.add_argument("--metric-percentiles", default="99", help="comma-separated percentiles (default: 99)")
    p.add_argument("--result-file", help="write the summary (overall and per model) and every request as JSON "
                                         "(gzip-compressed when the name ends in .gz)")
    p.add_argument("--api-key", default=os.environ.get("MUXSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY"),
                   help="sent as 'Authorization: Bearer KEY' (default: $MUXSERVE_API_KEY, else $OPENAI_API_KEY)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name, value, low in (("--max-concurrency", args.max_concurrency, 1), ("--num-requests", args.num_requests, 1)):
        if value is not None and value < low:
            raise SystemExit(f"error: {name} must be >= {low}, got {value}")
    if args.time_scale < 0 or args.request_timeout <= 0 or args.max_duration <= 0:
        raise SystemExit("error: --time-scale must be >= 0 and the timeouts > 0")
    percentiles = [float(p) for p in args.metric_percentiles.split(",") if p.strip()]
    check_loopback(args.base_url)
    workload = load_workload(args.workload_file)
    requests = workload.requests[: args.num_requests] if args.num_requests else workload.requests
    models = {llm: llm for llm in workload.llms}
    for item in args.model_map:
        src, sep, dst = item.partition("=")
        if not sep or src not in models:
            raise SystemExit(f"error: --model-map {item!r}: expected WORKLOAD_NAME=SERVED_NAME with a workload "
                             f"LLM ({', '.join(models)})")
        models[src] = dst
    print(f"replaying {len(requests)} requests of {args.workload_file} against {args.base_url}{args.endpoint}",
          file=sys.stderr)
    results, duration = asyncio.run(replay(args, requests, models))
    overall = summarize(results, duration, percentiles)
    per_model = {m: summarize([r for r in results if r.model == m], duration, percentiles)
                 for m in sorted({r.model for r in results})}
    for model, s in per_model.items():
        print(format_block(f"Serving Benchmark Result: {model}", s, percentiles))
    print(format_block("Serving Benchmark Result", overall, percentiles))
    errors = [r.error for r in results if not r.success]
    if errors:
        print(f"{len(errors)} requests failed; first error: {errors[0]}", file=sys.stderr)
    if args.result_file:
        doc = {"base_url": args.base_url, "workload_file": args.workload_file, "num_requests": len(requests),
               "time_scale": args.time_scale, "max_concurrency": args.max_concurrency, **overall,
               "per_model": per_model, "requests": [asdict(r) for r in results]}
        files.write_json(args.result_file, doc, indent=1)  # gzip-compressed when the name ends in .gz
        print(f"results written to {args.result_file}", file=sys.stderr)
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
