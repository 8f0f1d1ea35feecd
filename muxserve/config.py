"""The model_config YAML of one instance (one GPU mesh), decoded and validated.

Format (compatible with the original MuxServe)::

    num_gpus: 1
    max_num_seqs: 256
    overload_threshold: 2
    gpu_memory_utilization: 0.5      # fraction of each GPU's TOTAL memory given to the KV pool
    kv_cache_bytes: 268435456        # optional: pool size in bytes (required meaning on CPU)
    memory_budget_bytes: 1073741824  # optional, with elastic LLMs: the device memory for weights AND KV
                                     # together (instead of kv_cache_bytes); the weights of all LLMs may
                                     # exceed it: elastic LLMs that do not fit start offloaded and are
                                     # woken by their requests, offloading idle ones least recently used
                                     # first (README: serving more LLMs than fit)
    models:
      - name: llm-0
        model: smollm2-135m            # folder, .gguf file or known short name
        tensor_parallel_size: 1
        pipeline_parallel_size: 1
        placement: [[0]]
        mps_percentage: [100, 30]      # [prefill, decode]; the larger one runs prefill
        model_dtype: fp32              # fp16, bf16 or fp32
        max_num_seqs: 64               # optional, per model
        residency: elastic             # optional: pinned (default) or elastic (weights offloaded to
                                       # host memory when idle, woken by the next request)
    workloads:
      workload_file: examples/basic/workload.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import msgspec

from muxserve import files
from muxserve.errors import ConfigError
from muxserve.ipc.devices import dtype_name

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Percentage = Annotated[int, msgspec.Meta(ge=1, le=100)]


class LLMConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """One LLM of the model_config: its model, parallelism, placement, SM shares and dtype."""

    name: str
    model: str
    tensor_parallel_size: PositiveInt = 1
    pipeline_parallel_size: PositiveInt = 1
    placement: list[list[Annotated[int, msgspec.Meta(ge=0)]]] = msgspec.field(default_factory=lambda: [[0]])
    mps_percentage: list[Percentage] = msgspec.field(default_factory=lambda: [100, 100])
    model_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    max_num_seqs: PositiveInt | None = None
    load_format: Literal["auto", "random"] = "auto"  # random: seeded weights from config.json (benchmarks)
    # pinned: the weights stay on the device; elastic: offloaded to a pinned host copy when idle
    # (their device memory serves other LLMs' KV), woken by the next request (README: elastic residency)
    residency: str = "pinned"

    @property
    def prefill_percentage(self) -> int:
        return max(self.mps_percentage)

    @property
    def decode_percentage(self) -> int:
        return min(self.mps_percentage)

    @property
    def torch_dtype_name(self) -> str:
        return dtype_name(self.model_dtype)

    @property
    def devices(self) -> list[int]:
        return self.placement[0]


class WorkloadsEntry(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    workload_file: str | None = None


class MuxServeConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    num_gpus: PositiveInt = 1
    max_num_seqs: PositiveInt = 256
    overload_threshold: Annotated[int, msgspec.Meta(ge=0, le=10)] = 2
    gpu_memory_utilization: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.5
    kv_cache_bytes: PositiveInt | None = None
    memory_budget_bytes: PositiveInt | None = None
    models: Annotated[list[LLMConfig], msgspec.Meta(min_length=1)]
    workloads: WorkloadsEntry = msgspec.field(default_factory=WorkloadsEntry)

    def model(self, name: str) -> LLMConfig:
        for entry in self.models:
            if entry.name == name:
                return entry
        raise ConfigError(f"no LLM named {name!r} in the config; LLMs: {self.model_names}")

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.models]

    def max_num_seqs_of(self, name: str) -> int:
        """Per-model max_num_seqs when given, else the instance-wide value."""
        return self.model(name).max_num_seqs or self.max_num_seqs


def load_config(path: str | Path) -> MuxServeConfig:
    """Read and validate a model_config YAML; every problem is a ConfigError naming the file."""
    config = files.load(path, "model config", MuxServeConfig, ConfigError, source=str(path))
    check_config(config, str(path))
    return config


def check_config(config: MuxServeConfig, source: str) -> None:
    seen: set[str] = set()
    for i, m in enumerate(config.models):
        where = f"{source}: models[{i}] ({m.name!r})"
        if m.name in seen:
            raise ConfigError(f"{where}: two LLMs are named {m.name!r}; names must be unique")
        seen.add(m.name)
        if len(m.mps_percentage) != 2:
            raise ConfigError(f"{where}: mps_percentage must be [prefill, decode], got {m.mps_percentage}")
        if not m.placement or not m.placement[0]:
            raise ConfigError(f"{where}: placement must list the devices, e.g. [[0]]")
        gpus = m.tensor_parallel_size * m.pipeline_parallel_size
        if len(m.devices) != gpus:
            raise ConfigError(f"{where}: placement {m.devices} has {len(m.devices)} devices but "
                              f"tensor_parallel_size x pipeline_parallel_size = {gpus}")
        out_of_range = [d for d in m.devices if d >= config.num_gpus]
        if out_of_range:
            raise ConfigError(f"{where}: placement devices {out_of_range} are outside num_gpus={config.num_gpus}")
        if m.residency not in ("pinned", "elastic"):
            raise ConfigError(f"{where}: residency must be 'pinned' or 'elastic', got {m.residency!r}")
        if m.residency == "elastic" and (gpus > 1 or config.num_gpus > 1):
            raise ConfigError(f"{where}: residency 'elastic' needs a single-device instance and an LLM without "
                              f"tensor or pipeline parallelism (num_gpus={config.num_gpus}, {gpus} devices); "
                              f"use residency 'pinned'")
    if config.memory_budget_bytes is not None:
        if config.kv_cache_bytes is not None:
            raise ConfigError(f"{source}: memory_budget_bytes ({config.memory_budget_bytes}) replaces kv_cache_bytes "
                              f"({config.kv_cache_bytes}): the budget holds weights and KV together; give one of them")
        if not any(m.residency == "elastic" for m in config.models):
            raise ConfigError(f"{source}: memory_budget_bytes needs at least one LLM with 'residency: elastic' (only "
                              f"elastic LLMs' weights can leave the device); use kv_cache_bytes for pinned LLMs")
