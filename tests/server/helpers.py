"""A real ``python -m muxserve.serve`` process for the server tests, and small HTTP helpers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
KV_CACHE_BYTES = 256 << 20  # SmolLM2 in fp32 needs ~2.8 pages per token


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tiny_with_tokenizer(folder: Path, tokenizer_from: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 64) with SmolLM2's vocabulary, tokenizer and chat template: fast, real text."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                         initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_from / name, folder / name)
    return folder


def write_config(path: Path, models: dict[str, str], kv_cache_bytes: int = KV_CACHE_BYTES) -> Path:
    doc = {"num_gpus": 1, "max_num_seqs": 64, "overload_threshold": 2, "kv_cache_bytes": kv_cache_bytes,
           "models": [{"name": n, "model": m, "mps_percentage": [100, 40], "model_dtype": "fp32"}
                      for n, m in models.items()]}
    path.write_text(yaml.safe_dump(doc))
    return path


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.is_file() else ""

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(config: Path, tmp: Path, *extra: str, timeout: float = 240, env: dict[str, str] | None = None,
                 prelude: str | None = None) -> Server:
    """``python -m muxserve.serve config ...extra``, healthy. ``env``: more environment variables
    (MUXSERVE_API_KEY is only set through it); ``prelude``: Python run in the server process before
    ``muxserve.serve.main`` (to plant a fault)."""
    port = free_port()
    log = tmp / "server.log"
    env = {**{k: v for k, v in os.environ.items() if k != "MUXSERVE_API_KEY"}, "PYTHONUNBUFFERED": "1", **(env or {})}
    entry = ["-m", "muxserve.serve"] if prelude is None else [
        "-c", f"{prelude}\nimport sys\nfrom muxserve.serve import main\nsys.exit(main(sys.argv[1:]))"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, *entry, str(config), "--host", "127.0.0.1", "--port", str(port),
             "--log-dir", str(tmp / "logs"), "--device", "cpu",
             "--no-access-log", *extra],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(proc, port, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.stop()
    raise TimeoutError(f"server not healthy after {timeout} s:\n{server.log_tail()}")


def sse_events(lines) -> list:
    """Decoded ``data:`` payloads of an SSE stream (``[DONE]`` kept as the string)."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a Prometheus text page."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def shm_segments(prefix: str) -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(prefix)}
