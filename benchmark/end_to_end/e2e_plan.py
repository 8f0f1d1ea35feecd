"""Which launches make up each system for one workload: model configs, devices, MPS, schedule.

* **MuxServe**: the LLMs colocated as the placement decides (one GPU: all of them on it), each mesh
  one launch under MPS with its SM shares, ``adbs``.
* **Temporal multiplexing**: the same colocation, ``mps_percentage [100, 90]`` (a prefill and a
  decode never overlap), no MPS, ``fcfs`` (reference §9.2).
* **Spatial partitioning**: one launch per LLM (``--split-by-model``). An LLM alone on a GPU runs
  as the original's baseline (``[100, 90]``, no MPS, ``adbs``). Where LLMs must share a GPU (more
  LLMs than GPUs) each gets a **static split** of it, as users run several vLLM instances on one
  card: a fixed MPS share (∝ rate × parameters by default) and a fixed slice of the GPU's KV
  memory (∝ rate by default); its prefill and decode never overlap (``fix``: the prefill runtime
  runs 10 points below ``mps_percentage[0]``, so ``[s + 10, s]`` puts both at ``s`` %).
* **Instances**: one launch per LLM on the same GPU(s) as spatial partitioning, **no MPS**
  (``[100, 90]``: each process may use every SM, the driver time-slices the processes), each with
  a fixed slice of the KV memory (∝ rate by default), ``adbs`` within its one LLM: what N vLLM
  processes on one card do. With a GPU per LLM it is the same as spatial partitioning.
* **alone** (not a system: the common SLO base): the temporal colocation (``[100, 90]``, no MPS),
  each launch only measures its LLMs alone, one at a time, and replays nothing
  (``launch_synced --calibrate-only``); every system is judged against these latencies.

KV memory per GPU is the placement's formula: ``GPU × memory_fraction − weights − reserve × LLMs``;
every system gets the same total.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import yaml

from benchmark.end_to_end.e2e_common import BASE_RUN, REPO, BenchError, write_json
from muxserve.config import MuxServeConfig, check_config
from muxserve.errors import ConfigError
from muxserve.placement.llms import DTYPE_BYTES, GB, model_facts
from muxserve.workload.models_file import LLMEntry, natural_key
from muxserve.workload.workload_file import Workload, write_workload

BASELINE_MPS = [100, 90]
MAX_TOTAL_LEN = 2048  # the ShareGPT filter's prompt + output bound, used when no workload is given


@dataclass(frozen=True)
class Machine:
    num_gpus: int
    device: str  # cpu or cuda
    gpu_memory_gb: float  # per GPU (on CPU: the memory budget of one "GPU")
    dtype: str = "bf16"
    reserve_gb: float = 7.6  # per LLM and GPU: activations, CUDA contexts (the placement's default)
    memory_fraction: float = 0.98
    kv_cache_gb: float | None = None  # KV pool per GPU; overrides the formula
    overload_threshold: int = 2
    max_num_seqs: int = 256

    def __post_init__(self) -> None:
        if self.num_gpus < 1:
            raise BenchError(f"--num-gpus must be >= 1, got {self.num_gpus}")
        if self.device not in ("cpu", "cuda"):
            raise BenchError(f"device must be cpu or cuda, got {self.device!r}")
        if not self.gpu_memory_gb > 0:
            raise BenchError(f"--gpu-memory-gb must be > 0, got {self.gpu_memory_gb}")
        if self.dtype not in DTYPE_BYTES:
            raise BenchError(f"--dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")


@dataclass(frozen=True)
class LLM:
    name: str
    model: str  # as the model configs name it (folder relative to the repository, or a short name)
    rate: float
    load_format: str  # random: a folder with a config.json only
    params: int
    kv_bytes_per_token: int  # in the run's dtype
    max_request_tokens: int  # largest prompt + output of its requests

    def weight_bytes(self, dtype: str) -> int:
        return self.params * DTYPE_BYTES[dtype]


@dataclass
class Launch:
    """One ``python -m muxserve.launch`` of a system run (several run side by side)."""

    name: str
    config: str  # path relative to the point's folder
    workload: str  # path relative to the point's folder
    devices: list[int]
    schedule: str
    mps: bool
    split_by_model: str | None = None
    idx_map: str | None = None  # JSON list: idx in this launch's workload -> idx in the point's workload
    calibrate_only: bool = False  # measure the LLMs alone, replay nothing (the common SLO base)


@dataclass
class SystemPlan:
    system: str
    launches: list[Launch]
    notes: dict = field(default_factory=dict)

    @property
    def needs_mps(self) -> bool:
        return any(launch.mps for launch in self.launches)


@dataclass
class Group:
    """LLMs sharing one mesh of GPUs, with MuxServe's SM shares and per-LLM sequence caps.

    On a mesh of n > 1 GPUs every LLM of the group runs tensor parallel over all n (TP = mesh
    size, as the placement writes and the original did); ``kv_bytes`` is per GPU.
    """

    devices: list[int]
    llms: list[str]
    mps: dict[str, list[int]]
    max_num_seqs: dict[str, int] = field(default_factory=dict)
    kv_bytes: float | None = None  # None: the machine's formula

    @property
    def device(self) -> int:
        """The mesh's first GPU."""
        return self.devices[0]

    @property
    def tp(self) -> int:
        return len(self.devices)

    @property
    def label(self) -> str:
        return f"gpu{self.devices[0]}" if self.tp == 1 else f"gpu{self.devices[0]}-{self.devices[-1]}"


# -- models ----------------------------------------------------------------------------------------
def model_ref(model: str) -> tuple[str, str]:
    """(model string for configs, load format). ``random:FOLDER`` or a folder without weights -> random."""
    forced = model.startswith("random:")
    name = model.removeprefix("random:")
    path = Path(name)
    if not path.is_absolute() and (REPO / path).exists() and not path.exists():
        path = REPO / path
    if path.exists():
        path = path.resolve()
        try:
            name = str(path.relative_to(REPO))
        except ValueError:
            name = str(path)
        has_weights = path.is_file() or any(path.glob("*.safetensors")) or any(path.glob("*.gguf"))
        return name, "random" if forced or not has_weights else "auto"
    return name, "random" if forced else "auto"


def describe_llms(entries: list[LLMEntry], workload: Workload | None, dtype: str) -> list[LLM]:
    """Sizes of every LLM (from its config.json) and its largest request in ``workload``."""
    biggest: dict[str, int] = {}
    for r in workload.requests if workload else []:
        biggest[r.llm] = max(biggest.get(r.llm, 0), len(r.prompt_token_ids) + r.output_len)
    out = []
    for e in sorted(entries, key=lambda e: natural_key(e.name)):
        model, load_format = model_ref(e.model)
        params, kv_elems = model_facts(str(REPO / model) if (REPO / model).exists() else model)
        out.append(LLM(e.name, model, e.rate, load_format, params, kv_elems * DTYPE_BYTES[dtype],
                       biggest.get(e.name, MAX_TOTAL_LEN)))
    return out


def default_mps(llm: LLM) -> list[int]:
    """SM shares without a cost table: prefill as the placement (80 % up to 10 B parameters, 90 %
    up to 20 B, else 100 %); decode 30 % under 2 B parameters, 40 % under 5 B, else 50 %."""
    prefill = 80 if llm.params <= 10e9 else 90 if llm.params <= 20e9 else 100
    decode = 30 if llm.params < 2e9 else 40 if llm.params < 5e9 else 50
    return [prefill, decode]


def kv_budget(machine: Machine, llms: list[LLM], tp: int = 1) -> float:
    """KV bytes of one GPU holding ``llms`` (with ``tp`` > 1: one rank's shard of each, an even
    split of the weights; the replicated embeddings make the real shard slightly larger)."""
    if machine.kv_cache_gb is not None:
        return machine.kv_cache_gb * GB
    weights = sum(m.weight_bytes(machine.dtype) for m in llms) / tp
    return machine.gpu_memory_gb * GB * machine.memory_fraction - weights - len(llms) * machine.reserve_gb * GB


def min_kv(llm: LLM, tp: int = 1) -> float:
    """KV bytes (on each GPU of a ``tp`` mesh) that hold its largest request, with room for page rounding."""
    return 1.25 * llm.max_request_tokens * llm.kv_bytes_per_token / tp + (1 << 20)


def check_fits(machine: Machine, llms: list[LLM], budget: float, what: str, tp: int = 1) -> None:
    need = sum(min_kv(m, tp) for m in llms)
    if budget < need:
        raise BenchError(f"{what}: {', '.join(m.name for m in llms)} leave {budget / GB:.2f} GB of KV cache on one "
                         f"{'GPU' if machine.device == 'cuda' else 'CPU budget'}, less than their largest requests "
                         f"need ({need / GB:.2f} GB); raise --gpu-memory-gb / --kv-cache-gb or lower --reserve-gb")


# -- colocations -----------------------------------------------------------------------------------
def load_of(llm: LLM) -> float:
    return llm.rate * llm.params


def balanced_assignment(llms: list[LLM], machine: Machine) -> list[list[str]]:
    """LLMs to GPUs without a cost table: largest rate × parameters first, each to the GPU with the
    least load whose memory still holds it. With as many GPUs as LLMs, one LLM per GPU."""
    gpus: list[list[LLM]] = [[] for _ in range(machine.num_gpus)]
    for llm in sorted(llms, key=lambda m: (-load_of(m), -m.params, natural_key(m.name))):
        order = sorted(range(machine.num_gpus), key=lambda g: (sum(load_of(m) for m in gpus[g]), len(gpus[g]), g))
        for g in order:
            members = gpus[g] + [llm]
            if kv_budget(machine, members) >= sum(min_kv(m) for m in members):
                gpus[g].append(llm)
                break
        else:
            raise BenchError(f"{llm.name} ({llm.model}) fits on no GPU next to the others "
                             f"({machine.gpu_memory_gb:g} GB per GPU, {machine.reserve_gb:g} GB reserve per LLM)")
    return [sorted((m.name for m in g), key=natural_key) for g in gpus]


def default_groups(llms: list[LLM], machine: Machine) -> list[Group]:
    """The colocation without a cost table: on one GPU all LLMs; on several, balanced by load."""
    by_name = {m.name: m for m in llms}
    names = [sorted(by_name, key=natural_key)] if machine.num_gpus == 1 else balanced_assignment(llms, machine)
    groups = []
    for device, members in enumerate(names):
        if members:
            groups.append(Group([device], members, {n: default_mps(by_name[n]) for n in members}))
    return groups


def split_shares(weights: list[float], total: int = 100, lo: int = 10, hi: int = 90) -> list[int]:
    """Integer percentages ∝ ``weights`` adding up to ``total``, each in [lo, hi] (largest remainder)."""
    n = len(weights)
    if n == 1:
        return [total]
    if n * lo > total or n * hi < total:
        raise BenchError(f"cannot split {total} % of the SMs among {n} LLMs with {lo}-{hi} % each")
    w = [max(x, 0.0) for x in weights]
    s = sum(w) or float(n)
    raw = [total * (x / s if sum(w) else 1 / n) for x in w]
    fixed: dict[int, float] = {}
    while True:  # water-filling: clamp, then share the rest among the unclamped in proportion
        free = [i for i in range(n) if i not in fixed]
        rest = total - sum(fixed.values())
        wf = sum(raw[i] for i in free) or 1.0
        vals = {i: rest * raw[i] / wf for i in free}
        clamp = {i: (lo if v < lo else hi) for i, v in vals.items() if v < lo or v > hi}
        if not clamp:
            break
        fixed.update(clamp)
    exact = [fixed.get(i, vals.get(i, 0.0)) for i in range(n)]
    shares = [int(math.floor(v)) for v in exact]
    for i in sorted(range(n), key=lambda i: (-(exact[i] - shares[i]), i))[: total - sum(shares)]:
        shares[i] += 1
    return shares


def split_kv(budget: float, weights: list[float], floors: list[float]) -> list[float]:
    """Bytes ∝ ``weights`` adding up to ``budget``, none below its floor."""
    n = len(weights)
    if sum(floors) > budget:
        raise BenchError(f"a KV budget of {budget / GB:.2f} GB cannot hold the largest requests of {n} LLMs "
                         f"({sum(floors) / GB:.2f} GB)")
    fixed: dict[int, float] = {}
    while True:
        free = [i for i in range(n) if i not in fixed]
        rest = budget - sum(fixed.values())
        wf = sum(weights[i] for i in free) or 1.0
        vals = {i: rest * (weights[i] / wf if sum(weights[j] for j in free) else 1 / len(free)) for i in free}
        low = {i: floors[i] for i, v in vals.items() if v < floors[i]}
        if not low:
            break
        fixed.update(low)
    return [fixed.get(i, vals.get(i, 0.0)) for i in range(n)]


# -- model configs ---------------------------------------------------------------------------------
def overload_units(machine: Machine, decode_shares: list[int]) -> int:
    """ADBS's shared SM units for a mesh: ``--overload-threshold``, raised until every member's
    decode job fits beside the others' (the placement keeps that invariant: the decode shares of a
    mesh add up to at most 100 % + its overload). Default shares without a cost table can add up
    to more (30 + 30 + 40 + 50 %): with 2 shared units at most three of four decodes ran at once,
    and decode steps, bound by memory bandwidth, waited for SM units they barely use."""
    return min(10, max(machine.overload_threshold, sum(s // 10 for s in decode_shares) - 10))


def config_doc(machine: Machine, members: list[tuple[LLM, list[int], int | None]], kv_bytes: float,
               num_gpus: int = 1, overload_threshold: int | None = None) -> dict:
    """A model_config for one mesh (checked with muxserve.config): every LLM tensor parallel over
    its ``num_gpus`` GPUs; ``kv_bytes`` per GPU."""
    threshold = machine.overload_threshold if overload_threshold is None else overload_threshold
    doc: dict = {"num_gpus": num_gpus, "max_num_seqs": machine.max_num_seqs, "overload_threshold": threshold}
    if machine.device == "cuda":
        doc["gpu_memory_utilization"] = max(0.001, math.floor(kv_bytes / (machine.gpu_memory_gb * GB) * 1000) / 1000)
    else:
        doc["kv_cache_bytes"] = int(kv_bytes)
    models = []
    for llm, mps, max_seqs in members:
        entry = {"name": llm.name, "model": llm.model, "tensor_parallel_size": num_gpus, "pipeline_parallel_size": 1,
                 "placement": [list(range(num_gpus))], "mps_percentage": list(mps), "model_dtype": machine.dtype}
        if llm.load_format != "auto":
            entry["load_format"] = llm.load_format
        if max_seqs:
            entry["max_num_seqs"] = int(max_seqs)
        models.append(entry)
    doc["models"] = models
    try:
        check_config(msgspec.convert(doc, MuxServeConfig), "benchmark config")
    except (msgspec.ValidationError, ConfigError) as err:
        raise BenchError(f"generated an invalid model config: {err}") from None
    return doc


def write_yaml(path: Path, doc: dict, comment: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"# {line}\n" for line in comment.splitlines())
    path.write_text(text + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))


def write_subset(workload: Workload, llms: list[str], path: Path) -> Path:
    """The requests of ``llms`` as a workload of their own, and the map back to the original idx."""
    keep = [r for r in workload.requests if r.llm in set(llms)]
    info = dict(workload.info)
    info["rates"] = [[n, r] for n, r in workload.info.get("rates", []) if n in set(llms)]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_workload(path, info, keep)
    idx_map = path.with_suffix(".idx.json")
    write_json(idx_map, [r.idx for r in keep], indent=None)
    return idx_map


@dataclass
class PlanOptions:
    spatial_sm_split: str = "load"  # load (rate × parameters), rate or equal
    spatial_kv_split: str = "rate"  # rate or rate-kv (rate × KV bytes per token)
    muxserve_schedule: str = "adbs"  # adbs (with the wait bound) or adbs-paper (the paper's rules exactly)


def plan_systems(point_dir: Path, llms: list[LLM], machine: Machine, workload: Workload, workload_rel: str,
                 groups: list[Group], systems: list[str], options: PlanOptions) -> dict[str, SystemPlan]:
    """Write the model configs of every system for one workload; return the launches."""
    by_name = {m.name: m for m in llms}
    cfg_dir = point_dir / "configs"
    plans: dict[str, SystemPlan] = {}
    mesh_workloads: dict[int, tuple[str, str | None]] = {}
    for i, g in enumerate(groups if {"muxserve", "temporal", BASE_RUN} & set(systems) else []):
        if len(groups) == 1:
            mesh_workloads[i] = (workload_rel, None)
        else:
            sub = cfg_dir / f"workload_mesh{i}.json"
            idx_map = write_subset(workload, g.llms, sub)
            mesh_workloads[i] = (str(sub.relative_to(point_dir)), str(idx_map.relative_to(point_dir)))
    for system in ("muxserve", "temporal", BASE_RUN):
        if system not in systems:
            continue
        launches = []
        for i, g in enumerate(groups):
            members = [by_name[n] for n in g.llms]
            budget = g.kv_bytes if g.kv_bytes is not None else kv_budget(machine, members, g.tp)
            check_fits(machine, members, budget, f"{system} mesh {i}", g.tp)
            mps = g.mps if system == "muxserve" else dict.fromkeys(g.llms, BASELINE_MPS)
            # temporal keeps --overload-threshold: [100, 90] shares with 2 shared units run one job at a time
            threshold = overload_units(machine, [min(mps[n]) for n in g.llms]) if system == "muxserve" else None
            doc = config_doc(machine, [(by_name[n], mps[n], g.max_num_seqs.get(n)) for n in g.llms], budget, g.tp,
                             threshold)
            path = cfg_dir / system / f"mesh{i}_{g.label}.yaml"
            where = f"GPU {g.device}" if g.tp == 1 else f"GPUs {g.devices} (tensor parallel {g.tp})"
            write_yaml(path, doc, f"{system}: {', '.join(g.llms)} on {where}; KV {budget / GB:.2f} GB per GPU")
            wl, idx_map = mesh_workloads[i]
            launches.append(Launch(f"mesh{i}", str(path.relative_to(point_dir)), wl, list(g.devices),
                                   options.muxserve_schedule if system == "muxserve" else "fcfs",
                                   system == "muxserve" and machine.device == "cuda", idx_map=idx_map,
                                   calibrate_only=system == BASE_RUN))
        plans[system] = SystemPlan(system, launches)
    if "spatial" in systems:
        plans["spatial"] = plan_spatial(cfg_dir, point_dir, llms, machine, workload_rel, options)
    if "instances" in systems:
        plans["instances"] = plan_spatial(cfg_dir, point_dir, llms, machine, workload_rel, options, mps=False)
    return plans


def spatial_assignment(llms: list[LLM], machine: Machine) -> list[list[str]]:
    """One GPU per LLM when there are enough (busiest LLM on GPU 0), else a balanced assignment."""
    if machine.num_gpus >= len(llms):
        order = sorted(llms, key=lambda m: (-load_of(m), natural_key(m.name)))
        return [[m.name] for m in order] + [[] for _ in range(machine.num_gpus - len(llms))]
    return balanced_assignment(llms, machine)


def plan_spatial(cfg_dir: Path, point_dir: Path, llms: list[LLM], machine: Machine, workload_rel: str,
                 options: PlanOptions, mps: bool = True) -> SystemPlan:
    """Spatial partitioning; ``mps=False``: the instances baseline (the same launches and KV slices,
    every process on all SMs without MPS, ``adbs`` within its LLM)."""
    system = "spatial" if mps else "instances"
    by_name = {m.name: m for m in llms}
    launches, shares_note = [], {}
    for device, names in enumerate(spatial_assignment(llms, machine)):
        if not names:
            continue
        members = [by_name[n] for n in names]
        budget = kv_budget(machine, members)
        check_fits(machine, members, budget, f"spatial GPU {device}")
        if len(members) == 1:
            m = members[0]
            doc = config_doc(machine, [(m, BASELINE_MPS, None)], budget)
            path = cfg_dir / system / f"{m.name}_gpu{device}.yaml"
            write_yaml(path, doc, f"{system}: {m.name} alone on GPU {device}; KV {budget / GB:.2f} GB")
            launches.append(Launch(m.name, str(path.relative_to(point_dir)), workload_rel, [device], "adbs", False,
                                   split_by_model=m.name))
            shares_note[m.name] = {"device": device, "sm_percent": 100, "kv_gb": round(budget / GB, 3)}
            continue
        sm_w = {"load": [load_of(m) for m in members], "rate": [m.rate for m in members],
                "equal": [1.0] * len(members)}[options.spatial_sm_split]
        kv_w = {"rate": [m.rate for m in members],
                "rate-kv": [m.rate * m.kv_bytes_per_token for m in members]}[options.spatial_kv_split]
        shares = split_shares(sm_w)
        slices = split_kv(budget, kv_w, [min_kv(m) for m in members])
        if not mps:
            for m, kv in zip(members, slices):
                doc = config_doc(machine, [(m, BASELINE_MPS, None)], kv)
                path = cfg_dir / system / f"{m.name}_gpu{device}.yaml"
                write_yaml(path, doc, f"instances (GPU {device} shared without MPS): {m.name} with "
                                      f"{kv / GB:.2f} GB of KV cache, every SM")
                launches.append(Launch(m.name, str(path.relative_to(point_dir)), workload_rel, [device], "adbs",
                                       False, split_by_model=m.name))
                shares_note[m.name] = {"device": device, "sm_percent": 100, "kv_gb": round(kv / GB, 3)}
            continue
        for m, share, kv in zip(members, shares, slices):
            doc = config_doc(machine, [(m, [min(100, share + 10), share], None)], kv)
            path = cfg_dir / "spatial" / f"{m.name}_gpu{device}.yaml"
            write_yaml(path, doc, f"spatial (static split of GPU {device}): {m.name} with {share} % of the SMs "
                                  f"and {kv / GB:.2f} GB of KV cache; run with --schedule-approach fix")
            launches.append(Launch(m.name, str(path.relative_to(point_dir)), workload_rel, [device], "fix",
                                   machine.device == "cuda", split_by_model=m.name))
            shares_note[m.name] = {"device": device, "sm_percent": share, "kv_gb": round(kv / GB, 3)}
    notes = {"split": shares_note, "kv_split": options.spatial_kv_split}
    if mps:
        notes["sm_split"] = options.spatial_sm_split
    return SystemPlan(system, launches, notes)
