"""Tables, plots and a markdown report of the end-to-end runs.

    python -m benchmark.end_to_end.analyze [--runs-dir benchmark/results/end_to_end/runs] \\
        [--output-dir benchmark/results/end_to_end] [--slo-scale 8] [--target 0.99] [--slo-base alone]

Reads every merged statistics file (``points/<tag>/<system>.json``) of a run folder of
``run_end_to_end.py`` (or ``run_chatlmsys.py``) and writes into the output folder:

* ``summary.json``: one row per run (throughput req/s and tok/s, TTFT/TPOT p50/p99, SLO
  attainment at scales 1-20, per-LLM figures) and the highest rate each system sustains at the
  target attainment at ``--slo-scale``;
* ``throughput_vs_alpha.png`` (or ``throughput_vs_rate.png``), ``slo_attainment_vs_scale.png``,
  ``p99_latency_vs_rate.png``, ``slo_attainment_vs_rate.png``;
* ``report.md``: the tables, the device and versions, the commands, the figures.

Definitions are in e2e_metrics.py (SLO base latency: the 'alone' runs' by default, each LLM alone on the
whole GPU before a point's runs; the same base for every system).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmark.end_to_end.e2e_common import BASE_RUN, REPO, SYSTEM_LABELS, SYSTEMS, BenchError, read_json, write_json
from benchmark.end_to_end.e2e_metrics import bases_for, group_key, load_runs, pooled_bases, run_metrics, sustained_table
from benchmark.end_to_end.e2e_report import write_report

DEFAULT_RUNS = "benchmark/results/end_to_end/runs"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmark.end_to_end.analyze", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs-dir", default=DEFAULT_RUNS,
                   help="output folder of run_end_to_end.py / run_chatlmsys.py (default: %(default)s)")
    p.add_argument("--output-dir", default=None,
                   help="where the report, plots and summary.json go (default: the parent of --runs-dir)")
    p.add_argument("--slo-scale", type=int, default=8,
                   help="SLO scale of the sustained-rate table and per-LLM figures (default: 8, as the paper's "
                        "ChatLMSYS plot)")
    p.add_argument("--target", type=float, default=0.99, help="SLO attainment to sustain (default: 0.99)")
    p.add_argument("--slo-base", choices=["alone", "temporal", "own"], default="alone",
                   help="base latency of the SLO, the same for every system except 'own': alone (default) = each "
                        "LLM measured alone on the whole GPU before every point's runs, pooled (falls back to "
                        "temporal in run folders without those runs); temporal = the temporal runs' calibration, "
                        "pooled; own = each run's own calibration (under MPS: at the LLM's SM share)")
    p.add_argument("--title", default=None, help="report title")
    p.add_argument("--no-plots", action="store_true", help="tables and report only")
    return p.parse_args(argv)


def analyze(runs_dir: Path, out: Path, slo_scale: int = 8, target: float = 0.99, slo_base: str = "alone",
            title: str | None = None, plots: bool = True) -> dict:
    """Compute every metric, write summary.json, the PNGs and report.md; return the summary."""
    if not 1 <= slo_scale <= 20:
        raise BenchError(f"--slo-scale must be in 1..20, got {slo_scale}")
    runs = load_runs(runs_dir)
    if not runs:
        raise BenchError(f"no statistics under {runs_dir / 'points'}; run run_end_to_end.py first")
    pooled, base_label = {}, "own calibration"
    if slo_base == "alone":
        pooled = pooled_bases(load_runs(runs_dir, (BASE_RUN,)), BASE_RUN)
        base_label = "alone (pooled): each LLM alone on the whole GPU, no MPS, before the point's runs"
    if slo_base == "temporal" or (slo_base == "alone" and not pooled):
        pooled = pooled_bases(runs, "temporal")
        base_label = "temporal (pooled)" + (": no 'alone' runs in this folder" if slo_base == "alone" else "")
    if not pooled:
        base_label = "own calibration"
    rows = [run_metrics(run, bases_for(run, pooled), slo_scale) for run in runs]
    order = {s: i for i, s in enumerate(SYSTEMS)}
    rows.sort(key=lambda r: (r.get("alpha", 0), r.get("rate_scale", 0), r["offered_req_s"], order[r["system"]]))
    sustained = sustained_table(rows, target)
    experiment = read_json(runs_dir / "experiment.json") if (runs_dir / "experiment.json").exists() else {}
    summary = {"runs_dir": str(runs_dir), "slo_scale": slo_scale, "target": target,
               "slo_base": base_label,
               "base_latency": {k: {"prefill_points": [list(p) for p in v.prefill_points], "decode_step": v.decode_step}
                                for k, v in pooled.items()},
               "group_by": group_key(rows[0]), "rows": rows, "sustained": sustained, "experiment": experiment}
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    if plots:
        from benchmark.end_to_end import e2e_plots

        figures = [e2e_plots.throughput_vs_group(rows, out), e2e_plots.slo_vs_scale(rows, out, target),
                   e2e_plots.latency_vs_rate(rows, out), e2e_plots.slo_vs_rate(rows, out, slo_scale, target)]
    summary["figures"] = [f.name for f in figures]
    write_json(out / "summary.json", _jsonable(summary))
    write_report(out / "report.md", summary, runs_dir, title)
    return summary


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def main(argv=None) -> int:
    args = parse_args(argv)
    runs_dir = (REPO / args.runs_dir if args.runs_dir == DEFAULT_RUNS else Path(args.runs_dir)).resolve()
    out = Path(args.output_dir).resolve() if args.output_dir else runs_dir.parent
    try:
        summary = analyze(runs_dir, out, args.slo_scale, args.target, args.slo_base, args.title, not args.no_plots)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for group, by_sys in summary["sustained"].items():
        parts = [f"{SYSTEM_LABELS[s]} {v['rate'] if v['rate'] is not None else '-'}" for s, v in by_sys.items()]
        print(f"sustained at {args.target:.0%} SLO attainment (scale {args.slo_scale}), group {group}: "
              + ", ".join(parts))
    print(f"wrote {out / 'report.md'}, {out / 'summary.json'} and {len(summary['figures'])} figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
