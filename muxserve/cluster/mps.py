"""An instance's own NVIDIA MPS control daemon on its node (what scripts/start_mps.sh and
stop_mps.sh do, for a pipe directory private to one mesh and limited to its GPUs).

The daemon inherits ``CUDA_VISIBLE_DEVICES`` (set by Ray to the mesh's GPUs), so two meshes of
one machine each get a daemon of their own over disjoint GPUs."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

CANDIDATES = ("/usr/bin/nvidia-cuda-mps-control", "/usr/local/nvidia/bin/nvidia-cuda-mps-control",
              "/usr/local/cuda/bin/nvidia-cuda-mps-control", "/usr/lib/nvidia/bin/nvidia-cuda-mps-control")


def find_control() -> str:
    for candidate in (shutil.which("nvidia-cuda-mps-control"), *CANDIDATES):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("nvidia-cuda-mps-control not found on this node (no NVIDIA driver with MPS); "
                       "run the cluster without --mps")


def _env(directory: Path) -> dict[str, str]:
    return {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(directory / "nvidia-mps"),
            "CUDA_MPS_LOG_DIRECTORY": str(directory / "nvidia-log")}


def start_mps(directory: Path, timeout_s: float = 5.0) -> None:
    """Start a daemon whose pipe is ``directory/nvidia-mps`` (the layout ``--mps-dir`` expects)."""
    control = find_control()
    (directory / "nvidia-mps").mkdir(parents=True, exist_ok=True)
    (directory / "nvidia-log").mkdir(parents=True, exist_ok=True)
    subprocess.run([control, "-d"], env=_env(directory), check=True, capture_output=True, timeout=30)
    deadline = time.monotonic() + timeout_s
    while not (directory / "nvidia-mps" / "control").exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the MPS daemon did not start; see {directory / 'nvidia-log' / 'control.log'}")
        time.sleep(0.1)


def stop_mps(directory: Path) -> None:
    if not (directory / "nvidia-mps" / "control").exists():
        return
    subprocess.run([find_control()], input=b"quit\n", env=_env(directory), capture_output=True, timeout=30)
