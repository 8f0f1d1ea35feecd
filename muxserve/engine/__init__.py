"""The inference engine, usable alone: ``LLM(model).generate(prompts, SamplingParams(...))``."""

from muxserve.engine.llm import LLM, RequestOutput
from muxserve.engine.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
