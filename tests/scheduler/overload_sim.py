"""The real scheduler driven by a fake clock and fake runtimes whose step times follow a simple
cost model of one large GPU: what happens to each LLM when the instance is oversubscribed.

Step times (seconds): a prefill is compute bound, ``2 × params × tokens / (FLOPS × share)``; a
decode step is bandwidth bound, ``(weights + KV read) / BANDWIDTH``, slowed a little below half
the SMs. Jobs do not slow each other down (MPS isolates their SM shares). The KV pool is the
project's page allocator; quotas, SM units and preemption are the scheduler's own.

    python -m tests.scheduler.overload_sim [--rate 42] [--duration 30] [--policy adbs]

prints per LLM: requests, finished, p99 TTFT, p99 TPOT and the longest time its oldest waiting
request waited.
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
from dataclasses import dataclass

import torch

from muxserve.engine.kv_cache import KVLayout, PageAllocator
from muxserve.engine.sampling_params import SamplingParams
from muxserve.ipc.runtime import Job, JobResult, Phase
from muxserve.scheduler.policy import get_policy
from muxserve.scheduler.quota import QuotaManager, QuotaModel, units_for
from muxserve.scheduler.scheduler import LLMInfo, MuxScheduler
from muxserve.scheduler.state import Request

FLOPS = 150e12  # bf16, what a prefill of this engine gets of an H200 (about 40 % of peak)
BANDWIDTH = 2.0e12  # bytes/s a decode step reads (about 40 % of peak)
SIM_PAGE_KIB = 256  # one page: 16 tokens of 16 KiB of K+V over all layers and heads
PAGE_TOKENS = 16


@dataclass(frozen=True)
class SimLLM:
    name: str
    params: float  # parameters
    kv_kib_per_token: int  # K+V of one token over all layers (bf16)
    rate: float  # requests/s
    mps: tuple[int, int]  # prefill, decode share (%)


def six_llms(total_rate: float, alpha: float = 0.9) -> list[SimLLM]:
    """Six LLMs of 1–14 B, the small ones most popular (rates ∝ (i+1)^-alpha), default SM shares."""
    shapes = [(1.24e9, 32), (1.71e9, 192), (3.21e9, 112), (7.6e9, 56), (8.03e9, 128), (14.7e9, 192)]
    weights = [(i + 1) ** -alpha for i in range(len(shapes))]
    out = []
    for i, ((params, kv), w) in enumerate(zip(shapes, weights)):
        prefill = 80 if params <= 10e9 else 90
        decode = 30 if params < 2e9 else 40 if params < 5e9 else 50
        out.append(SimLLM(f"llm-{i}", params, kv, total_rate * w / sum(weights), (prefill, decode)))
    return out


def prefill_s(m: SimLLM, tokens: int) -> float:
    return 2e-3 + 2 * m.params * tokens / (FLOPS * m.mps[0] / 100)


def decode_s(m: SimLLM, context_tokens: int) -> float:
    slow = 1.0 if m.mps[1] >= 50 else 1.0 + (50 - m.mps[1]) / 100
    return 8e-3 + slow * (2 * m.params + context_tokens * m.kv_kib_per_token * 1024) / BANDWIDTH


class _Link:
    def __init__(self, sink: list):
        self.sink = sink

    def send(self, job: Job) -> None:
        self.sink.append(job)


class Simulation:
    def __init__(self, llms: list[SimLLM], kv_gb: float = 19.6, policy: str = "adbs", overload_threshold: int = 10,
                 budget: int = 2048, avg_seq_len: int = 416, adapt_interval: float = 8.0):
        self.llms = {m.name: m for m in llms}
        self.t = 0.0
        num_pages = int(kv_gb * (1 << 30) / (SIM_PAGE_KIB * 1024))
        self.allocator = PageAllocator(num_pages)
        for m in llms:  # one layer per 16 KiB of K+V per token: pages_per_block = KiB / 16
            layout = KVLayout(num_layers=max(1, round(m.kv_kib_per_token / 16)), num_kv_heads=1, head_dim=8,
                              dtype=torch.float32, page_bytes=PAGE_TOKENS * 2 * 8 * 4)
            self.allocator.register_model(m.name, layout)
        self.sent: list[Job] = []
        links = {(m.name, ph): _Link(self.sent) for m in llms for ph in Phase}
        infos = [LLMInfo(m.name, units_for(m.mps[0]), units_for(m.mps[1]), 256, frozenset(), 4096, 32000)
                 for m in llms]
        pol = get_policy(policy)
        quota = QuotaManager([QuotaModel(m.name, m.rate, max(1, round(m.kv_kib_per_token / 16)), PAGE_TOKENS)
                              for m in llms], num_pages, avg_seq_len,
                             by_rate=pol.quota.value == "adaptive") if pol.quota.value != "none" else None
        self.sched = MuxScheduler(infos, self.allocator, links, pol, budget, overload_threshold, quota=quota,
                                  clock=lambda: self.t, adapt_interval=adapt_interval)
        self._decode_ready: dict[str, float] = {}
        self.events: list[tuple[float, int, str, object]] = []
        self._seq = 0
        self.requests: list[Request] = []
        self.dispatches: list[tuple[float, str, Phase, int]] = []  # (time, llm, phase, batch)
        self.max_head_wait: dict[str, float] = dict.fromkeys(self.llms, 0.0)
        # a decodable batch's wait: from its LLM's last decode result (or first prefill) to its next decode job
        self.max_decode_wait: dict[str, float] = dict.fromkeys(self.llms, 0.0)
        self.longest_job_s = 0.0

    def _push(self, at: float, kind: str, payload) -> None:
        heapq.heappush(self.events, (at, self._seq, kind, payload))
        self._seq += 1

    def add_poisson(self, duration: float, seed: int = 0, prompt=(64, 512), output=(16, 256)) -> None:
        rng = random.Random(seed)
        arrivals = []
        for m in self.llms.values():
            t = rng.expovariate(m.rate)
            while t < duration:
                arrivals.append((t, m.name, rng.randint(*prompt), rng.randint(*output)))
                t += rng.expovariate(m.rate)
        for idx, (t, name, p, o) in enumerate(sorted(arrivals)):
            req = Request(f"r{idx}", [1] * p, SamplingParams(max_tokens=o, temperature=0, ignore_eos=True),
                          idx=idx, llm=name, arrival=t)
            self.requests.append(req)
            self._push(t, "arrive", req)

    def _dispatch_sent(self) -> None:
        for job in self.sent:
            inflight = self.sched.inflight[job.job_id]
            m = self.llms[inflight.llm]
            if inflight.phase is Phase.PREFILL:
                dt = prefill_s(m, sum(s.num_tokens for s in job.seqs))
            else:
                dt = decode_s(m, sum(s.num_tokens for s in job.seqs))
            self.dispatches.append((self.t, inflight.llm, inflight.phase, len(job.seqs)))
            self.longest_job_s = max(self.longest_job_s, dt)
            if inflight.phase is Phase.DECODE:
                since = self._decode_ready.pop(inflight.llm, self.t)
                self.max_decode_wait[inflight.llm] = max(self.max_decode_wait[inflight.llm], self.t - since)
            self._push(self.t + dt, "result", job)
        self.sent.clear()

    def run(self, until: float = 1e9) -> None:
        while self.events and self.events[0][0] <= until:
            at = self.events[0][0]
            self.t = at
            while self.events and self.events[0][0] == at:
                _, _, kind, payload = heapq.heappop(self.events)
                if kind == "arrive":
                    self.sched.add(payload)
                else:
                    self.sched.on_result(JobResult(payload.job_id, "sim", [7] * len(payload.seqs), 0.0))
            for name, s in self.sched.llms.items():
                if s.running and (name, Phase.DECODE) not in self.sched.busy:
                    self._decode_ready.setdefault(name, self.t)
            self.sched.schedule()
            self._dispatch_sent()
            for name, s in self.sched.llms.items():
                if s.waiting:
                    self.max_head_wait[name] = max(self.max_head_wait[name], self.t - s.waiting[0].arrival)

    def report(self) -> dict[str, dict[str, float]]:
        out = {}
        for name in self.llms:
            reqs = [r for r in self.requests if r.llm == name]
            done = [r for r in reqs if r.end is not None]
            ttft = sorted(r.prefill_end - r.arrival for r in reqs if r.prefill_end is not None)
            tpot = sorted((r.end - r.prefill_end) / (len(r.output_token_ids) - 1)
                          for r in done if len(r.output_token_ids) > 1)

            def p99(xs):
                return xs[min(len(xs) - 1, math.ceil(0.99 * len(xs)) - 1)] if xs else float("nan")

            out[name] = {"requests": len(reqs), "finished": len(done), "ttft_p99_s": p99(ttft),
                         "tpot_p99_ms": 1e3 * p99(tpot), "max_head_wait_s": self.max_head_wait[name],
                         "max_decode_wait_s": self.max_decode_wait[name],
                         "preemptions": sum(r.num_preemptions for r in reqs)}
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.scheduler.overload_sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=42.0, help="total offered rate, requests/s (default: 42)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals (default: 30)")
    p.add_argument("--policy", default="adbs", help="schedule approach (default: adbs)")
    p.add_argument("--kv-gb", type=float, default=19.6, help="KV pool in GB (default: 19.6)")
    p.add_argument("--drain-s", type=float, default=60.0, help="seconds simulated after the last arrival")
    args = p.parse_args(argv)
    sim = Simulation(six_llms(args.rate), kv_gb=args.kv_gb, policy=args.policy)
    sim.add_poisson(args.duration)
    sim.run(until=args.duration + args.drain_s)
    print(f"{'llm':6} {'req':>5} {'done':>5} {'ttft p99 s':>10} {'tpot p99 ms':>11} {'head wait s':>11} "
          f"{'decode wait s':>13} {'preempt':>7}")
    for name, r in sim.report().items():
        print(f"{name:6} {r['requests']:5d} {r['finished']:5d} {r['ttft_p99_s']:10.2f} {r['tpot_p99_ms']:11.1f} "
              f"{r['max_head_wait_s']:11.2f} {r['max_decode_wait_s']:13.3f} {r['preemptions']:7d}")
    print(f"longest job {sim.longest_job_s:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
