"""Building a model: the one way every part of MuxServe makes one, and the weights that fill it.

``load_model`` builds the model (or one tensor-parallel rank's shard) on the meta device, gives its
parameters memory (fresh memory on the device, or memory that exists already, e.g. FlexStore's
shared segment), fills them from a checkpoint and computes its rotary tables. The weights come from
a Hugging Face safetensors folder (single file or sharded with an index) or, for benchmarks of real
shapes, from a seeded random draw (``checkpoint``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from muxserve import files
from muxserve.engine.model_config import ModelSpec
from muxserve.engine.models import build_model
from muxserve.engine.models.llama import RMSNorm
from muxserve.engine.models.rotary import RotaryEmbedding
from muxserve.engine.parallel import SINGLE, TensorParallel

LOAD_FORMATS = ("auto", "random")
Weights = Iterable[tuple[str, torch.Tensor]]  # Hugging Face names of the whole model, tensor by tensor

INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(folder: str | Path) -> list[Path]:
    """The weight files of a folder, in index order when the checkpoint is sharded."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        shard_names = sorted(set(files.load(index)["weight_map"].values()))
        shards = [folder / name for name in shard_names]
        missing = [str(f) for f in shards if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that do not exist: {missing}")
        return shards
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no safetensors weights in {folder} (expected model.safetensors or {INDEX_FILE})")
    return found


def iter_weights(folder: str | Path, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of the checkpoint, cast to ``dtype`` if given."""
    for path in safetensors_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                yield name, tensor if dtype is None else tensor.to(dtype)


def checkpoint(folder: str | Path, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
               load_format: str = "auto", seed: int = 0) -> Weights:
    """The weights of a model: its folder's safetensors (``auto``) or seeded random ones (``random``)."""
    if load_format == "random":
        return random_checkpoint(spec, dtype, device, seed)
    if load_format == "auto":
        return iter_weights(folder, dtype)
    raise ValueError(f"load_format {load_format!r}; choose from {LOAD_FORMATS}")


def meta_model(spec: ModelSpec, dtype: torch.dtype, parallel: TensorParallel = SINGLE) -> nn.Module:
    """The model (or one tensor-parallel rank's shard) with every parameter on the meta device, in ``dtype``."""
    with torch.device("meta"):
        return build_model(spec, parallel).to(dtype)


def load_model(spec: ModelSpec, dtype: torch.dtype, device: torch.device, weights: Weights | None,
               parallel: TensorParallel = SINGLE, bind: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """The runnable model (``parallel``: this rank's shard) on ``device``.

    ``bind(model)`` gives the meta-built parameters memory that exists already (default: fresh
    memory on ``device``); ``weights`` (the whole model's, sliced per rank; None: the bound memory
    holds them already) fill them. Rotary tables are computed, not loaded: on ``device``, in float32.
    """
    model = meta_model(spec, dtype, parallel)
    if bind is None:
        model = model.to_empty(device=device)
    else:
        bind(model)
    if weights is not None:
        with torch.no_grad():
            model.load_weights(weights)
    model.rotary = RotaryEmbedding(spec.rope, spec.head_dim, spec.max_position_embeddings).to(device)
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise ValueError(f"model tensors left unbound on the meta device: {on_meta[:5]}")
    return model.eval()


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
