"""Tensor parallelism of one model over a process group (Megatron-style, as in the original).

Each rank of a ``tensor_parallel_size``-way group holds:

- q/k/v column-parallel by heads: rank r owns q heads ``[r*Hq/tp, (r+1)*Hq/tp)`` and kv heads
  ``[r*H/tp, (r+1)*H/tp)``; as ``tp`` divides H, every rank's q heads read only its own kv heads
  (GQA groups stay whole). Biases (Qwen2) and q/k norms follow their heads (norms are per head_dim,
  so they are replicated);
- gate/up column-parallel by ``intermediate_size / tp`` rows;
- o_proj and down_proj row-parallel (their input columns), each followed by one all-reduce (sum);
- embeddings, lm_head and the RMSNorms replicated (the simplest scheme: no vocab-parallel
  gather; every rank computes the full logits, rank 0's sampled tokens are broadcast so that
  unseeded sampling cannot make the ranks' schedules diverge);
- its own kv heads' pages: the rank's ``KVLayout`` has ``num_kv_heads / tp`` heads and its own pool;
  every rank runs the same scheduler over the same requests, so page ids agree across ranks.

At ``tp == 1`` nothing here runs: no collective is called and the numerics are unchanged.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch

from muxserve.engine.model_config import ModelSpec


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group.

    ``group`` is a ``torch.distributed`` process group of exactly ``world_size`` ranks (``None``: the
    default group). Collectives go through ``torch.distributed``: gloo on CPU, NCCL on GPU.
    """

    world_size: int = 1
    rank: int = 0
    group: Any = None

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"tensor-parallel rank {self.rank} is outside [0, {self.world_size})")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_group(cls, group=None) -> TensorParallel:
        """The caller's rank in an initialized ``torch.distributed`` group (default: the world)."""
        import torch.distributed as dist

        if not dist.is_initialized():
            raise ValueError("tensor parallelism needs an initialized torch.distributed process group")
        return cls(dist.get_world_size(group), dist.get_rank(group), group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group in place and return it (the identity at world size 1)."""
        if self.world_size == 1:
            return x
        import torch.distributed as dist

        dist.all_reduce(x, group=self.group)
        return x

    def broadcast_tokens(self, tokens: list[int]) -> list[int]:
        """Rank 0's token ids, on every rank (the identity at world size 1)."""
        if self.world_size == 1:
            return tokens
        import torch.distributed as dist

        device = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"
        t = torch.tensor(tokens, dtype=torch.int64, device=device)
        dist.broadcast(t, src=dist.get_global_rank(self.group, 0) if self.group is not None else 0,
                       group=self.group)
        return t.tolist()


SINGLE = TensorParallel()


def check_tensor_parallel(spec: ModelSpec, tp: int) -> None:
    """Raise ValueError unless ``tp`` splits the heads, kv heads and MLP of ``spec`` evenly."""
    if tp < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
    if spec.num_kv_heads % tp:
        raise ValueError(f"tensor_parallel_size {tp} does not divide num_key_value_heads {spec.num_kv_heads} "
                         f"of {spec.architecture}; each rank must hold whole kv heads")
    if spec.num_heads % tp:  # unreachable while num_kv_heads divides num_heads; kept for safety
        raise ValueError(f"tensor_parallel_size {tp} does not divide num_attention_heads {spec.num_heads} "
                         f"of {spec.architecture}")
    if spec.intermediate_size % tp:
        raise ValueError(f"tensor_parallel_size {tp} does not divide intermediate_size {spec.intermediate_size} "
                         f"of {spec.architecture}")


def shard_spec(spec: ModelSpec, tp: int) -> ModelSpec:
    """The shape one rank of a ``tp``-way group builds: its heads, kv heads and MLP rows.

    hidden_size, vocab and everything else stay whole (embeddings, norms and lm_head are replicated).
    """
    check_tensor_parallel(spec, tp)
    if tp == 1:
        return spec
    return dataclasses.replace(spec, num_heads=spec.num_heads // tp, num_kv_heads=spec.num_kv_heads // tp,
                               intermediate_size=spec.intermediate_size // tp)


def init_tensor_parallel(world_size: int, rank: int, *, master_addr: str = "127.0.0.1", master_port: int = 29500,
                         backend: str | None = None) -> TensorParallel:
    """Initialize the default process group for one rank (gloo on CPU, NCCL with CUDA) and return it.

    With NCCL the rank takes GPU ``rank % device_count``.
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = torch.device("cuda", rank % torch.cuda.device_count()) if backend == "nccl" else torch.device("cpu")
    os.environ.setdefault("MASTER_ADDR", master_addr)
    os.environ.setdefault("MASTER_PORT", str(master_port))
    return join_group(world_size, rank, f"tcp://{master_addr}:{master_port}", device)


def join_group(world_size: int, rank: int, init_method: str, device: torch.device,
               timeout_s: float = 600.0) -> TensorParallel:
    """Join the default process group as ``rank``: NCCL when ``device`` is a GPU (made current), else gloo."""
    import datetime

    import torch.distributed as dist

    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device)
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, rank=rank, world_size=world_size, init_method=init_method,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return TensorParallel.from_group()


def leave_group() -> None:
    """Destroy the default process group, if any (a clean exit for NCCL)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
