"""``python -m muxserve.muxsched.placement``: models.yaml + cost table -> one model_config YAML per
mesh (MuxServe), the same colocation without MPS (temporal multiplexing), one YAML per LLM on its
own GPUs (spatial partitioning), and ``placement.json`` with the summary.

Every LLM of a mesh of n GPUs runs with tensor_parallel_size n on placement [[0..n-1]] (the mesh's
GPUs as CUDA_VISIBLE_DEVICES numbers them). With --estimate-tp, mesh sizes up to the GPUs of a node
that the cost table lacks get estimated latencies (muxserve.placement.costs.TPEstimate). With
--elastic (or ``elastic: true`` in models.yaml) a mesh may hold more LLMs than fit at once when
their rates say most are idle (muxserve.placement.estimator, "Elastic meshes")."""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import msgspec
import yaml

from muxserve.config import MuxServeConfig, check_config
from muxserve.errors import ConfigError, InputError, command_status
from muxserve.placement.costs import CostModel, TPEstimate, load_cost_table
from muxserve.placement.estimator import Estimator
from muxserve.placement.greedy import Placement, optimize, spatial_size
from muxserve.placement.llms import GB, PlacementSettings, describe_llms
from muxserve.workload.models_file import load_models_file, natural_key
from muxserve.workload.workload_file import Workload, load_workload, write_workload

logger = logging.getLogger("muxserve.placement")

DEFAULT_AVG_PROMPT_LEN, DEFAULT_AVG_OUTPUT_LEN = 161, 338  # ShareGPT means quoted by the paper
BASELINE_MPS = [100, 90]  # temporal and spatial runs: no MPS; a prefill and a decode never overlap


def average_lengths(args, models) -> tuple[float, float, str]:
    """Flags, else the workload file's real means, else models.yaml, else the paper's ShareGPT means."""
    if args.avg_prompt_len and args.avg_output_len:
        return args.avg_prompt_len, args.avg_output_len, "flags"
    if args.workload_file:
        workload = load_workload(args.workload_file)
        if not workload.requests:
            raise InputError(f"workload {args.workload_file} has no requests")
        n = len(workload.requests)
        prompt = sum(len(r.prompt_token_ids) for r in workload.requests) / n
        output = sum(r.output_len for r in workload.requests) / n
        return args.avg_prompt_len or prompt, args.avg_output_len or output, f"workload {args.workload_file}"
    if models.avg_prompt_len and models.avg_output_len:
        return (args.avg_prompt_len or models.avg_prompt_len, args.avg_output_len or models.avg_output_len,
                f"model yaml {args.model_yaml}")
    return (args.avg_prompt_len or DEFAULT_AVG_PROMPT_LEN, args.avg_output_len or DEFAULT_AVG_OUTPUT_LEN,
            "ShareGPT defaults")


def model_ref(model: str) -> tuple[str, str]:
    """(model string of the config, load_format): ``random:FOLDER`` and folders that hold only a
    config.json (no safetensors, .bin or .gguf) get seeded random weights."""
    name = model.removeprefix("random:")
    if model.startswith("random:"):
        return name, "random"
    path = Path(name)
    if path.is_dir() and (path / "config.json").is_file() and not any(
            any(path.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.gguf", "*.pt")):
        return name, "random"
    return name, "auto"


def launch_command(config: str, devices: list[int], index: int, mps: bool) -> str:
    """The shell command that runs one mesh's config on its GPUs, with ports of its own so that the
    meshes of a node run side by side (``config`` as seen from where the placement ran)."""
    cmd = (f"CUDA_VISIBLE_DEVICES={','.join(map(str, devices))} python -m muxserve.launch {config} "
           f"--nproc-per-node {len(devices)} --master-port {29500 + index} --flexstore-port {51000 + 100 * index} "
           f"--server-port {51010 + 100 * index}")
    return cmd + (" --mps-dir MPS_DIR" if mps else " --schedule-approach fcfs")


def write_workload_subset(workload: Workload, llms: list[str], path: Path) -> None:
    """The requests of ``llms`` (arrival times kept) as a workload file of their own."""
    info = dict(workload.info)
    if "rates" in info:
        info["rates"] = [[n, r] for n, r in info["rates"] if n in set(llms)]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_workload(path, info, [r for r in workload.requests if r.llm in set(llms)])


def spatial_rounds(sizes: dict[str, int], ngpus: int) -> dict[str, tuple[int, list[int]]]:
    """Spatial partitioning on one node: (round, GPUs) per LLM, biggest meshes first, packed onto
    ``ngpus`` GPUs; LLMs of one round run side by side, rounds one after another (an LLM alone on
    its GPUs does not depend on the others)."""
    out, rnd, first = {}, 0, 0
    for name in sorted(sizes, key=lambda n: (-sizes[n], natural_key(n))):
        if first + sizes[name] > ngpus:
            rnd, first = rnd + 1, 0
        out[name] = (rnd, list(range(first, first + sizes[name])))
        first += sizes[name]
    return out


def config_doc(est: Estimator, size: int, names: list[str], mps: dict[str, list[int]], workload_file: str | None,
               write_kv_bytes: bool) -> dict:
    """A model_config document for one mesh (checked with muxserve.config before it is written)."""
    s = est.settings
    e = est.estimate(size, names)
    kv_per_gpu = e.kv_bytes_per_gpu
    doc = {
        "num_gpus": size,
        "max_num_seqs": max(e.max_num_seqs.values()),
        "overload_threshold": min(10, s.overload_sm // 10),
        "gpu_memory_utilization": max(0.001, math.floor(kv_per_gpu / (s.gpu_memory_gb * GB) * 1000) / 1000),
    }
    if write_kv_bytes:
        doc["kv_cache_bytes"] = int(kv_per_gpu)
    doc["models"] = []
    for n in names:
        model, load_format = model_ref(est.llms[n].model)
        entry = {"name": n, "model": model, "tensor_parallel_size": size, "pipeline_parallel_size": 1,
                 "placement": [list(range(size))], "mps_percentage": list(mps[n]), "model_dtype": s.model_dtype,
                 "max_num_seqs": e.max_num_seqs[n]}
        if load_format != "auto":
            entry["load_format"] = load_format
        doc["models"].append(entry)
    doc["workloads"] = {"workload_file": workload_file}
    try:
        check_config(msgspec.convert(doc, MuxServeConfig), "placement output")
    except (msgspec.ValidationError, ConfigError) as err:
        raise RuntimeError(f"placement produced an invalid model config: {err}") from None
    return doc


def elastic_summary(est: Estimator, size: int, names: list[str]) -> dict:
    """What an elastic mesh expects: weights it holds on average, chance each LLM is resident, wakes."""
    e = est.estimate(size, names)
    return {"idle_timeout_s": est.settings.idle_timeout_s,
            "weights_gb_per_gpu": round(e.weight_bytes / size / GB, 3),
            "expected_resident_gb_per_gpu": round(e.resident_bytes / size / GB, 3),
            "memory_gb_per_gpu": round(est.settings.usable_bytes / GB, 3),
            "p_resident": {n: round(est.p_resident(n), 4) for n in names},
            "wakes_per_s": {n: round(w, 5) for n, w in e.wakes_per_s.items()},
            "wake_s": {n: round(est.wake_s(n, size), 4) for n in names},
            "wake_s_measured": [n for n in names if est.costs.wake_s(est.llms[n].cost_key, size) is not None],
            "wake_time_fraction": round(e.wake_fraction, 5)}


def write_outputs(out: Path, prefix: str, est: Estimator, placement: Placement, workload_file: str | None,
                  write_kv_bytes: bool) -> dict:
    written: dict[str, list[str]] = {"muxserve": [], "temporal": [], "spatial": []}

    def dump(kind: str, name: str, doc: dict) -> str:
        path = out / kind / f"{prefix}_{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))
        written[kind].append(str(path.relative_to(out)))
        return str(path.relative_to(out))

    s = est.settings
    workload = load_workload(workload_file) if workload_file else None
    meshes = []
    for i, mesh in enumerate(placement.meshes):
        if not mesh.llms:
            continue
        mux = {n: [est.candidates[n][mesh.size].prefill_sm, est.candidates[n][mesh.size].decode_sm] for n in mesh.llms}
        tag = f"mesh{i}_n{mesh.size}"
        mesh_workload = workload_file
        if workload is not None and not set(workload.llms) <= set(mesh.llms):
            # the launcher refuses requests for LLMs that its config lacks: each mesh gets its own requests
            mesh_workload = str(out / "workloads" / f"{prefix}_{tag}.json")
            write_workload_subset(workload, mesh.llms, Path(mesh_workload))
            written.setdefault("workloads", []).append(str(Path(mesh_workload).relative_to(out)))
        config = dump("muxserve", tag, config_doc(est, mesh.size, mesh.llms, mux, mesh_workload, write_kv_bytes))
        temporal = dump("temporal", tag, config_doc(est, mesh.size, mesh.llms, dict.fromkeys(mesh.llms, BASELINE_MPS),
                                                    mesh_workload, write_kv_bytes))
        meshes.append({"mesh": i, "node": mesh.node, "devices": list(mesh.devices), "num_gpus": mesh.size,
                       "config": config, "expected_tpt": round(mesh.served, 4),
                       "kv_gb_per_gpu": round(mesh.estimate.kv_bytes_per_gpu / GB, 3),
                       "weights_gb_per_gpu": round(sum(est.llms[n].mesh_weight_bytes(mesh.size, s.model_dtype)
                                                       for n in mesh.llms) / mesh.size / GB, 3),
                       "llms": mesh.llms,
                       **({"elastic": elastic_summary(est, mesh.size, mesh.llms)} if s.elastic else {}),
                       "estimated_costs": [n for n in mesh.llms
                                           if est.costs.is_estimated(est.llms[n].cost_key, mesh.size)],
                       "launch": launch_command(str(out / config), list(mesh.devices), len(meshes), mps=True),
                       "launch_temporal": launch_command(str(out / temporal), list(mesh.devices), len(meshes),
                                                         mps=False)})
    spatial = []
    sizes = {name: spatial_size(est, name) for name in est.llms}
    slots = spatial_rounds(sizes, s.max_mesh_size or max(sizes.values()))
    for k, name in enumerate(est.llms):
        size = sizes[name]
        config = dump("spatial", f"{name}_n{size}", config_doc(est, size, [name], {name: BASELINE_MPS},
                                                              workload_file, write_kv_bytes))
        rnd, devices = slots[name]
        spatial.append({"llm": name, "num_gpus": size, "config": config,
                        "expected_tpt": round(est.estimate(size, [name]).served, 4),
                        "estimated_costs": est.costs.is_estimated(est.llms[name].cost_key, size),
                        "round": rnd, "devices": devices,
                        "launch": launch_command(str(out / config), devices, k, mps=False)
                        + f" --split-by-model {name}"})
    total_rate = sum(m.rate for m in est.llms.values())
    return {
        "method": placement.method,
        "mesh_group": [list(split) for split in placement.group],
        "expected_tpt": round(placement.served, 4),
        "total_rate": total_rate,
        "served_fraction": round(placement.served / total_rate, 4) if total_rate else 1.0,
        "meshes": meshes,
        "llms": summary_rows(est, placement),
        "spatial": spatial,
        "spatial_num_gpus": sum(s["num_gpus"] for s in spatial),
        "files": written,
    }


def summary_rows(est: Estimator, placement: Placement) -> list[dict]:
    """One row per placed LLM: where it runs, its rate, estimate, SM shares and batch sizes."""
    rows = []
    for i, mesh in enumerate(placement.meshes):
        for name in mesh.llms:
            llm, cand, e = est.llms[name], est.candidates[name][mesh.size], mesh.estimate
            rows.append({"mesh": i, "node": mesh.node, "devices": list(mesh.devices), "llm": name, "model": llm.model,
                         "rate": llm.rate, "expected_tpt": round(e.throughputs[name], 4),
                         "mps_percentage": [cand.prefill_sm, cand.decode_sm], "batch_size": e.batch_sizes[name],
                         "max_num_seqs": e.max_num_seqs[name], "tensor_parallel_size": mesh.size,
                         "weights_gb": round(llm.weight_bytes(est.settings.model_dtype) / GB, 3),
                         "weights_gb_per_gpu": round(llm.mesh_weight_bytes(mesh.size, est.settings.model_dtype)
                                                     / mesh.size / GB, 3),
                         "min_mesh_size": est.min_mesh_size(name),
                         "estimated_costs": est.costs.is_estimated(llm.cost_key, mesh.size)})
    return rows


def table_text(rows: list[dict]) -> str:
    head = "| mesh | node | GPUs | LLM | model | rate | est. req/s | SM % [prefill, decode] | batch | max seqs |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        mark = "*" if r.get("estimated_costs") else ""
        lines.append(f"| {r['mesh']} | {r['node']} | {r['devices']} | {r['llm']} | {r['model']} | {r['rate']:g} | "
                     f"{r['expected_tpt']:.3f}{mark} | {r['mps_percentage']} | {r['batch_size']} | "
                     f"{r['max_num_seqs']} |")
    if any(r.get("estimated_costs") for r in rows):
        lines.append("* latencies of this mesh size estimated from a smaller one (--estimate-tp), not profiled")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m muxserve.muxsched.placement", description=__doc__)
    p.add_argument("--model-yaml", required=True, help="models.yaml: cluster and LLMs with rates")
    p.add_argument("--cost-file", required=True, help="cost table of python -m muxserve.muxsched.profile")
    p.add_argument("--output-dir", required=True, help="folder for the YAMLs and placement.json")
    p.add_argument("--overwrite", action="store_true", help="write into a folder that has files")
    p.add_argument("--workload-file", default=None,
                   help="workload JSON: average lengths come from it, and the YAMLs point to it")
    p.add_argument("--avg-prompt-len", type=float, default=None)
    p.add_argument("--avg-output-len", type=float, default=None)
    p.add_argument("--method", choices=("greedy", "ilp"), default="greedy",
                   help="greedy (Algorithm 1) or the exact integer program (needs pulp; small clusters)")
    p.add_argument("--compare-ilp", action="store_true", help="also solve exactly and report the greedy's gap")
    p.add_argument("--no-local-search", action="store_true", help="the greedy alone (Algorithm 1), as in the original")
    d = PlacementSettings()
    g = p.add_argument_group("hardware and cost model")
    g.add_argument("--gpu-memory-gb", type=float, default=d.gpu_memory_gb, help="memory of one GPU")
    g.add_argument("--memory-fraction", type=float, default=d.memory_fraction)
    g.add_argument("--reserve-gb", type=float, default=d.reserve_gb, help="per LLM and GPU: activations, processes")
    g.add_argument("--overload-sm", type=int, default=d.overload_sm,
                   help="decode SM %% of a mesh may add up to 100 + this (CPU tables with only 100 %%: use e.g. 200)")
    g.add_argument("--max-decode-sm", type=int, default=d.max_decode_sm)
    g.add_argument("--prefill-sm", type=int, default=None,
                   help="default: 80 up to 10B parameters, 90 up to 20B, else 100")
    g.add_argument("--model-dtype", choices=("fp16", "bf16", "fp32"), default=d.model_dtype)
    g.add_argument("--decode-overhead-ms", type=float, default=0.0, help="scheduling cost per sequence and decode step")
    g.add_argument("--write-kv-bytes", action="store_true", help="also write kv_cache_bytes (the pool size; CPU runs)")
    t = p.add_argument_group("tensor parallelism (an estimate for mesh sizes the cost table lacks)")
    dt = TPEstimate()
    t.add_argument("--estimate-tp", action="store_true",
                   help="derive the latencies of meshes of 2, 4 ... GPUs (up to a node) that the table lacks from the "
                        "largest profiled size that divides them: compute / TP plus two all-reduces per layer")
    t.add_argument("--tp-serial-fraction", type=float, default=dt.serial_fraction,
                   help="part of a step that tensor parallelism does not shrink")
    t.add_argument("--tp-allreduce-us", type=float, default=dt.allreduce_latency_us,
                   help="fixed cost of one all-reduce (microseconds)")
    t.add_argument("--tp-allreduce-gbps", type=float, default=dt.allreduce_bus_gbps,
                   help="all-reduce bus bandwidth (GB/s)")
    e = p.add_argument_group("elastic residency (more LLMs on a mesh than fit at once; models.yaml: elastic: true "
                             "or elastic: {idle_timeout_s: S})")
    e.add_argument("--elastic", action="store_true",
                   help="the weights of a mesh may exceed its memory when the LLMs expected to be resident (a "
                        "request within --idle-timeout-s at their rate) fit; an LLM that does not fit alone is refused")
    e.add_argument("--idle-timeout-s", type=float, default=None,
                   help=f"an LLM idle this long is offloaded (default {d.idle_timeout_s:g})")
    e.add_argument("--idle-reserve-gb", type=float, default=d.idle_reserve_gb,
                   help=f"per offloaded LLM and GPU: what stays on the device (its runtime processes) "
                        f"(default {d.idle_reserve_gb:g})")
    e.add_argument("--wake-gbps", type=float, default=d.wake_gbps,
                   help="host -> device copy bandwidth per GPU for the wake estimate where the cost table has no "
                        f"_wake_s entry (default {d.wake_gbps:g}; the H200 copied pinned memory at 55.3)")
    e.add_argument("--wake-overhead-s", type=float, default=d.wake_overhead_s,
                   help=f"fixed part of a wake estimate (default {d.wake_overhead_s:g})")
    return p.parse_args(argv)


def elastic_options(args, models) -> tuple[bool, float]:
    """(elastic, idle timeout) from the flags, else models.yaml's ``elastic`` (true, or a mapping
    with ``idle_timeout_s``)."""
    spec = models.extra.get("elastic", False)
    timeout = PlacementSettings().idle_timeout_s
    if isinstance(spec, dict):
        unknown = set(spec) - {"idle_timeout_s"}
        if unknown:
            raise InputError(f"{args.model_yaml}: elastic has unknown keys {sorted(unknown)}; it takes idle_timeout_s")
        timeout = spec.get("idle_timeout_s", timeout)
        spec = True
    if not isinstance(spec, bool):
        raise InputError(f"{args.model_yaml}: elastic must be true, false or {{idle_timeout_s: S}}, got {spec!r}")
    if args.idle_timeout_s is not None:
        timeout = args.idle_timeout_s
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise InputError(f"idle_timeout_s must be seconds > 0, got {timeout!r}")
    return args.elastic or spec, float(timeout)


def run(args) -> dict:
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise InputError(f"output folder {out} is not empty; pass --overwrite to write into it")
    models = load_models_file(args.model_yaml)
    prompt_len, output_len, source = average_lengths(args, models)
    costs = CostModel(load_cost_table(args.cost_file), prompt_len, output_len, args.decode_overhead_ms / 1000)
    tp = TPEstimate(args.tp_serial_fraction, args.tp_allreduce_us, args.tp_allreduce_gbps) if args.estimate_tp else None
    tp_sizes = tuple(1 << k for k in range(1, models.ngpus_per_node.bit_length()) if 1 << k <= models.ngpus_per_node)
    elastic, idle_timeout = elastic_options(args, models)
    settings = PlacementSettings(args.gpu_memory_gb, args.memory_fraction, args.reserve_gb, args.overload_sm,
                                 args.max_decode_sm, args.prefill_sm, args.model_dtype,
                                 max_mesh_size=models.ngpus_per_node, tp_estimate=tp, tp_sizes=tp_sizes,
                                 elastic=elastic, idle_timeout_s=idle_timeout, idle_reserve_gb=args.idle_reserve_gb,
                                 wake_gbps=args.wake_gbps, wake_overhead_s=args.wake_overhead_s)
    est = Estimator(describe_llms(models.models, costs, args.model_dtype), costs, settings)
    greedy = optimize(est, models.nnodes, models.ngpus_per_node, refine=not args.no_local_search)
    exact = None
    if args.method == "ilp" or args.compare_ilp:
        from muxserve.placement.ilp import ilp_place

        exact = ilp_place(est, models.nnodes, models.ngpus_per_node)
    chosen = exact if args.method == "ilp" and exact is not None else greedy
    summary = write_outputs(out, Path(args.model_yaml).stem, est, chosen, args.workload_file, args.write_kv_bytes)
    summary["elastic"] = elastic
    if elastic:
        summary["elastic_note"] = ("meshes may hold more weights than memory; running them needs elastic residency "
                                   "with LLMs that start offloaded and a budget capped at the device's memory (the "
                                   "instance now starts every elastic LLM resident); the configs are written pinned")
    summary.update({"model_yaml": args.model_yaml, "cost_file": args.cost_file, "avg_prompt_len": round(prompt_len, 3),
                    "avg_output_len": round(output_len, 3), "avg_lengths_from": source,
                    "greedy_tpt": round(greedy.served, 4),
                    "min_mesh_size": {n: est.min_mesh_size(n) for n in est.llms},
                    "tp_estimate": None if tp is None else {
                        "serial_fraction": tp.serial_fraction, "allreduce_latency_us": tp.allreduce_latency_us,
                        "allreduce_bus_gbps": tp.allreduce_bus_gbps,
                        "estimated": {k: {str(n): m for n, m in v.items()} for k, v in costs.estimated.items()}}})
    if exact is not None:
        summary["ilp_tpt"] = round(exact.served, 4)
        summary["greedy_gap"] = round(1 - greedy.served / exact.served, 6) if exact.served > 0 else 0.0
    (out / "placement.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return command_status(lambda: _main(argv))


def _main(argv) -> int:
    args = parse_args(argv)
    summary = run(args)
    print(table_text(summary["llms"]))
    line = (f"mesh group {summary['mesh_group']}: {summary['expected_tpt']:.3f} of {summary['total_rate']:g} req/s "
            f"served ({summary['method']}); average lengths "
            f"{summary['avg_prompt_len']:g}/{summary['avg_output_len']:g} from {summary['avg_lengths_from']}")
    if "ilp_tpt" in summary:
        line += f"; exact optimum {summary['ilp_tpt']:.3f} (greedy gap {summary['greedy_gap']:.2%})"
    print(line)
    print(f"wrote {len(summary['files']['muxserve'])} MuxServe, {len(summary['files']['temporal'])} temporal and "
          f"{len(summary['files']['spatial'])} spatial configs and placement.json to {args.output_dir}")
    return 0
