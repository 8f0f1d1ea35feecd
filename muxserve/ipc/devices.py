"""Dtype and device names as every process of an instance spells them, and their torch objects.

Torch is imported only by the functions that return torch objects, so the model_config and
other light modules can name dtypes without importing it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Every accepted spelling -> torch's name. The short forms are the model_config's (model_dtype).
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def dtype_name(dtype: str) -> str:
    """``bf16`` / ``bfloat16`` -> ``bfloat16``; ValueError naming the dtype otherwise."""
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unsupported dtype {dtype!r}; choose from {', '.join(DTYPES)}")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from any spelling in DTYPES (or a supported torch dtype itself)."""
    import torch

    if isinstance(dtype, torch.dtype):
        if str(dtype).removeprefix("torch.") in DTYPES:
            return dtype
        raise ValueError(f"unsupported dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return getattr(torch, dtype_name(dtype))


def parse_device(device: str | torch.device) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a torch device; ValueError for anything else or a missing GPU."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:  # torch rejects unknown device types ("tpu") with a RuntimeError
        raise ValueError(f"unsupported device {device!r}; choose cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; choose cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available")
    return dev
