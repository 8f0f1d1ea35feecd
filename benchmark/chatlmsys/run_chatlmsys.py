"""The end-to-end pipeline driven by an LMSYS-Chat-style trace (the paper's ChatLMSYS workload).

    python -m benchmark.chatlmsys.run_chatlmsys --trace chatlmsys.json --start-day 55 --end-day 55.5 \\
        --condense 600 1200 2400 --prepare-only                     # workloads (needs a tokenizer)
    python -m benchmark.chatlmsys.run_chatlmsys --trace chatlmsys.json --start-day 55 --end-day 55.5 \\
        --condense 600 1200 2400 --device cuda                      # the four systems, resumable
    python -m benchmark.end_to_end.analyze --runs-dir benchmark/results/chatlmsys/runs

The trace window is translated once by ``workload_utils.translate_lmsys`` (the ``lmsys`` mode of
``python -m muxserve.muxsched.workload_utils``: the ShareGPT length filter, each trace model ->
``llm-k`` in order of first appearance, prompt = turn 0, output length = tokens of turn 1). Then,
per ``--condense`` factor c (one point of the rate axis): arrival times are divided by c, only
the ``--max-llms`` trace models with the most requests are kept, renamed ``llm-0`` (most
requests) to ``llm-{K-1}`` and served by ``--llm-models`` in that order, and arrivals after
``--max-duration`` seconds are dropped. Rates are measured as the translator does
(count / (last - first arrival)). Everything else (colocation, the four systems, MPS, resume,
time budget) is run_end_to_end.py's; see benchmark/chatlmsys/README.md.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from benchmark.end_to_end.e2e_common import BenchError, fmt_num, read_json
from benchmark.end_to_end.e2e_grid import Point, record_command
from benchmark.end_to_end.run_end_to_end import (
    DEFAULT_LLMS,
    absolute_paths,
    add_machine_args,
    add_run_args,
    add_system_args,
    run_pipeline,
)
from muxserve.workload.datasets import LengthFilter, load_tokenizer, read_json_records
from muxserve.workload.generator import DEFAULT_TOKENIZER, length_info
from muxserve.workload.lmsys import translate_lmsys
from muxserve.workload.models_file import LLMEntry, ModelsFile, write_models_file
from muxserve.workload.workload_file import (
    WorkloadRequest,
    write_workload,
)

DEFAULT_OUT = "benchmark/results/chatlmsys/runs"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmark.chatlmsys.run_chatlmsys", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("trace")
    g.add_argument("--trace", required=True, help="LMSYS-Chat-style trace: JSON array or lines of "
                                                  "{conversation, model, tstamp}")
    g.add_argument("--start-day", type=float, default=0.0, help="window start, days after the first tstamp (0)")
    g.add_argument("--end-day", type=float, default=None, help="window end (default: the end of the trace)")
    g.add_argument("--condense", type=float, nargs="+", default=[50.0, 100.0, 200.0],
                   help="divide inter-arrival times by each factor: one run per factor (default: 50 100 200)")
    g.add_argument("--max-llms", type=int, default=4, help="keep the trace models with the most requests (default: 4)")
    g.add_argument("--llm-models", nargs="+", default=DEFAULT_LLMS, metavar="MODEL",
                   help="models serving llm-0, llm-1, ... (most requests first; cycled when fewer than --max-llms; "
                        "default: the 1B, 1.7B, 3B and 8B shapes)")
    g.add_argument("--max-duration", type=float, default=None,
                   help="drop arrivals later than this many seconds after condensing (default: keep all)")
    g.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                   help=f"tokenizer of every prompt (default: {DEFAULT_TOKENIZER})")
    g.add_argument("--max-prompt-len", type=int, default=1024, help="drop longer prompts (default: 1024)")
    g.add_argument("--max-total-len", type=int, default=2048,
                   help="drop dialogs whose prompt + output is longer (default: 2048)")
    g.add_argument("--max-output-len", type=int, default=None, help="cap output lengths (default: none)")
    add_machine_args(p)
    add_system_args(p)
    add_run_args(p, DEFAULT_OUT)
    return p.parse_args(argv)


def condensed(info: dict, requests: list[WorkloadRequest], condense: float, max_llms: int,
              max_duration: float | None) -> tuple[dict, list[WorkloadRequest], dict[str, str]]:
    """Requests of the ``max_llms`` busiest LLMs, arrivals / ``condense``, renamed by popularity."""
    counts = Counter(r.llm for r in requests)
    first = {}
    for r in requests:
        first.setdefault(r.llm, r.arrival)
    busiest = sorted(counts, key=lambda n: (-counts[n], first[n]))[:max_llms]
    rename = {old: f"llm-{i}" for i, old in enumerate(busiest)}
    kept = []
    for r in requests:
        if r.llm in rename:
            t = round(r.arrival / condense, 6)
            if max_duration is None or t <= max_duration:
                kept.append(WorkloadRequest(len(kept), rename[r.llm], t, r.prompt_token_ids, r.output_len))
    if not kept:
        raise BenchError(f"condense {condense:g}: no request left (--max-duration {max_duration})")
    rates, nums = [], []
    for name in rename.values():
        times = [r.arrival for r in kept if r.llm == name]
        span = times[-1] - times[0] if times else 0.0
        rates.append([name, round(len(times) / span if span > 0 else float(len(times)), 6)])
        nums.append(len(times))
    trace_map = {model: rename[llm] for model, llm in info["chatlmsys_map"].items() if llm in rename}
    new = {**info, "rates": rates, "num_requests": nums, "duration": kept[-1].arrival, "condense": condense,
           "chatlmsys_map": trace_map, "max_llms": max_llms, "max_duration": max_duration, **length_info(kept)}
    return new, kept, trace_map


def trace_points(args, out: Path) -> list[Point]:
    """models.yaml + workload.json per condense factor unless they exist."""
    points, base = [], None
    for c in args.condense:
        if not c > 0:
            raise BenchError(f"--condense must be > 0, got {c}")
        tag = f"condense{fmt_num(c)}"
        pdir = out / "points" / tag
        done = (pdir / "workload.json").exists() and (pdir / "models.yaml").exists()
        if not done:
            if base is None:
                lf = LengthFilter(max_prompt_len=args.max_prompt_len, max_total_len=args.max_total_len)
                base = translate_lmsys(read_json_records(args.trace, "trace"), load_tokenizer(args.tokenizer),
                                       source=args.trace, start_day=args.start_day, end_day=args.end_day,
                                       condense=1.0, length_filter=lf, max_output_len=args.max_output_len)
                cli = ["python", "-m", "muxserve.muxsched.workload_utils", "lmsys", "--trace", args.trace,
                       "--start-day", fmt_num(args.start_day), "--condense", "1", "--tokenizer", args.tokenizer,
                       "--max-prompt-len", str(args.max_prompt_len), "--max-total-len", str(args.max_total_len),
                       "--output-file", "TRANSLATED.json"]
                cli += ["--end-day", fmt_num(args.end_day)] if args.end_day is not None else []
                cli += ["--max-output-len", str(args.max_output_len)] if args.max_output_len else []
                record_command(out, cli + ["  # then run_chatlmsys.condensed() per --condense"])
            info, requests, trace_map = condensed(*base, c, args.max_llms, args.max_duration)
            entries = [LLMEntry(name, args.llm_models[i % len(args.llm_models)], rate)
                       for i, (name, rate) in enumerate(info["rates"])]
            write_models_file(pdir / "models.yaml", ModelsFile(entries, 1, args.num_gpus, info["prompt_len"],
                                                              info["output_len"], {"chatlmsys_map": trace_map}))
            write_workload(pdir / "workload.json", info, requests)
            model_of = {llm: model for model, llm in trace_map.items()}
            print(f"[{tag}] {len(requests)} requests over {info['duration']:.1f} s; "
                  + ", ".join(f"{n} ({model_of[n]}) {r:g}/s" for n, r in info["rates"]), flush=True)
            duration = info["duration"]
        else:
            duration = read_json(pdir / "workload.json")["info"]["duration"]
        points.append(Point(tag, {"condense": c, "duration_s": duration}))
    return points


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)

    def prepare(out: Path) -> tuple[list[Point], dict]:
        if args.max_llms < 1:
            raise BenchError(f"--max-llms must be >= 1, got {args.max_llms}")
        absolute_paths(args)
        info = {"kind": "chatlmsys", "trace": args.trace, "start_day": args.start_day, "end_day": args.end_day,
                "condense": args.condense, "max_llms": args.max_llms, "llm_models": args.llm_models,
                "max_duration": args.max_duration}
        return trace_points(args, out), info

    return run_pipeline("benchmark.chatlmsys.run_chatlmsys", args, argv, DEFAULT_OUT, prepare)


if __name__ == "__main__":
    sys.exit(main())
