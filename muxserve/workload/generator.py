"""Workload generation: per-LLM arrival processes and ShareGPT prompts tokenized for each LLM's model.

Every LLM has its own random streams, derived from the seed and its name, so equal arguments give
equal requests and adding an LLM leaves the others' streams alone.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import numpy as np

from muxserve.errors import InputError
from muxserve.progress import Progress
from muxserve.workload.arrivals import ArrivalProcess
from muxserve.workload.datasets import SHAREGPT_FILE, LengthFilter, Sample, TokenizedDialogs, load_tokenizer
from muxserve.workload.models_file import LLMEntry, natural_key
from muxserve.workload.workload_file import WorkloadRequest

logger = logging.getLogger("muxserve.workload_utils")

DEFAULT_NUM_REQUESTS = 200  # requests of the most popular LLM when neither count nor duration is given
DEFAULT_TOKENIZER = "smollm2-135m"


class GenerateOptions(msgspec.Struct, frozen=True):
    distribution: str = "poisson"
    cv: float = 1.0
    start: float = 0.0
    num_requests: int | None = None  # of the most popular LLM; the others get theirs in proportion to rate
    duration: float | None = None  # or: every arrival in [start, start + duration)
    seed: int = 0
    length_filter: LengthFilter = msgspec.field(default_factory=LengthFilter)
    max_output_len: int | None = None  # cap on output lengths (None: the dataset's)
    dataset: str = SHAREGPT_FILE  # recorded in info

    def __post_init__(self) -> None:
        if self.num_requests is not None and self.duration is not None:
            raise InputError("give either a number of requests or a duration, not both")
        if self.num_requests is not None and self.num_requests < 1:
            raise InputError(f"number of requests must be >= 1, got {self.num_requests}")
        if self.duration is not None and not self.duration > 0:
            raise InputError(f"duration must be > 0 seconds, got {self.duration}")
        if self.max_output_len is not None and self.max_output_len < 1:
            raise InputError(f"max output length must be >= 1, got {self.max_output_len}")
        try:
            ArrivalProcess(self.distribution, 1.0, self.cv)
        except ValueError as e:
            raise InputError(str(e)) from None


def stream(seed: int, purpose: int, name: str) -> np.random.Generator:
    """An RNG of its own per (seed, purpose, LLM name): adding an LLM does not change the others."""
    return np.random.default_rng([seed, purpose, zlib.crc32(name.encode())])


def request_counts(rates: dict[str, float], num_requests: int) -> dict[str, int]:
    """``num_requests`` for the most popular LLM, the others in proportion to their rates (>= 1 if rate > 0)."""
    top = max(rates.values())
    return {name: max(1, round(num_requests * rate / top)) if rate > 0 else 0 for name, rate in rates.items()}


def length_stats(values: Sequence[int]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {}
    return {"mean": round(float(arr.mean()), 3), "p50": round(float(np.percentile(arr, 50)), 3),
            "p90": round(float(np.percentile(arr, 90)), 3), "p99": round(float(np.percentile(arr, 99)), 3),
            "min": int(arr.min()), "max": int(arr.max())}


def length_info(requests: list[WorkloadRequest]) -> dict[str, Any]:
    """Means (what the scheduler reads as ``prompt_len``/``output_len``) and percentiles of the
    lengths actually in the file."""
    prompt = length_stats([len(r.prompt_token_ids) for r in requests])
    output = length_stats([r.output_len for r in requests])
    return {"prompt_len": prompt.get("mean", 0.0), "output_len": output.get("mean", 0.0),
            "prompt_len_stats": prompt, "output_len_stats": output}


class Tokenizers:
    """One tokenizer per model (or the ``--tokenizer`` override), and its lazily tokenized dialogs."""

    def __init__(self, dialogs, length_filter: LengthFilter, override: str | None = None,
                 loader: Callable[[str], Any] = load_tokenizer):
        self.dialogs = dialogs
        self.filter = length_filter
        self.override = override
        self.loader = loader
        self._by_name: dict[str, tuple[str, TokenizedDialogs]] = {}

    def for_model(self, llm: str, model: str) -> tuple[str, TokenizedDialogs]:
        """(name of the tokenizer used, the dialogs it tokenizes) for an LLM of ``model``."""
        name = self.override or model
        if name not in self._by_name:
            try:
                self._by_name[name] = (name, TokenizedDialogs(self.dialogs, self.loader(name), self.filter))
            except InputError as e:
                if self.override or name == DEFAULT_TOKENIZER:
                    raise
                logger.warning("%s: %s; using the %s tokenizer (choose one with --tokenizer)", llm, e,
                               DEFAULT_TOKENIZER)
                self._by_name[name] = self.for_model(llm, DEFAULT_TOKENIZER)
        return self._by_name[name]


def model_vocab_size(who: str, model: str) -> int:
    from muxserve.engine.model_config import ModelSpec
    from muxserve.engine.model_hub import resolve_model

    try:
        return ModelSpec.from_folder(resolve_model(model.removeprefix("random:"))).vocab_size
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"{who} (model {model!r}): cannot read the model's vocabulary size: {e}") from None


def check_vocabulary(who: str, model: str, tokenizer_name: str, tokenizer) -> None:
    """Refuse a tokenizer whose token ids the model cannot embed (the launcher would refuse the
    workload only at replay, after start-up)."""
    vocab, ids = model_vocab_size(who, model), len(tokenizer)
    if ids > vocab:
        raise InputError(f"{who} (model {model!r}): the {tokenizer_name!r} tokenizer used for its prompts has a "
                         f"vocabulary of {ids} tokens, more than the model's {vocab}; choose a tokenizer that fits "
                         "the model with --tokenizer")


def generate(llms: list[LLMEntry], tokenizers: Tokenizers,
             options: GenerateOptions) -> tuple[dict, list[WorkloadRequest]]:
    """Arrivals and ShareGPT requests for every LLM; returns (info, requests)."""
    llms = sorted(llms, key=lambda m: natural_key(m.name))
    for m in llms:  # every vocabulary, before the first request is drawn
        if m.rate > 0:
            name, dialogs = tokenizers.for_model(m.name, m.model)
            check_vocabulary(f"LLM {m.name!r}", m.model, name, dialogs.tokenizer)
    rates = {m.name: m.rate for m in llms}
    if options.duration is None:
        num = options.num_requests or DEFAULT_NUM_REQUESTS
        counts = request_counts(rates, num)
        duration = num / max(rates.values())
    else:
        counts, duration = {}, options.duration
    requests: list[WorkloadRequest] = []
    used_tokenizers = {}
    bar = Progress(sum(counts.values()) or None, "sampling requests", "req")
    for m in llms:
        if m.rate > 0:
            process = ArrivalProcess(options.distribution, m.rate, options.cv)
            rng = stream(options.seed, 0, m.name)
            if options.duration is None:
                times = process.by_count(rng, counts[m.name], options.start)
            else:
                times = process.by_duration(rng, options.duration, options.start)
        else:
            times = np.empty(0)
        counts[m.name] = len(times)
        used_tokenizers[m.name], dialogs = tokenizers.for_model(m.name, m.model)
        samples = (dialogs.sample(stream(options.seed, 1, m.name), len(times), f"the dataset for {m.name}")
                   if len(times) else [])
        for t, s in zip(np.round(times, 6).tolist(), samples):
            output_len = capped_output_len(s, options.max_output_len)
            requests.append(WorkloadRequest(len(requests), m.name, t, s.prompt_token_ids, output_len))
        bar.update(len(samples))
    bar.close()
    info = {
        "rates": [[m.name, m.rate] for m in llms],
        "start": options.start,
        "duration": round(duration, 6),
        "num_requests": [counts[m.name] for m in llms],
        "distribution": options.distribution,
        "cv": options.cv,
        "seed": options.seed,
        "use_share_gpt": True,
        "dataset": options.dataset,
        "tokenizers": used_tokenizers,
        "filter": options.length_filter.as_dict(),
        "max_output_len": options.max_output_len,
        **length_info(requests),
    }
    return info, requests


def capped_output_len(sample: Sample, cap: int | None) -> int:
    """The sample's output length, at most ``cap`` tokens."""
    return sample.output_len if cap is None else min(sample.output_len, cap)


def power_law_rates(num_llms: int, alpha: float, top_rate: float) -> list[float]:
    """Rates ∝ (i+1)^-alpha, scaled so that LLM 0 (the most popular) gets ``top_rate``."""
    if num_llms < 1:
        raise InputError(f"power law needs at least one LLM, got {num_llms}")
    if alpha < 0 or not top_rate > 0:
        raise InputError(f"power law needs alpha >= 0 and a top rate > 0, got alpha={alpha}, rate={top_rate}")
    return [round(top_rate * (i + 1) ** -alpha, 6) for i in range(num_llms)]
