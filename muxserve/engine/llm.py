"""Offline generation API: ``LLM(model).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

from muxserve.engine.llm_engine import EngineConfig, LLMEngine
from muxserve.engine.logprobs import TokenLogprobs
from muxserve.engine.sampling_params import SamplingParams
from muxserve.progress import Progress

# Files of which at least one is present in a folder that carries a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class RequestOutput:
    """The result of one prompt."""

    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated ids only
    text: str
    finish_reason: str
    num_preemptions: int = 0
    logprobs: list[TokenLogprobs] | None = None  # with SamplingParams.logprobs: one per generated token
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # with SamplingParams.prompt_logprobs


class LLM:
    """Generate from one model, in process.

    Args:
        model: a known short name (``smollm2-135m``), a Hugging Face folder or a ``.gguf`` file.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        device: ``cpu`` or ``cuda``.
        **kwargs: further :class:`EngineConfig` fields (``kv_cache_bytes``, ``max_num_seqs``, ...).
    """

    def __init__(self, model: str = "smollm2-135m", dtype: str = "float32", device: str = "cpu", **kwargs):
        self.engine = LLMEngine(EngineConfig(model=model, dtype=dtype, device=device, **kwargs))
        self._tokenizer = None

    def has_tokenizer(self) -> bool:
        """Whether the model folder carries a tokenizer (random-weight benchmark models do not)."""
        return any((Path(self.engine.folder) / name).is_file() for name in TOKENIZER_FILES)

    def get_tokenizer(self):
        if self._tokenizer is None:
            if not self.has_tokenizer():
                raise FileNotFoundError(f"model folder {self.engine.folder} has no tokenizer "
                                        f"(none of {', '.join(TOKENIZER_FILES)}); pass prompts as token ids")
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.engine.folder)
        return self._tokenizer

    def generate(self, prompts: str | Seq[str] | Seq[Seq[int]], sampling_params: SamplingParams | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for every prompt (a string or a list of token ids); outputs keep prompt order."""
        params = sampling_params or SamplingParams()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        # Token-id prompts need no tokenizer; output text stays empty when the folder has none.
        needs_tokenizer = any(isinstance(p, str) for p in prompts) or self.has_tokenizer()
        tokenizer = self.get_tokenizer() if needs_tokenizer else None
        texts: list[str | None] = []
        token_ids: list[list[int]] = []
        for prompt in prompts:
            if isinstance(prompt, str):
                token_ids.append(tokenizer.encode(prompt, add_special_tokens=True))
                texts.append(prompt)
            else:
                token_ids.append(list(prompt))
                texts.append(None)
        # Check every prompt before queueing any, so a rejected batch leaves nothing behind.
        for ids in token_ids:
            self.engine.check_request(ids, params)
        seqs = [self.engine.add_request(ids, params) for ids in token_ids]
        with Progress(len(seqs), "generating", "req", enabled=use_tqdm) as bar:
            while self.engine.has_unfinished():
                bar.update(len(self.engine.step()))
        return [
            RequestOutput(text, s.prompt_token_ids, list(s.output_token_ids),
                          tokenizer.decode(s.output_token_ids, skip_special_tokens=True) if tokenizer else "",
                          str(s.finish_reason), s.num_preemptions,
                          list(s.logprobs) if params.logprobs is not None else None, s.prompt_logprobs)
            for text, s in zip(texts, seqs)
        ]

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation and generate the assistant turn."""
        if messages and isinstance(messages[0], dict):
            messages = [messages]  # type: ignore[list-item]
        tokenizer = self.get_tokenizer()
        if not tokenizer.chat_template:
            raise ValueError(f"model {self.engine.folder} has no chat template")
        prompts = [_as_ids(tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True))
                   for conv in messages]
        return self.generate(prompts, sampling_params, use_tqdm)


def _as_ids(encoded) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template; older versions a list.
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    return list(encoded)
