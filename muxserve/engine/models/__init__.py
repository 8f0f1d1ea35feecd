"""Model registry: architecture name in config.json -> implementation."""

from __future__ import annotations

from muxserve.engine.model_config import SUPPORTED_ARCHITECTURES, ModelSpec
from muxserve.engine.models.llama import LlamaForCausalLM
from muxserve.engine.parallel import TensorParallel

# Every supported architecture is a variant of one Llama implementation, selected by ModelSpec.
MODEL_REGISTRY = {arch: LlamaForCausalLM for arch in SUPPORTED_ARCHITECTURES}


def build_model(spec: ModelSpec, parallel: TensorParallel | None = None) -> LlamaForCausalLM:
    """The whole model, or with ``parallel`` of world size > 1 this rank's shard of it."""
    try:
        cls = MODEL_REGISTRY[spec.architecture]
    except KeyError:
        raise ValueError(f"unsupported architecture {spec.architecture!r}; "
                         f"supported: {sorted(MODEL_REGISTRY)}") from None
    return cls(spec, parallel)


__all__ = ["MODEL_REGISTRY", "build_model", "LlamaForCausalLM"]
