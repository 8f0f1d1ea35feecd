"""The check of a model config's ``memory_budget_bytes`` before anything starts: every LLM can run.

The weights of all LLMs may exceed the budget (elastic LLMs take turns), but the pinned LLMs'
weights must fit, and each elastic LLM's weights plus one token block of KV must fit beside them:
otherwise that LLM could never be woken. The figures are FlexStore's (its weight segments and
granules), computed from each model's config.json on the meta device.
"""

from __future__ import annotations

import math

from muxserve.config import MuxServeConfig
from muxserve.engine.kv_cache import KVLayout
from muxserve.engine.model_config import ModelSpec
from muxserve.engine.model_hub import resolve_model
from muxserve.errors import ConfigError
from muxserve.flexstore.weights import stored_bytes
from muxserve.ipc.devices import parse_dtype


def check_memory_budget(config: MuxServeConfig, page_bytes: int, granule_bytes: int, source: str = "config") -> None:
    """ConfigError naming the LLM and the numbers when ``memory_budget_bytes`` cannot serve it."""
    budget = config.memory_budget_bytes
    if budget is None:
        return
    granules = budget // granule_bytes
    if granules < 1:
        raise ConfigError(f"{source}: memory_budget_bytes {budget} holds no granule of {granule_bytes} B")
    sizes, blocks = {}, {}
    for m in config.models:
        folder = resolve_model(m.model)
        spec = ModelSpec.from_folder(folder)
        sizes[m.name] = math.ceil(stored_bytes(folder, m.torch_dtype_name) / granule_bytes)
        layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, parse_dtype(m.torch_dtype_name),
                          page_bytes)
        blocks[m.name] = math.ceil(layout.pages_per_block * page_bytes / granule_bytes)
    pinned_names = [m.name for m in config.models if m.residency != "elastic"]
    pinned = sum(sizes[n] for n in pinned_names)
    if pinned > granules:
        raise ConfigError(f"{source}: memory_budget_bytes {budget} is too small for the pinned LLMs {pinned_names}: "
                          f"their weights need {pinned * granule_bytes} B ({pinned} granules of {granule_bytes} B), "
                          f"the budget holds {granules * granule_bytes} B")
    for m in config.models:
        if m.residency != "elastic":
            continue
        need = sizes[m.name] + blocks[m.name]
        if pinned + need > granules:
            raise ConfigError(
                f"{source}: elastic LLM {m.name!r} can never run within memory_budget_bytes {budget}: its weights "
                f"({sizes[m.name] * granule_bytes} B) plus one block of KV ({blocks[m.name] * granule_bytes} B) need "
                f"{need} granules of {granule_bytes} B, the budget has {granules - pinned} beside the pinned "
                f"weights; raise memory_budget_bytes or make the LLM smaller")
