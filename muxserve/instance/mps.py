"""The environment that puts a CUDA process under an NVIDIA MPS daemon (scripts/start_mps.sh) at a share of the SMs."""

from __future__ import annotations

from pathlib import Path


def mps_env(mps_dir: str | None, percentage: int) -> dict[str, str]:
    """Environment that puts a CUDA process under the MPS daemon at ``percentage`` of the SMs."""
    if not mps_dir:
        return {}
    base = Path(mps_dir)
    # Accept both the directory given to start_mps.sh and its nvidia-mps subfolder.
    pipe = base if base.name == "nvidia-mps" else base / "nvidia-mps"
    log = pipe.parent / "nvidia-log"
    return {
        "CUDA_MPS_PIPE_DIRECTORY": str(pipe),
        "CUDA_MPS_LOG_DIRECTORY": str(log),
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(percentage),
    }
