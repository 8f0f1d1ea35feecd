"""Helpers of the end-to-end launcher tests: three tiny LLMs, a workload, and a launch runner."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from conftest import TINY_VOCAB, build_tiny_model

from muxserve.engine import LLM, SamplingParams
from muxserve.workload.workload_file import WorkloadRequest, write_workload

REPO = Path(__file__).resolve().parents[2]
ARCHS = {"llm-0": "llama-gqa-hd64", "llm-1": "qwen2", "llm-2": "qwen3"}
RATES = {"llm-0": 12.0, "llm-1": 8.0, "llm-2": 4.0}  # 66 requests over ~2.75 s


@dataclass
class Setup:
    root: Path
    models: dict[str, Path]
    workload: Path
    requests: list[WorkloadRequest]
    expected: dict[int, list[int]]  # idx -> greedy tokens of the offline engine

    def config(self, name: str = "cfg.yaml", kv_cache_bytes: int = 8 << 20, **top) -> Path:
        doc = {"num_gpus": 1, "max_num_seqs": 32, "overload_threshold": 2, "kv_cache_bytes": kv_cache_bytes,
               "models": [{"name": n, "model": str(p), "mps_percentage": [100, 40], "model_dtype": "fp32"}
                          for n, p in self.models.items()], **top}
        path = self.root / name
        path.write_text(yaml.safe_dump(doc))
        return path


def make_requests(seed: int = 7) -> list[WorkloadRequest]:
    rng = random.Random(seed)
    reqs = []
    for llm, rate in RATES.items():
        t = 0.0
        for _ in range(int(rate * 2.75)):
            t += rng.expovariate(rate)
            prompt = [rng.randrange(TINY_VOCAB) for _ in range(rng.randrange(3, 48))]
            reqs.append(WorkloadRequest(0, llm, round(t, 4), prompt, rng.randrange(2, 20)))
    reqs.sort(key=lambda r: r.arrival)
    return [WorkloadRequest(i, r.llm, r.arrival, r.prompt_token_ids, r.output_len) for i, r in enumerate(reqs)]


def offline_tokens(folder: Path, requests: list[WorkloadRequest]) -> dict[int, list[int]]:
    """Greedy tokens of the offline engine for each request, all submitted at once."""
    llm = LLM(str(folder), kv_cache_bytes=8 << 20)
    seqs = {r.idx: llm.engine.add_request(r.prompt_token_ids,
                                          SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True))
            for r in requests}
    while llm.engine.has_unfinished():
        llm.engine.step()
    return {idx: list(s.output_token_ids) for idx, s in seqs.items()}


def build_setup(root: Path) -> Setup:
    models = {name: build_tiny_model(arch, root / name, seed=i) for i, (name, arch) in enumerate(ARCHS.items())}
    requests = make_requests()
    workload = root / "workload.json"
    write_workload(workload, {"rates": [[k, v] for k, v in RATES.items()]}, requests)
    expected = {}
    for name, folder in models.items():
        expected.update(offline_tokens(folder, [r for r in requests if r.llm == name]))
    return Setup(root, models, workload, requests, expected)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_args(config: Path, workload: Path, tmp: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "muxserve.launch", str(config), "--workload-file", str(workload),
            "--log-dir", str(tmp / "logs"),
            "--stats-file", str(tmp / "stats.json"), "--device", "cpu", *extra]


def run_launch(config: Path, workload: Path, tmp: Path, *extra: str, timeout: float = 300):
    """Run the launcher to completion, its stderr into a file as in a logged run; returns (completed
    process with that file's text as ``stderr``, stats dict or None)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(tmp / "launch.stderr", "w+") as err:
        proc = subprocess.run(launch_args(config, workload, tmp, *extra), cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=err, text=True, timeout=timeout)
        err.seek(0)
        proc.stderr = err.read()
    stats_path = tmp / "stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else None
    return proc, stats


def shm_segments(prefix: str = "muxserve") -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(prefix)}
