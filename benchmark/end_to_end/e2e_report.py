"""The markdown report of analyze.py: setup, tables, target checks, figures, commands."""

from __future__ import annotations

from pathlib import Path

import yaml

from benchmark.end_to_end.e2e_common import SYSTEM_LABELS, SYSTEMS, read_json, stats_files

SHOWN_SCALES = (1, 2, 3, 5, 8, 10, 15, 20)
TARGET_TPT, TARGET_SUSTAINED = 1.5, 2.0  # targets vs spatial partitioning (alpha >= 1.3), after the paper's claims


def _f(x, digits=2, unit="") -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}{unit}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _ms(x) -> str:
    if x is None:
        return "-"
    return f"{1000 * x:.1f} ms" if x < 0.1 else f"{1000 * x:.0f} ms" if x < 10 else f"{x:.1f} s"


def _point_cells(row: dict) -> list[str]:
    if "alpha" in row:
        return [f"{row['alpha']:g}", f"{row['rate_scale']:g}"]
    return [row["tag"]]


def _point_head(rows: list[dict]) -> list[str]:
    return ["alpha", "scale"] if rows and "alpha" in rows[0] else ["workload"]


def _point_label(row: dict) -> str:
    return " ".join(_point_cells(row))


def _table(head: list[str], body: list[list[str]], left: int = 1) -> list[str]:
    """A markdown table; the first ``left`` columns left-aligned, the others right-aligned."""
    align = ["---" if i < left else "---:" for i in range(len(head))]
    return ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"] + ["| " + " | ".join(r) + " |" for r in body]


def _muxserve_thresholds(runs_dir: Path, flag: int) -> str:
    """What MuxServe's mesh configs say, where it differs from the flag (e2e_plan.overload_units)."""
    found = set()
    for path in (runs_dir / "points").glob("*/configs/muxserve/*.yaml"):
        doc = yaml.safe_load(path.read_text()) or {}
        if "overload_threshold" in doc:
            found.add(int(doc["overload_threshold"]))
    if not found or found == {flag}:
        return ""
    return (f" (MuxServe's meshes: {', '.join(str(v) for v in sorted(found))}, raised until the decode shares of "
            "a mesh fit together)")


def _setup(summary: dict, runs_dir: Path) -> list[str]:
    exp = summary.get("experiment", {})
    infos = exp.get("device_infos") or [exp.get("device_info", {})]
    m = exp.get("machine", {})
    lines = ["## Setup", ""]
    if len(infos) > 1:
        lines.append(f"- the {len(infos)} devices and software the calls that filled this run folder ran on "
                     "(every call: `commands.txt` there):")
    for dev in infos:
        gpu = "; ".join(dev.get("nvidia_smi", [])) or ", ".join(dev.get("gpus", [])) or dev.get("host_cpu", "?")
        lines.append(f"- device: {dev.get('device', m.get('device', '?'))}: {gpu}; "
                     f"{dev.get('cpu_count', '?')} CPU cores")
        lines.append(f"  - versions: python {dev.get('python', '?')}, torch {dev.get('torch', '?')}"
                     + (f" (CUDA {dev['cuda']})" if dev.get("cuda") else "")
                     + (f", triton {dev['triton']}" if dev.get("triton") else "")
                     + f", transformers {dev.get('transformers', '?')}; muxserve commit "
                     f"{dev.get('muxserve_commit', '?')}")
    if m:
        kv = f"{m['kv_cache_gb']:g} GiB per GPU" if m.get("kv_cache_gb") else (
            f"GPU x {m['memory_fraction']:g} - weights - {m['reserve_gb']:g} GiB per LLM")
        lines.append(f"- machine: {m['num_gpus']} x {m['device']} of {m['gpu_memory_gb']:g} GiB, {m['dtype']}; "
                     f"KV cache: {kv} "
                     f"(the same total for every system); max_num_seqs {m['max_num_seqs']}, overload_threshold "
                     f"{m['overload_threshold']}" + _muxserve_thresholds(runs_dir, m["overload_threshold"]))
    lines += _lanes(runs_dir)
    if exp.get("kind") == "power-law":
        lines.append(f"- workloads: power law alpha {exp['alphas']}, llm-0 at {exp['max_rate']:g} x rate scale "
                     f"{exp['rate_scales']} req/s, {exp['duration_s']:g} s of {exp['distribution']} arrivals, "
                     "ShareGPT lengths"
                     + (f" (outputs capped at {exp['max_output_len']})" if exp.get("max_output_len") else "")
                     + f", seed {exp['seed']}")
    elif exp.get("kind") == "chatlmsys":
        end = exp.get("end_day")
        lines.append(f"- workloads: trace {exp.get('trace')} days [{exp.get('start_day')}, "
                     f"{'end of trace' if end is None else end}), "
                     f"condense {exp.get('condense')}, top {exp.get('max_llms')} LLMs")
    if exp.get("max_drain_s"):
        lines.append(f"- requests unfinished {exp['max_drain_s']:g} s after the last arrival were aborted (SLO misses)")
    plans = sorted((runs_dir / "points").glob("*/plan.json"))
    if plans:
        plan = read_json(plans[0])
        lines += ["", "| LLM | model | parameters | weights load | KV bytes/token |", "|---|---|---:|---|---:|"]
        for llm in plan["llms"]:
            lines.append(f"| {llm['name']} | {llm['model']} | {llm['params'] / 1e9:.2f} B | {llm['load_format']} | "
                         f"{llm['kv_bytes_per_token']} |")
        lines += ["", f"Colocation ({plan['colocation']}; first workload, {plans[0].parent.name}):"]
        for g in plan["groups"]:
            devices = g.get("devices", [g.get("device")])  # plans written before meshes had "device"
            where = f"GPU {devices[0]}" if len(devices) == 1 else f"GPUs {devices} (tensor parallel {len(devices)})"
            lines.append(f"- {where}: " + ", ".join(f"{n} SM {g['mps_percentage'][n]}" for n in g["llms"]))
        split = plan["systems"].get("spatial", {}).get("notes", {}).get("split", {})
        if split:
            lines.append("- spatial partitioning: " + ", ".join(
                f"{n} GPU {v['device']} {v['sm_percent']} % SMs {v['kv_gb']:.2f} GiB KV" for n, v in split.items()))
    lines += ["", "Systems: **MuxServe** = the colocation above under MPS with its SM shares, `adbs`; **temporal "
              "multiplexing** = the same colocation, `mps_percentage [100, 90]`, no MPS, `fcfs`; **spatial "
              "partitioning** = one launch per LLM (`--split-by-model`): alone on a GPU `[100, 90]` no MPS, or a "
              "static split of a shared GPU (fixed MPS share, fixed KV slice, `fix`: its prefill and decode never "
              "overlap); **instances** = the same launches and KV slices as spatial partitioning, but no MPS: each "
              "process may use every SM and the driver time-slices them (N vLLM processes on one card), `adbs` "
              "within its LLM. Launches of one run start their replay together (start barrier). Before a point's "
              "runs, one more launch (`alone`) measures each LLM alone on the whole GPU: the common SLO base.", ""]
    return lines


def _lanes(runs_dir: Path) -> list[str]:
    """Whether runs ran side by side (run_end_to_end.py --lanes), from the lane each run recorded."""
    by_lane: dict[int, dict] = {}
    most = 0
    for _, path in stats_files(runs_dir):
        lane = read_json(path).get("lane")
        if not lane:
            continue
        most = max(most, lane.get("num_lanes", 1))
        entry = by_lane.setdefault(lane["index"], {"gpus": set(), "cpus": set(), "runs": 0})
        entry["gpus"].add(",".join(lane.get("gpus") or []))
        if lane.get("cpus"):
            entry["cpus"].add(lane["cpus"])
        entry["runs"] += 1
    if most <= 1:
        return ["- runs: one at a time"] if by_lane else []
    parts = []
    for k, e in sorted(by_lane.items()):
        gpus = " / ".join(g for g in sorted(e["gpus"]) if g)
        cpus = " / ".join(sorted(e["cpus"]))
        parts.append(f"lane {k}" + (f" GPU {gpus}" if gpus else "") + (f" CPUs {cpus}" if cpus else "")
                     + f": {e['runs']} run{'s' if e['runs'] != 1 else ''}")
    if any(g for e in by_lane.values() for g in e["gpus"]):
        how = ("concurrently on separate GPUs of one host (lanes; each run alone on its GPUs, with its own MPS "
               "daemon when it uses MPS, its own ports and, where listed, its own CPUs)")
    else:
        how = "concurrently on one host without GPUs (lanes: own ports, shared CPU cores)"
    return [f"- runs: up to {most} at a time, {how}: " + "; ".join(parts)]


def _tables(summary: dict) -> list[str]:
    rows, s_scale, target = summary["rows"], summary["slo_scale"], summary["target"]
    head = _point_head(rows)
    n = len(head)
    lines = ["## Results", "", f"SLO base latency: {summary['slo_base']}. SLO attainment counts unfinished requests "
             "as misses.", ""]
    if summary.get("base_latency"):
        lens = sorted({p[0] for b in summary["base_latency"].values() for p in b["prefill_points"]})
        lines += _table(["LLM"] + [f"prefill {n_} tok" for n_ in lens] + ["decode step"],
                        [[llm] + [_ms(dict(b["prefill_points"]).get(n_)) for n_ in lens] + [_ms(b["decode_step"])]
                         for llm, b in summary["base_latency"].items()]) + [""]
    lines += ["### Throughput and latency", ""]
    lines += ["offered = sum of the LLMs' rates; arrived = requests / seconds of arrivals (Poisson noise); served = "
              "finished requests / (last end - first arrival).", ""]
    lines += _table(head + ["system", "offered req/s", "arrived req/s", "served req/s", "tok/s", "output tok/s",
                            "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", f"SLO {s_scale}x", "finished"],
                    [_point_cells(r) + [SYSTEM_LABELS[r["system"]], f"{r['offered_req_s']:.2f}",
                                        _f(r.get("arrived_req_s")),
                                        _f(r.get("throughput_req_s")), _f(r.get("throughput_tok_s"), 0),
                                        _f(r.get("output_tok_s"), 0), _ms(r.get("ttft_p50")), _ms(r.get("ttft_p99")),
                                        _ms(r.get("tpot_p50")), _ms(r.get("tpot_p99")), _pct(r["slo_at_scale"]),
                                        f"{r['finished']}/{r['num_requests']}"] for r in rows], n + 1)
    lines += ["", "### MuxServe vs the baselines: throughput", ""]
    body = []
    for by in _by_point(rows).values():
        first = by[next(iter(by))]
        mux = by.get("muxserve", {}).get("throughput_req_s")
        body.append(_point_cells(first) + [f"{first['offered_req_s']:.2f}", _ratio(mux, by.get("spatial")),
                                           _ratio(mux, by.get("temporal")), _ratio(mux, by.get("instances"))])
    lines += _table(head + ["offered req/s", "MuxServe / spatial", "MuxServe / temporal", "MuxServe / instances"],
                    body, n)
    lines += ["", f"### Highest rate sustained at {target:.0%} SLO attainment (scale {s_scale})", "",
              "Total offered req/s of the highest tested rate at which this and every lower tested rate reach the "
              "target; in brackets where the line to the next tested rate crosses it. '>=': every tested rate passed; "
              "'< lowest': none did.", ""]
    body = []
    for group, by in summary["sustained"].items():
        mux = (by.get("muxserve") or {}).get("rate")
        label = f"alpha {group:g}" if isinstance(group, (int, float)) else str(group)
        body.append([label] + [_sustained(by.get(s)) for s in SYSTEMS]
                    + [_rate_ratio(mux, (by.get(b) or {}).get("rate")) for b in ("spatial", "temporal", "instances")])
    lines += _table(["group"] + [SYSTEM_LABELS[s] for s in SYSTEMS]
                    + ["MuxServe / spatial", "MuxServe / temporal", "MuxServe / instances"], body)
    lines += ["", "### SLO attainment vs SLO scale", ""]
    lines += _table(head + ["system"] + [f"{s}x" for s in SHOWN_SCALES],
                    [_point_cells(r) + [SYSTEM_LABELS[r["system"]]]
                     + [_pct(r["slo_curve"].get(s)) for s in SHOWN_SCALES]
                     for r in rows], n + 1)
    lines += ["", f"### Fairness: the worst-served LLM of each run (SLO {s_scale}x)", "",
              "The LLM with the lowest SLO attainment (ties: the highest p99 TTFT): a system that starves one "
              "LLM shows it here even when its overall attainment is high.", ""]
    lines += _table(head + ["system", f"overall SLO {s_scale}x", "worst LLM", f"its SLO {s_scale}x", "its p99 TTFT",
                            "its p99 TPOT"],
                    [_point_cells(r) + [SYSTEM_LABELS[r["system"]], _pct(r["slo_at_scale"]), r["worst_llm"]["llm"],
                                        _pct(r["worst_llm"]["slo_at_scale"]), _ms(r["worst_llm"]["ttft_p99"]),
                                        _ms(r["worst_llm"]["tpot_p99"])] for r in rows if r.get("worst_llm")], n + 1)
    lines += ["", "### Per LLM", ""]
    waits = any(v.get("decode_wait_ms") is not None for r in rows for v in r["per_llm"].values())
    body = [_point_cells(r) + [SYSTEM_LABELS[r["system"]], llm, _f(v["offered_req_s"]), _f(v["throughput_req_s"]),
                               _ms(v["latency_p99"]), _ms(v["ttft_p99"]), _ms(v["tpot_p99"]), _pct(v["slo_at_scale"])]
            + ([_wait(v.get("decode_wait_ms"))] if waits else [])
            for r in rows for llm, v in r["per_llm"].items()]
    lines += _table(head + ["system", "LLM", "offered req/s", "served req/s", "p99 latency", "p99 TTFT", "p99 TPOT",
                            f"SLO {s_scale}x"] + (["decode wait"] if waits else []), body, n + 2)
    if waits:
        lines += ["", "decode wait: mean time from a batch being ready to decode to its decode job being sent "
                      "(held back by SM units, or by a prefill that goes first)."]
    return lines + [""]


def _wait(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.2f} ms"


def _by_point(rows):
    out: dict = {}
    for r in rows:
        out.setdefault((_point_label(r), r["tag"]), {})[r["system"]] = r
    return out


def _ratio(mux, base_row) -> str:
    base = (base_row or {}).get("throughput_req_s")
    return f"{mux / base:.2f}x" if mux and base else "-"


def _rate_ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _sustained(v) -> str:
    if not v or v["rate"] is None:
        return "-"
    if v["none_pass"]:
        return "< lowest"
    text = f"{v['rate']:.2f}"
    if v["all_pass"]:
        return ">= " + text
    return text + (f" ({v['interpolated']:.2f})" if v["interpolated"] is not None else "")


def _targets(summary: dict) -> list[str]:
    rows = summary["rows"]
    lines = ["## Targets: the paper's claims vs spatial partitioning (one GPU, alpha >= 1.3)", ""]
    checked = False
    for (label, _tag), by in _by_point(rows).items():
        r = next(iter(by.values()))
        if r.get("alpha", 0) < 1.3 or "muxserve" not in by or "spatial" not in by:
            continue
        checked = True
        mux, sp = by["muxserve"].get("throughput_req_s"), by["spatial"].get("throughput_req_s")
        ratio = mux / sp if mux and sp else None
        kept_up = all((x.get("throughput_req_s") or 0) >= 0.95 * x["offered_req_s"] for x in by.values())
        verdict = "met" if ratio and ratio >= TARGET_TPT else "not met"
        note = " (every system kept up with the offered load: throughput equals the offered rate)" if kept_up else ""
        where = f"alpha {r['alpha']:g}, scale {r['rate_scale']:g}" if "alpha" in r else label
        lines.append(f"- throughput >= {TARGET_TPT}x spatial at {where}: {_f(ratio)}x, {verdict}{note}")
    for group, by in summary["sustained"].items():
        if not isinstance(group, (int, float)) or group < 1.3 or "muxserve" not in by or "spatial" not in by:
            continue
        checked = True
        a, b = by["muxserve"], by["spatial"]
        if b["none_pass"] and not a["none_pass"]:
            lines.append(f"- sustained rate >= {TARGET_SUSTAINED}x spatial at alpha {group:g}: spatial sustains none "
                         f"of the tested rates, MuxServe {_sustained(a)} req/s: met (lower rates needed for the exact "
                         "ratio)")
            continue
        ra, rb = a.get("interpolated") or a["rate"], b.get("interpolated") or b["rate"]
        ratio = ra / rb if ra and rb else None
        bound = " (a bound: every tested rate passed for one system)" if a["all_pass"] or b["all_pass"] else ""
        lines.append(f"- sustained rate >= {TARGET_SUSTAINED}x spatial at alpha {group:g}: {_f(ratio)}x, "
                     f"{'met' if ratio and ratio >= TARGET_SUSTAINED else 'not met'}{bound}")
    if not checked:
        lines.append("- no run at alpha >= 1.3 with both MuxServe and spatial partitioning")
    return lines + [""]


def _notes(summary: dict, runs_dir: Path) -> list[str]:
    lines = ["## Notes", ""]
    skews = []
    for system, path in stats_files(runs_dir):
        doc = read_json(path)
        skews.append(doc.get("replay_start_skew_s", 0.0))
        if doc.get("unfinished"):
            lines.append(f"- {path.parent.name} {system}: {len(doc['unfinished'])} of "
                         f"{doc['num_requests_expected']} requests unfinished")
    if skews:
        lines.append(f"- largest start skew between the launches of one run: {1000 * max(skews):.1f} ms")
    for err in sorted((runs_dir / "points").glob("*/*.error.txt")):
        lines.append(f"- FAILED {err.parent.name} {err.name.split('.')[0]}: "
                     f"{err.read_text().strip().splitlines()[0][:300]}")
    lines.append("- throughput = finished requests / (last end - first arrival); tok/s counts prompt + output tokens; "
                 "TTFT = first token - arrival; TPOT = (end - first token) / (output tokens - 1).")
    return lines + [""]


def write_report(path: Path, summary: dict, runs_dir: Path, title: str | None) -> None:
    lines = [f"# {title or 'End-to-end: MuxServe vs temporal multiplexing vs spatial partitioning vs instances'}", ""]
    lines += _setup(summary, runs_dir) + _tables(summary) + _targets(summary)
    if summary.get("figures"):
        lines += ["## Figures", ""] + [f"![{f}]({f})" for f in summary["figures"]] + [""]
    lines += _notes(summary, runs_dir)
    commands = runs_dir / "commands.txt"
    if commands.exists():
        lines += ["## Commands", "", "```", commands.read_text().rstrip(), "```", ""]
    path.write_text("\n".join(lines))
