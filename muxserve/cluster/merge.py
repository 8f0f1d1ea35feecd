"""One statistics file from the meshes' own (each written by ``muxserve.launch --stats-file``):
every request record, the per-LLM and overall summary recomputed over all of them with the
launcher's statistics code, each LLM's scheduler figures and base latency as its mesh measured them.

Each mesh replays its share of the workload from its own start (when it is ready), so times are
seconds from that start; meshes share no GPU, so this is the same as starting them together.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from muxserve.scheduler.stats import BaseLatency, RequestRecord, summarize_run

RECORD_FIELDS = [f.name for f in dataclasses.fields(RequestRecord)]


@dataclass
class MeshResult:
    mesh: str
    placement_node: int
    llms: list[str]
    stats: dict  # the mesh's stats file
    node_ip: str
    node_id: str
    gpus: list[str]
    wall_s: float


def _bases(results: list[MeshResult]) -> dict[str, BaseLatency] | None:
    bases = {}
    for r in results:
        for llm, b in (r.stats.get("base_latency") or {}).items():
            bases[llm] = BaseLatency(tuple(tuple(p) for p in b["prefill_points"]), b["decode_step"])
    return bases or None


def merge_stats(results: list[MeshResult], command: list[str], placement: str) -> dict:
    records, rows = [], []
    for r in results:
        for row in r.stats["requests"]:
            records.append(RequestRecord(**{k: row[k] for k in RECORD_FIELDS if k in row}))
            rows.append({**row, "instance": r.mesh})
    bases = _bases(results)
    summary = summarize_run(records, bases)
    preemptions = 0
    for r in results:
        preemptions += r.stats["summary"]["overall"].get("scheduler_preemptions", 0)
        for llm, s in r.stats["summary"]["per_model"].items():
            if "scheduler" in s and llm in summary["per_model"]:
                summary["per_model"][llm]["scheduler"] = s["scheduler"]
    summary["overall"]["scheduler_preemptions"] = preemptions
    approaches = sorted({r.stats.get("schedule_approach") for r in results} - {None})
    return {
        "command": command,
        "placement": placement,
        "schedule_approach": approaches[0] if len(approaches) == 1 else approaches,
        "requests": sorted(rows, key=lambda row: row["idx"]),
        "summary": summary,
        "base_latency": {k: {"prefill_points": v.prefill_points, "decode_step": v.decode_step}
                         for k, v in (bases or {}).items()},
        "meshes": [{"mesh": r.mesh, "placement_node": r.placement_node, "llms": r.llms, "node_ip": r.node_ip,
                    "node_id": r.node_id, "gpus": r.gpus, "wall_s": r.wall_s,
                    "num_requests": len(r.stats["requests"]), "summary": r.stats["summary"]["overall"]}
                   for r in results],
    }
