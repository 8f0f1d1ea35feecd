"""Checkpoint reading: Hugging Face safetensors folders (single file or sharded with an index)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from muxserve import files

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
