"""The colocation from the placement optimizer (with a cost table): its meshes as ``e2e_plan.Group``s."""

from __future__ import annotations

from pathlib import Path

import yaml

from benchmark.end_to_end.e2e_common import BenchError
from benchmark.end_to_end.e2e_plan import LLM, Group, Machine, kv_budget


def placement_groups(point_dir: Path, models_yaml: Path, workload_path: Path, cost_file: Path, llms: list[LLM],
                     machine: Machine, extra_args: list[str]) -> tuple[list[Group], list[str]]:
    """Run ``python -m muxserve.muxsched.placement`` (in this process) and read its meshes back.

    Returns the groups and the equivalent command line. A mesh of n GPUs runs its LLMs tensor
    parallel over all n; the placement considers the mesh sizes of the cost table, and others
    with ``--placement-arg --estimate-tp``.
    """
    from muxserve.placement import cli as placement_cli

    out = point_dir / "placement"
    argv = ["--model-yaml", str(models_yaml), "--cost-file", str(cost_file), "--output-dir", str(out), "--overwrite",
            "--workload-file", str(workload_path), "--gpu-memory-gb", f"{machine.gpu_memory_gb:g}",
            "--reserve-gb", f"{machine.reserve_gb:g}", "--memory-fraction", f"{machine.memory_fraction:g}",
            "--model-dtype", machine.dtype, *extra_args]
    if machine.device == "cpu":
        argv.append("--write-kv-bytes")
    try:
        summary = placement_cli.run(placement_cli.parse_args(argv))
    except ValueError as e:  # InputError, WorkloadError
        raise BenchError(f"placement failed: {e}") from None
    (out / "table.md").write_text(placement_cli.table_text(summary["llms"]) + "\n")
    by_name = {m.name: m for m in llms}
    groups = []
    for mesh in summary["meshes"]:
        cfg = yaml.safe_load((out / mesh["config"]).read_text())
        mps = {m["name"]: m["mps_percentage"] for m in cfg["models"]}
        seqs = {m["name"]: m.get("max_num_seqs") for m in cfg["models"]}
        members = [by_name[n] for n in mesh["llms"]]
        # the placement's own formula (n x usable - weights - reserve), unrounded
        devices = list(mesh["devices"])
        groups.append(Group(devices, list(mesh["llms"]), mps, {n: s for n, s in seqs.items() if s},
                            kv_budget(machine, members, len(devices))))
    cmd = ["python", "-m", "muxserve.muxsched.placement", *argv]
    return groups, cmd


def groups_doc(groups: list[Group]) -> list[dict]:
    return [{"devices": g.devices, "llms": g.llms, "mps_percentage": g.mps, "max_num_seqs": g.max_num_seqs}
            for g in groups]
