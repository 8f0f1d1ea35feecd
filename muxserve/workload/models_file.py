"""``models.yaml``: the LLMs to serve and their request rates (input of the workload generator and
of the placement optimizer). Compatible with the original::

    cluster:
      nnodes: 1
      ngpus_per_node: 4
    avg_prompt_len: 161        # optional (placement): average lengths of the workload
    avg_output_len: 338
    models:
    - name: llm-0
      model: smollm2-135m       # short name, Hugging Face folder, .gguf file or random:FOLDER
      rate: 12                  # requests/s
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from muxserve import files
from muxserve.errors import InputError


def natural_key(name: str) -> list:
    """Sort key that orders embedded numbers numerically: ``llm-2`` before ``llm-10``."""
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", name))]


@dataclass(frozen=True)
class LLMEntry:
    name: str
    model: str
    rate: float  # requests/s


@dataclass
class ModelsFile:
    models: list[LLMEntry]  # in natural order of their names
    nnodes: int = 1
    ngpus_per_node: int = 1
    avg_prompt_len: float | None = None
    avg_output_len: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # other top-level keys, kept when rewriting

    @property
    def rates(self) -> dict[str, float]:
        return {m.name: m.rate for m in self.models}


def _number(value: Any, where: str, *, minimum: float, integer: bool = False) -> float:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value) or value < minimum:
        kind = "an integer" if integer else "a number"
        raise InputError(f"{where} must be {kind} >= {minimum:g}, got {value!r}")
    return value


def parse_models(data: Any, source: str) -> ModelsFile:
    """Validate the decoded YAML of a models file; ``source`` names it in errors."""
    if not isinstance(data, dict):
        raise InputError(f"{source}: expected a mapping with 'cluster' and 'models', got {type(data).__name__}")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise InputError(f"{source}: needs a non-empty 'models' list of {{name, model, rate}}")
    cluster = data.get("cluster") or {}
    if not isinstance(cluster, dict):
        raise InputError(f"{source}: 'cluster' must be a mapping with nnodes and ngpus_per_node")
    nnodes = int(_number(cluster.get("nnodes", 1), f"{source}: cluster.nnodes", minimum=1, integer=True))
    ngpus = int(_number(cluster.get("ngpus_per_node", 1), f"{source}: cluster.ngpus_per_node", minimum=1, integer=True))
    entries, seen = [], set()
    for i, m in enumerate(models):
        if not isinstance(m, dict):
            raise InputError(f"{source}: models[{i}] must be a mapping with name, model and rate")
        name = m.get("name")
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise InputError(f"{source}: models[{i}] needs a 'name' without spaces, got {name!r}")
        where = f"{source}: models[{i}] ({name!r})"
        if name in seen:
            raise InputError(f"{where}: two LLMs are named {name!r}; names must be unique")
        seen.add(name)
        model = m.get("model")
        if not isinstance(model, str) or not model:
            raise InputError(f"{where} has no 'model' (a short name, folder or .gguf file)")
        if "rate" not in m:
            raise InputError(f"{where} has no 'rate' (requests/s)")
        rate = float(_number(m["rate"], f"{where}: rate", minimum=0))
        entries.append(LLMEntry(name, model, rate))
    if not any(e.rate > 0 for e in entries):
        raise InputError(f"{source}: every rate is 0; at least one LLM needs requests")
    avg = {}
    for key in ("avg_prompt_len", "avg_output_len"):
        if data.get(key) is not None:
            avg[key] = float(_number(data[key], f"{source}: {key}", minimum=1))
    extra = {k: v for k, v in data.items() if k not in ("cluster", "models", "avg_prompt_len", "avg_output_len")}
    entries.sort(key=lambda e: natural_key(e.name))
    return ModelsFile(entries, nnodes, ngpus, avg.get("avg_prompt_len"), avg.get("avg_output_len"), extra)


def load_models_file(path: str | Path) -> ModelsFile:
    """Read a models.yaml; every problem is an InputError naming the file."""
    return parse_models(files.load(path, "model yaml", source=str(path)), str(path))


def write_models_file(path: str | Path, models: ModelsFile) -> None:
    """Write ``models`` as a models.yaml, atomically."""
    files.write_atomic(Path(path), models_file_text(models).encode())


def models_file_text(models: ModelsFile) -> str:
    """The YAML text of ``models`` (what ``load_models_file`` reads back)."""
    doc: dict[str, Any] = {"cluster": {"nnodes": models.nnodes, "ngpus_per_node": models.ngpus_per_node}}
    if models.avg_prompt_len is not None:
        doc["avg_prompt_len"] = models.avg_prompt_len
    if models.avg_output_len is not None:
        doc["avg_output_len"] = models.avg_output_len
    doc.update(models.extra)
    doc["models"] = [{"name": m.name, "model": m.model, "rate": m.rate} for m in models.models]
    return yaml.safe_dump(doc, sort_keys=False)
