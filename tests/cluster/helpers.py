"""A placement of four tiny LLMs over two Ray "nodes" of two CPU stand-in GPUs, its workload, the
offline engine's tokens for it, and helpers to run the cluster commands and look at processes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml
from conftest import TINY_VOCAB, build_tiny_model
from launch.helpers import offline_tokens
from server.helpers import alive, build_tiny_with_tokenizer, free_port

from muxserve.workload.workload_file import WorkloadRequest, write_workload

REPO = Path(__file__).resolve().parents[2]
ARCHS = {"llm-0": "llama-gqa-hd64", "llm-1": "qwen2", "llm-2": "qwen3"}  # llm-3: a tiny model with a tokenizer
# placement node 0: one mesh of 2 GPUs (tensor parallel); node 1: two meshes of one GPU each
MESHES = [(0, 0, ["llm-0", "llm-1"], 2), (1, 1, ["llm-2"], 1), (2, 1, ["llm-3"], 1)]
KV_CACHE_BYTES = 8 << 20


@dataclass
class World:
    root: Path
    placement: Path
    models: dict[str, Path]
    workload: Path
    requests: list[WorkloadRequest]
    expected: dict[int, list[int]]  # request idx -> greedy tokens of the offline engine

    def by_llm(self, llm: str) -> list[WorkloadRequest]:
        return [r for r in self.requests if r.llm == llm]


def write_placement(root: Path, models: dict[str, Path], meshes=MESHES) -> Path:
    """placement.json and per-mesh configs in the placement optimizer's layout."""
    out = root / "placement"
    (out / "muxserve").mkdir(parents=True)
    entries = []
    for index, node, llms, gpus in meshes:
        config = f"muxserve/models_mesh{index}_n{gpus}.yaml"
        doc = {"num_gpus": gpus, "max_num_seqs": 32, "overload_threshold": 2, "kv_cache_bytes": KV_CACHE_BYTES,
               "models": [{"name": n, "model": str(models[n]), "tensor_parallel_size": gpus,
                           "pipeline_parallel_size": 1, "placement": [list(range(gpus))],
                           "mps_percentage": [100, 40], "model_dtype": "fp32"} for n in llms]}
        (out / config).write_text(yaml.safe_dump(doc, sort_keys=False))
        entries.append({"mesh": index, "node": node, "devices": list(range(gpus)), "num_gpus": gpus,
                        "config": config, "llms": llms})
    (out / "placement.json").write_text(json.dumps({"method": "by hand", "meshes": entries}, indent=1))
    return out


def make_requests(llms: list[str], per_llm: int = 6, seed: int = 11) -> list[WorkloadRequest]:
    rng = random.Random(seed)
    reqs = []
    for llm in llms:
        t = 0.0
        for _ in range(per_llm):
            t += rng.expovariate(4.0)
            prompt = [rng.randrange(TINY_VOCAB) for _ in range(rng.randrange(3, 40))]
            reqs.append(WorkloadRequest(0, llm, round(t, 4), prompt, rng.randrange(2, 16)))
    reqs.sort(key=lambda r: r.arrival)
    return [WorkloadRequest(i, r.llm, r.arrival, r.prompt_token_ids, r.output_len) for i, r in enumerate(reqs)]


def build_world(root: Path, tokenizer_from: Path) -> World:
    models = {name: build_tiny_model(arch, root / name, seed=i) for i, (name, arch) in enumerate(ARCHS.items())}
    models["llm-3"] = build_tiny_with_tokenizer(root / "llm-3", tokenizer_from, seed=3)
    requests = make_requests(list(models))
    workload = root / "workload.json"
    write_workload(workload, {"rates": [[n, 4.0] for n in models]}, requests)
    expected = {}
    for name, folder in models.items():
        expected.update(offline_tokens(folder, [r for r in requests if r.llm == name]))
    return World(root, write_placement(root, models), models, workload, requests, expected)


def cluster_env(state_dir: Path) -> dict[str, str]:
    """The environment of every command and Ray node: the repository importable, our state folder."""
    path = os.environ.get("PYTHONPATH", "")
    # one thread per process: about twenty of them share the machine's cores
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO),
            "PYTHONUNBUFFERED": "1", "MUXSERVE_CLUSTER_DIR": str(state_dir), "OMP_NUM_THREADS": "1"}


@dataclass
class Up:
    """A running ``muxserve cluster up``."""

    proc: subprocess.Popen
    port: int
    name: str
    log: Path
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def cluster(self) -> dict:
        return httpx.get(self.url + "/cluster", timeout=10).json()

    def command(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "muxserve.cluster", *args, "--name", self.name], cwd=REPO,
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def cluster_up(placement: Path, tmp: Path, env: dict[str, str], *extra: str, name: str = "test",
               timeout: float = 300) -> Up:
    port = free_port()
    log = tmp / f"up-{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "muxserve.cluster", "up", str(placement), "--port", str(port),
                                 "--name", name, "--log-dir", str(tmp / "logs"), "--drain-timeout", "10", *extra],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    up = Up(proc, port, name, log, env)
    state = Path(env["MUXSERVE_CLUSTER_DIR"]) / f"{name}.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"cluster up exited with {proc.returncode}:\n{up.log_text()[-5000:]}")
        if state.is_file() and json.loads(state.read_text()).get("serving"):
            return up
        time.sleep(0.5)
    up.kill()
    raise TimeoutError(f"cluster not serving after {timeout} s:\n{up.log_text()[-5000:]}")


def group_alive(pgid: int) -> list[int]:
    """Live processes of process group ``pgid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) == pgid:
                out.append(int(entry.name))
    return out


def wait_gone(pids, timeout: float = 20) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
