"""Small helpers shared by the end-to-end benchmark scripts (run, analyze, MPS sweep, ChatLMSYS)."""

from __future__ import annotations

import gzip
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from muxserve import files

REPO = Path(__file__).resolve().parents[2]

SYSTEMS = ("muxserve", "temporal", "spatial", "instances")
SYSTEM_LABELS = {"muxserve": "MuxServe", "temporal": "Temporal multiplexing", "spatial": "Spatial partitioning",
                 "instances": "Instances (no MPS)"}
# Not a system: each LLM measured alone on the whole GPU before the replays, the SLO base of every system
BASE_RUN = "alone"


class BenchError(RuntimeError):
    """A benchmark step that cannot go on; the message says which and why."""


def write_json(path: str | Path, doc: Any, indent: int | None = 1) -> None:
    """Write JSON atomically (a crash leaves the old file or none, never half a file), gzip-compressed
    when the name ends in ``.gz`` (what the runs write for per-request data)."""
    data = (json.dumps(doc, indent=indent) + "\n").encode()
    if str(path).endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    files.write_atomic(Path(path), data)


def read_json(path: str | Path) -> Any:
    """A JSON file, ``.json`` or ``.json.gz``."""
    return json.loads(files.read_bytes(path))


STATS_SUFFIXES = (".json.gz", ".json")  # merged statistics as written now, and as older runs wrote them


def stats_files(runs_dir: Path, names: tuple[str, ...] = SYSTEMS) -> list[tuple[str, Path]]:
    """(system, file) of every merged statistics file ``points/<tag>/<system>.json.gz`` (or ``.json``);
    ``names=(BASE_RUN,)``: the common SLO base's calibration runs."""
    found = []
    for path in sorted((runs_dir / "points").glob("*/*.json*")):
        system, _, suffix = path.name.partition(".")
        if system in names and f".{suffix}" in STATS_SUFFIXES:
            found.append((system, path))
    return found


def fmt_num(x: float) -> str:
    """0.7 -> '0.7', 1.0 -> '1', 0.25 -> '0.25' (for folder names)."""
    return f"{x:g}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def gpu_memory_gib() -> float | None:
    """Total memory of GPU 0 from nvidia-smi (no CUDA context in this process: MPS starts and stops
    around it), or None."""
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    try:
        return float(smi.stdout.strip().splitlines()[0]) / 1024 if smi.returncode == 0 else None
    except (ValueError, IndexError):
        return None


def device_info(device: str) -> dict[str, Any]:
    """What ran the benchmark: GPU name, driver and memory (nvidia-smi), CPU, library versions."""
    info: dict[str, Any] = {"device": device, "python": platform.python_version(), "host_cpu": platform.processor()
                            or platform.machine(), "cpu_count": os.cpu_count(), "muxserve_commit": git_commit()}
    try:
        import torch

        info["torch"] = torch.__version__
        if device == "cuda":
            info["cuda"] = torch.version.cuda  # no CUDA call: this process must hold no context (MPS)
    except ImportError:
        pass
    for mod in ("triton", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    if device == "cuda":
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            if smi.returncode == 0:
                info["nvidia_smi"] = smi.stdout.strip().splitlines()
        except (OSError, subprocess.SubprocessError):
            pass
    return info
