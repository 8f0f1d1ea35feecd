"""Weight storage: every parameter of a model packed into one shared segment.

FlexStore builds the model on the meta device, lays its parameters out back to back in one
segment (256-byte aligned), binds the parameters to views of that segment and then reads the
checkpoint straight into them, so the weights exist once per device. A runtime receives the
same layout (a list of :class:`TensorSpec`), maps the segment and binds a meta-built model to
it: zero copies, one set of weights for every process.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from muxserve.engine.loader import iter_weights
from muxserve.engine.model_config import ModelSpec
from muxserve.engine.models import build_model
from muxserve.engine.models.llama import RMSNorm
from muxserve.engine.models.rotary import RotaryEmbedding
from muxserve.engine.parallel import SINGLE, TensorParallel
from muxserve.flexstore.config import ModelEntry
from muxserve.flexstore.protocol import TensorSpec
from muxserve.flexstore.segments import SharedSegment
from muxserve.ipc.devices import parse_dtype

logger = logging.getLogger(__name__)
ALIGN = 256  # bytes; enough for any dtype and for vectorized GPU loads


@dataclass
class StoredWeights:
    """One model's weights as FlexStore holds them."""

    entry: ModelEntry
    folder: Path
    spec: ModelSpec
    dtype: torch.dtype
    segment: SharedSegment
    tensors: list[TensorSpec]


def meta_model(spec: ModelSpec, dtype: torch.dtype, parallel: TensorParallel = SINGLE) -> nn.Module:
    """The model (or one tensor-parallel rank's shard) with every parameter on the meta device, in ``dtype``."""
    with torch.device("meta"):
        return build_model(spec, parallel).to(dtype)


def plan_layout(model: nn.Module) -> tuple[list[TensorSpec], int]:
    """Offsets of every parameter in one flat segment, and the segment's size in bytes."""
    tensors, offset = [], 0
    for name, param in model.named_parameters():
        offset = _align(offset)
        tensors.append(TensorSpec(name=name, shape=tuple(param.shape), offset=offset))
        offset += param.numel() * param.element_size()
    return tensors, max(_align(offset), ALIGN)


def bind_parameters(model: nn.Module, buffer: torch.Tensor, tensors: list[TensorSpec], dtype: torch.dtype) -> None:
    """Replace every parameter of ``model`` by a view of ``buffer`` (1-D uint8) at its offset."""
    expected = {name for name, _ in model.named_parameters()}
    given = {t.name for t in tensors}
    if expected != given:
        raise ValueError(f"weight layout does not fit the model: missing {sorted(expected - given)[:5]}, "
                         f"unexpected {sorted(given - expected)[:5]}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    for t in tensors:
        nbytes = math.prod(t.shape) * itemsize
        if t.offset % itemsize or t.offset + nbytes > buffer.numel():
            raise ValueError(f"tensor {t.name!r} at offset {t.offset} ({nbytes} B) does not fit a segment of {buffer.numel()} B")
        view = buffer[t.offset: t.offset + nbytes].view(dtype).view(t.shape)
        module_name, _, attr = t.name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, nn.Parameter(view, requires_grad=False))


def finish_model(model: nn.Module, spec: ModelSpec, device: torch.device) -> nn.Module:
    """Compute the rotary tables on ``device`` (as ``load_model`` does) and check nothing is left on meta."""
    model.rotary = RotaryEmbedding(spec.rope, spec.head_dim, spec.max_position_embeddings).to(device)
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise ValueError(f"model tensors left unbound on the meta device: {on_meta[:5]}")
    return model.eval()


def load_shared(entry: ModelEntry, folder: Path, device: torch.device, segment_name: str,
                parallel: TensorParallel = SINGLE) -> StoredWeights:
    """Load one model's weights (``parallel``: one rank's shard) into a new shared segment (FlexStore side)."""
    dtype = parse_dtype(entry.dtype)
    spec = ModelSpec.from_folder(folder)
    model = meta_model(spec, dtype, parallel)
    tensors, nbytes = plan_layout(model)
    segment = SharedSegment.create(nbytes, device, segment_name)
    try:
        bind_parameters(model, segment.tensor, tensors, dtype)
        with torch.no_grad():
            if entry.load_format == "random":
                model.load_weights(random_checkpoint(spec, dtype, device, entry.seed))
            else:
                model.load_weights(iter_weights(folder, dtype))
    except BaseException:
        segment.release()
        raise
    return StoredWeights(entry, folder, spec, dtype, segment, tensors)


def attach_model(spec: ModelSpec, dtype: torch.dtype, device: torch.device, buffer: torch.Tensor,
                 tensors: list[TensorSpec], parallel: TensorParallel = SINGLE) -> nn.Module:
    """Build the model (``parallel``: this rank's shard) on meta and bind it to a mapped weight segment."""
    model = meta_model(spec, dtype, parallel)
    bind_parameters(model, buffer, tensors, dtype)
    return finish_model(model, spec, device)


def random_model(spec: ModelSpec, dtype: torch.dtype, device: torch.device, seed: int,
                 parallel: TensorParallel = SINGLE) -> nn.Module:
    """The model (``parallel``: one rank's shard) with deterministic random weights on ``device``:
    N(0, 0.02) matrices, unit norms, zero biases, as ``load_format: random`` stores them.

    A tensor-parallel shard gets exactly its slice of the whole model's random weights, so TP=n
    computes what TP=1 computes (see ``random_checkpoint``).
    """
    model = meta_model(spec, dtype, parallel).to_empty(device=device)
    with torch.no_grad():
        model.load_weights(random_checkpoint(spec, dtype, device, seed))
    return finish_model(model, spec, device)


def random_checkpoint(spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                      seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The whole model's random weights as Hugging Face-named tensors, one at a time.

    Drawn parameter by parameter in the whole (unsharded) model's order from one generator on
    ``device``; fused q/k/v and gate/up are drawn whole, then split into their checkpoint names.
    """
    whole = meta_model(spec, dtype)
    norms = {name + ".weight" for name, m in whole.named_modules() if isinstance(m, RMSNorm)}
    gen = torch.Generator(device=device).manual_seed(seed)
    q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    split = {"qkv_proj": (("q_proj", "k_proj", "v_proj"), (q_size, kv_size, kv_size)),
             "gate_up_proj": (("gate_proj", "up_proj"), (spec.intermediate_size, spec.intermediate_size))}
    for name, param in whole.named_parameters():
        tensor = torch.empty(param.shape, dtype=dtype, device=device)
        if name in norms:
            tensor.fill_(1.0)
        elif name.endswith(".bias"):
            tensor.zero_()
        else:
            tensor.normal_(0.0, 0.02, generator=gen)
        prefix, kind, leaf = name.rsplit(".", 2) if name.count(".") >= 2 else ("", "", name)
        if kind in split:
            names, sizes = split[kind]
            for part_name, part in zip(names, tensor.split(sizes, dim=0)):
                yield f"{prefix}.{part_name}.{leaf}", part
        else:
            yield name, tensor
        del tensor


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN
