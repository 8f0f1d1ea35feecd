"""Lanes: independent runs of the grid side by side, each on its own GPUs of one host.

A lane is a slice of the machine that runs one system run at a time: ``gpus_per_run`` GPUs
(``--visible-gpus``, default every GPU of ``CUDA_VISIBLE_DEVICES`` or of ``nvidia-smi``), its own
block of TCP ports, its own MPS directory and optionally its own CPUs. ``--lanes 4`` on a 4-GPU
host runs four single-GPU runs at once.

* GPUs: a launch of a lane sees only the lane's GPUs (``CUDA_VISIBLE_DEVICES``); the devices of a
  plan stay relative (device 1 of a 2-GPU run = the lane's second GPU). With several lanes the GPUs
  are named by UUID: the MPS server renumbers the devices it was started with, a UUID means the
  same GPU to MPS clients and to plain processes (NVIDIA MPS guide, CUDA_VISIBLE_DEVICES).
* MPS: a run that needs MPS starts a control daemon for its lane only (``scripts/start_mps.sh
  <mps-dir>/lane<K>`` with the lane's ``CUDA_VISIBLE_DEVICES``) and stops it when the run ends.
  Clients find a daemon through ``CUDA_MPS_PIPE_DIRECTORY`` (``muxserve.instance.mps.mps_env``
  sets it per process from ``--mps-dir``); launches get no inherited ``CUDA_MPS_*`` variable, and no
  daemon ever uses the default pipe directory (/tmp/nvidia-mps), so a run without MPS (temporal
  multiplexing) never joins another lane's daemon.
* Ports: lane K owns ``port_base + K * LANE_PORTS`` .. ``+ LANE_PORTS - 1``; launch R of a run gets
  the block ``+ R * LAUNCH_PORTS`` of it: FlexStore, then the launcher's ``--master-port`` and
  ``--server-port`` (its tensor-parallel groups listen on ``--server-port + k``: 30 ports).

One lane with every GPU of the machine is the runner without lanes: environment and MPS directory
as before (the daemon sees every GPU; launches of a multi-GPU run get their device indices).
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from benchmark.end_to_end.e2e_common import BenchError

LANE_PORTS = 1000  # ports per lane
LAUNCH_PORTS = 50  # ports per launch of a run: FlexStore +0..9, --master-port +10..19, --server-port +20 (30 ports)
DEFAULT_PORT_BASE = 20000  # below the Linux ephemeral range (32768-60999)
DEFAULT_MPS_PIPE = Path("/tmp/nvidia-mps")  # where clients without CUDA_MPS_PIPE_DIRECTORY look for a daemon


@dataclass
class Lane:
    index: int
    gpus: list[str]  # the lane's GPUs as CUDA_VISIBLE_DEVICES names them (UUID or index); [] on CPU
    port_base: int
    mps_dir: Path  # given to scripts/start_mps.sh and to the launches' --mps-dir
    cpus: list[int] | None = None  # CPU affinity of the lane's launches (None: inherited)
    whole_machine: bool = False  # one lane with every GPU: the environment of the runner without lanes
    physical: list[str] | None = None  # the GPUs as nvidia-smi indexes them (for the log)

    @property
    def label(self) -> str:
        gpus = ",".join(self.physical or self.gpus)
        return f"lane {self.index}" + (f" GPU {gpus}" if gpus else "")

    def doc(self, num_lanes: int) -> dict:
        """What the merged statistics record about the lane of a run."""
        return {"index": self.index, "num_lanes": num_lanes, "gpus": self.physical or self.gpus,
                "cuda_visible_devices": ",".join(self.gpus) if self.gpus and not self.whole_machine else None,
                "port_base": self.port_base, "mps_dir": str(self.mps_dir),
                "cpus": _ranges(self.cpus) if self.cpus is not None else None}


def _ranges(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out, start = [], None
    for i, c in enumerate(cpus):
        if start is None:
            start = c
        if i + 1 == len(cpus) or cpus[i + 1] != c + 1:
            out.append(f"{start}-{c}" if c != start else f"{c}")
            start = None
    return ",".join(out)


def nvidia_gpus() -> list[tuple[str, str]]:
    """(index, UUID) of every GPU nvidia-smi lists; [] without nvidia-smi."""
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    if smi.returncode != 0:
        return []
    rows = []
    for line in smi.stdout.strip().splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 2:
            rows.append((parts[0], parts[1]))
    return rows


def visible_gpus(spec: str | None, device: str, smi: list[tuple[str, str]] | None = None) -> list[str]:
    """The GPUs lanes may use: ``spec`` (comma-separated indices or UUIDs), else CUDA_VISIBLE_DEVICES
    of this process, else every GPU of nvidia-smi; [] on CPU."""
    if device != "cuda":
        return []
    if spec:
        return [x.strip() for x in spec.split(",") if x.strip()]
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None and env.strip():
        return [x.strip() for x in env.split(",") if x.strip()]
    smi = nvidia_gpus() if smi is None else smi
    return [index for index, _ in smi]


def make_lanes(num_lanes: int | str, gpus_per_run: int, visible: list[str] | None, device: str, mps_dir: Path,
               port_base: int = DEFAULT_PORT_BASE, split_cpus: bool = False, cpus: list[int] | None = None,
               smi: list[tuple[str, str]] | None = None) -> list[Lane]:
    """``num_lanes`` lanes ('auto': as many as the visible GPUs hold) of ``gpus_per_run`` GPUs each,
    in the order of ``visible`` (None: not given: one lane is then the whole machine, as the runner
    without lanes; more lanes take the GPUs of ``visible_gpus``). On CPU the lanes hold no GPU (only
    ports, directories, CPUs)."""
    if gpus_per_run < 1:
        raise BenchError(f"--gpus-per-run must be >= 1, got {gpus_per_run}")
    given = visible is not None
    if device == "cuda":
        if not given and num_lanes not in (1, "1"):
            smi = nvidia_gpus() if smi is None else smi
            visible = visible_gpus(None, device, smi)
        visible = visible or []
        if num_lanes in (1, "1") and not given:
            count = 1  # the whole machine: no GPU list needed
        else:
            if not visible:
                raise BenchError("no GPU found for the lanes (nvidia-smi lists none): give --visible-gpus")
            fit = len(visible) // gpus_per_run
            count = fit if num_lanes == "auto" else int(num_lanes)
            if count < 1 or count > fit:
                raise BenchError(f"{num_lanes} lane(s) of {gpus_per_run} GPU(s) need {max(count, 1) * gpus_per_run} "
                                 f"GPUs; visible: {len(visible)} ({','.join(visible)})")
        whole = count == 1 and not given  # one lane, GPUs not named: the runner without lanes
        if whole:
            visible = []
    else:
        count = 1 if num_lanes == "auto" else int(num_lanes)
        if count < 1:
            raise BenchError(f"--lanes must be >= 1, got {num_lanes}")
        visible = []
        whole = count == 1
    if not 1024 <= port_base <= 65536 - count * LANE_PORTS:
        raise BenchError(f"--port-base {port_base}: {count} lane(s) need ports {port_base}.."
                         f"{port_base + count * LANE_PORTS - 1} within 1024..65535")
    by_index = dict(smi if smi is not None else (nvidia_gpus() if device == "cuda" and not whole else []))
    to_index = {uuid: index for index, uuid in by_index.items()}
    if split_cpus and count > 1:
        cpus = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
        if len(cpus) < count:
            raise BenchError(f"{count} lanes cannot each get their own CPUs: {len(cpus)} available")
        per = len(cpus) // count
        cpu_sets: list[list[int] | None] = [cpus[k * per:(k + 1) * per] for k in range(count)]
    else:
        cpu_sets = [None] * count
    lanes = []
    for k in range(count):
        gpus = visible[k * gpus_per_run:(k + 1) * gpus_per_run]
        physical = [to_index.get(g, g) for g in gpus]
        gpus = [by_index.get(g, g) for g in gpus]  # indices -> UUIDs (unchanged without nvidia-smi)
        lane_mps = mps_dir if count == 1 else mps_dir / f"lane{k}"
        if lane_mps / "nvidia-mps" == DEFAULT_MPS_PIPE:
            raise BenchError(f"--mps-dir {mps_dir}: its daemon would use the default pipe directory "
                             f"{DEFAULT_MPS_PIPE}, which every CUDA process without MPS joins; choose another")
        lanes.append(Lane(k, gpus, port_base + k * LANE_PORTS, lane_mps, cpu_sets[k], whole, physical))
    return lanes


def launch_ports(lane: Lane, rank: int) -> dict[str, int]:
    """FlexStore, --master-port and --server-port of launch ``rank`` of a run on ``lane``: the first free
    port of their sub-blocks (a port held by something else on the host is skipped)."""
    if not 0 <= rank < LANE_PORTS // LAUNCH_PORTS:
        raise BenchError(f"a run of {rank + 1} launches needs more than the {LANE_PORTS} ports of a lane")
    base = lane.port_base + rank * LAUNCH_PORTS
    return {"flexstore": first_free(base, 10), "master": first_free(base + 10, 10), "server": base + 20}


def first_free(start: int, count: int) -> int:
    for port in range(start, start + count):
        if port_is_free(port):
            return port
    raise BenchError(f"ports {start}..{start + count - 1} are all in use on 127.0.0.1: give another --port-base")


def port_is_free(port: int) -> bool:
    """Nothing listens on ``port`` of 127.0.0.1 (a port in TIME_WAIT counts as free: ZeroMQ and
    torch.distributed bind with SO_REUSEADDR too)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def launch_env(lane: Lane, devices: list[int], mps: bool, num_gpus: int, device: str) -> dict[str, str]:
    """The environment of one launch: no inherited MPS variables (the launcher sets them per runtime
    from --mps-dir), only the launch's GPUs visible (see the module docstring)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUDA_MPS_")}
    env["PYTHONUNBUFFERED"] = "1"
    if device != "cuda":
        return env
    if lane.whole_machine:
        if num_gpus > 1:  # the daemon, if any, sees every GPU: indices mean the same to it
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices)
        return env
    names = []
    for d in devices:
        gpu = lane.gpus[d]
        # a UUID names the same GPU everywhere; an index (no nvidia-smi) is renumbered by the lane's
        # MPS server: its clients count from 0 within the lane
        names.append(gpu if gpu.startswith(("GPU-", "MIG-")) or not mps else str(d))
    env["CUDA_VISIBLE_DEVICES"] = ",".join(names)
    return env


def daemon_env(lane: Lane) -> dict[str, str]:
    """The environment of scripts/start_mps.sh for ``lane``: its daemon controls only the lane's GPUs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUDA_MPS_")}
    if not lane.whole_machine and lane.gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(lane.gpus)
    return env
