"""What the placement knows of each LLM: its rate, its cost-table key and its size (parameters, KV bytes
per token, per tensor-parallel rank), read from the model's config.json; and the placement's settings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cache

import msgspec

from muxserve.errors import InputError
from muxserve.placement.costs import CostModel, TPEstimate, models_of
from muxserve.workload.models_file import LLMEntry

GB = 1024**3
DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


class PlacementSettings(msgspec.Struct, frozen=True):
    gpu_memory_gb: float = 80.0  # per GPU
    memory_fraction: float = 0.98  # of each GPU's memory that weights, reserve and KV may use
    reserve_gb: float = 7.6  # per LLM and GPU: activations (6 GB) + two runtime processes (2 x 0.8 GB)
    overload_sm: int = 20  # the decode SM shares of a mesh may add up to 100 + overload_sm
    max_decode_sm: int = 90
    prefill_sm: int | None = None  # None: 80 up to 10B parameters, 90 up to 20B, else 100
    model_dtype: str = "fp16"
    max_mesh_size: int | None = None  # largest mesh an LLM may get (the GPUs of a node); None: any in the table
    tp_estimate: TPEstimate | None = None  # latencies for mesh sizes the cost table lacks (an estimate)
    tp_sizes: tuple[int, ...] = ()  # the mesh sizes to estimate where missing (e.g. 2, 4, 8)
    # Elastic residency (estimator.py, "Elastic meshes"): a mesh's weights may exceed its memory
    # when the LLMs expected to be resident fit.
    elastic: bool = False
    idle_timeout_s: float = 60.0  # an LLM idle this long is offloaded (the residency policy's knob)
    idle_reserve_gb: float = 1.6  # per offloaded LLM and GPU: its two runtime processes stay (2 x 0.8 GB)
    wake_gbps: float = 25.0  # host -> device copy of a wake, per GPU, where the cost table has no wake_s
    wake_overhead_s: float = 0.05  # fixed part of a wake (mapping, messages) in that estimate

    @property
    def usable_bytes(self) -> float:
        return self.gpu_memory_gb * GB * self.memory_fraction


@dataclass(frozen=True)
class PlacementLLM:
    name: str
    model: str
    rate: float
    cost_key: str  # the model's name in the cost table
    params: int
    kv_bytes_per_token: int  # K and V of every layer and kv-head, whole model
    num_layers: int = 0
    hidden_size: int = 0
    rank_params: tuple[tuple[int, int], ...] = ()  # (TP, parameters of one rank) for each TP the model splits into

    def weight_bytes(self, dtype: str) -> int:
        return self.params * DTYPE_BYTES[dtype]

    def tp_sizes(self) -> list[int]:
        return [tp for tp, _ in self.rank_params]

    def mesh_weight_bytes(self, size: int, dtype: str) -> int:
        """Weights of the LLM on a mesh of ``size`` GPUs with TP = size (replicated parts counted on
        every GPU); the whole model where the shard sizes are unknown."""
        rank = dict(self.rank_params).get(size)
        return (size * rank if rank is not None else self.params) * DTYPE_BYTES[dtype]


def model_facts(model: str) -> tuple[int, int]:
    """(parameter count, KV elements per token) of a model, from its config.json."""
    spec = _spec(model.removeprefix("random:"))
    return _param_count(spec), 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim


TP_CANDIDATES = (1, 2, 4, 8, 16, 32, 64)


def model_tp_facts(model: str) -> tuple[int, int, tuple[tuple[int, int], ...]]:
    """(layers, hidden size, ((tp, parameters of one rank), ...)) for each power-of-two TP up to 64
    that the engine can split the model into (``muxserve.engine.parallel.check_tensor_parallel``)."""
    from muxserve.engine.parallel import check_tensor_parallel, shard_spec

    spec = _spec(model.removeprefix("random:"))
    ranks = []
    for tp in TP_CANDIDATES:
        try:
            check_tensor_parallel(spec, tp)
        except ValueError:
            continue
        # one rank's model with 1 and 2 layers: the rest (embeddings, final norm, lm_head) and one layer
        one, two = (_param_count(shard_spec(dataclasses.replace(spec, num_layers=n), tp)) for n in (1, 2))
        ranks.append((tp, one + (spec.num_layers - 1) * (two - one)))
    return spec.num_layers, spec.hidden_size, tuple(ranks)


@cache
def _spec(model: str):
    from muxserve.engine.model_config import ModelSpec
    from muxserve.engine.model_hub import resolve_model

    try:
        return ModelSpec.from_folder(resolve_model(model))
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"cannot size model {model!r} (placement reads its config.json): {e}") from None


@cache
def _param_count(spec) -> int:
    """Parameters of the model of ``spec`` as the engine builds it (on the meta device)."""
    import torch

    from muxserve.engine.loader import meta_model

    return sum(p.numel() for p in meta_model(spec, torch.float32).parameters())


def cost_key(model: str, costs: CostModel) -> str | None:
    """The model's name in the cost table: its ``model`` string, else the folder's base name."""
    if model in costs.table:
        return model
    key = model.removeprefix("random:").rstrip("/").rsplit("/", 1)[-1]
    return key if key in costs.table else None


def describe_llms(entries: list[LLMEntry], costs: CostModel, dtype: str) -> list[PlacementLLM]:
    out = []
    for e in entries:
        key = cost_key(e.model, costs)
        if key is None:
            raise InputError(f"{e.name}: model {e.model!r} is not in the cost table (it has {models_of(costs.table)}); "
                             "profile it with python -m muxserve.muxsched.profile --model KEY=MODEL")
        params, kv_elems = model_facts(e.model)
        layers, hidden, ranks = model_tp_facts(e.model)
        out.append(PlacementLLM(e.name, e.model, e.rate, key, params, kv_elems * DTYPE_BYTES[dtype], layers, hidden,
                                ranks))
    return out


