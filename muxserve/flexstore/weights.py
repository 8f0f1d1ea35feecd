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

import torch
from torch import nn

from muxserve.engine.loader import checkpoint, load_model, meta_model
from muxserve.engine.model_config import ModelSpec
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
            raise ValueError(f"tensor {t.name!r} at offset {t.offset} ({nbytes} B) does not fit a segment of "
                             f"{buffer.numel()} B")
        view = buffer[t.offset: t.offset + nbytes].view(dtype).view(t.shape)
        module_name, _, attr = t.name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, nn.Parameter(view, requires_grad=False))


def stored_bytes(folder: Path, dtype: str, parallel: TensorParallel = SINGLE) -> int:
    """Bytes FlexStore's segment of one model (rank) takes, computed on the meta device (nothing is read
    but ``config.json``): what its weights cost the device's memory budget."""
    return plan_layout(meta_model(ModelSpec.from_folder(folder), parse_dtype(dtype), parallel))[1]


def load_shared(entry: ModelEntry, folder: Path, device: torch.device, segment_name: str,
                parallel: TensorParallel = SINGLE) -> StoredWeights:
    """Load one model's weights (``parallel``: one rank's shard) into a new shared segment (FlexStore side)."""
    dtype = parse_dtype(entry.dtype)
    spec = ModelSpec.from_folder(folder)
    model = meta_model(spec, dtype, parallel)  # FlexStore keeps the weights only: no runnable model
    tensors, nbytes = plan_layout(model)
    segment = SharedSegment.create(nbytes, device, segment_name)
    try:
        bind_parameters(model, segment.tensor, tensors, dtype)
        with torch.no_grad():
            model.load_weights(checkpoint(folder, spec, dtype, device, entry.load_format, entry.seed))
    except BaseException:
        segment.release()
        raise
    return StoredWeights(entry, folder, spec, dtype, segment, tensors)


def attach_model(spec: ModelSpec, dtype: torch.dtype, device: torch.device, buffer: torch.Tensor,
                 tensors: list[TensorSpec], parallel: TensorParallel = SINGLE) -> nn.Module:
    """The runnable model (``parallel``: this rank's shard) on a mapped weight segment (``loader.load_model``)."""
    return load_model(spec, dtype, device, None, parallel,
                      bind=lambda model: bind_parameters(model, buffer, tensors, dtype))


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN
