"""Offline replay across a cluster: ``python -m muxserve.launch PLACEMENT --nnodes N --node-rank R
--master-addr A --workload-file W`` (the original's multi-node launch, on Ray).

Node rank 0 joins the Ray cluster whose head is at A (``ray start --head`` there; port 6379
unless A says ``host:port``), waits until N nodes are in, and runs, for each mesh of the
placement, ``muxserve.launch`` on that mesh's requests (W split by LLM, arrival times and ids
kept) as a Ray task on a node with the mesh's GPUs; then it merges the meshes' statistics into
one ``--stats-file`` and prints the usual block. Ranks > 0 join the cluster (``ray start
--address A --block``) and leave when stopped. With ``--nnodes 1`` every mesh runs on a Ray
started on this machine.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import sys
from pathlib import Path

import msgspec

from muxserve.cluster.host import HostSpec, ReplaySpec, driver_env, replay_mesh
from muxserve.cluster.merge import MeshResult, merge_stats
from muxserve.cluster.ray_cluster import check_reachable, connect, import_ray, ray_address, reserve, wait_for_nodes
from muxserve.cluster.spec import ClusterSpec, MeshSpec, load_placement, portable_config
from muxserve.errors import ClusterError, InputError
from muxserve.scheduler.stats import format_stats
from muxserve.workload.workload_file import Workload, load_workload

logger = logging.getLogger("muxserve.cluster")

JOIN_TIMEOUT_S = 600.0


class MeshFailed(RuntimeError):
    """A mesh's replay did not finish; names the mesh, its node and its log."""


def main(args) -> int:
    """Run (or join) a cluster replay; exit codes as the launcher's: 2 bad input, 1 a mesh failed,
    130 Ctrl-C or SIGTERM (every mesh is stopped in each case)."""
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        return run_cluster_replay(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except MeshFailed as e:
        print(f"error: {e}; every mesh was stopped", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; every mesh was stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _sigterm(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def mesh_workloads(spec: ClusterSpec, workload_file: str | None) -> dict[str, tuple[bytes, int]]:
    """Each mesh's requests (workload file format, request ids kept): from --workload-file split by
    LLM, else from the workload file of the mesh's config."""
    shared = load_workload(workload_file) if workload_file else None
    if shared is not None:
        unknown = sorted(set(shared.llms) - set(spec.llms))
        if unknown:
            raise ClusterError(f"workload {workload_file} names LLMs that no mesh of {spec.source} holds: {unknown}")
    out = {}
    for mesh in spec.meshes:
        workload = shared
        if workload is None:
            path = mesh.config.workloads.workload_file
            if not path:
                raise ClusterError(f"no workload for {mesh.name}: give --workload-file or workloads.workload_file "
                                   f"in {mesh.config_path}")
            workload = load_workload(path)
        out[mesh.name] = _encode(workload, set(mesh.llms))
    return out


def _encode(workload: Workload, llms: set[str]) -> tuple[bytes, int]:
    requests = [r for r in workload.requests if r.llm in llms]
    info = dict(workload.info)
    if "rates" in info:
        info["rates"] = [[n, r] for n, r in info["rates"] if n in llms]
    doc = {"info": info, "arrivals": [r.arrival for r in requests],
           "requests": [{"model_name": r.llm, "idx": r.idx, "data": [r.prompt_token_ids, len(r.prompt_token_ids),
                                                                      r.output_len]} for r in requests]}
    return msgspec.json.encode(doc), len(requests)


def launch_flags(args) -> list[str]:
    """The launcher's flags that each mesh's own launch gets."""
    flags = ["--schedule-approach", args.schedule_approach, "--max-num-batched-tokens",
             str(args.max_num_batched_tokens), "--device", args.device, "--log-level", args.log_level]
    if args.block_size is not None:
        flags += ["--block-size", str(args.block_size)]
    if args.max_num_seqs is not None:
        flags += ["--max-num-seqs", str(args.max_num_seqs)]
    if args.enforce_eager:
        flags.append("--enforce-eager")
    if args.no_slo:
        flags.append("--no-slo")
    if args.max_drain_s is not None:
        flags += ["--max-drain-s", str(args.max_drain_s)]
    return flags


def join(args) -> int:
    """Ranks > 0: this machine becomes a node of the Ray cluster at --master-addr."""
    address = ray_address(args.master_addr)
    check_reachable(address, "--master-addr")
    ray_cli = Path(sys.executable).with_name("ray")
    cmd = [str(ray_cli) if ray_cli.exists() else (shutil.which("ray") or "ray"), "start", "--address", address,
           "--block"]
    if args.nproc_per_node is not None:
        cmd += ["--num-gpus", str(args.nproc_per_node)]
    print(f"node rank {args.node_rank}: joining the Ray cluster at {address} ({shlex.join(cmd)}); node rank 0 runs "
          "the replay; stop this node with Ctrl-C", flush=True)
    os.execvp(cmd[0], cmd)
    return 1  # not reached


def run_cluster_replay(args) -> int:
    if not 0 <= args.node_rank < args.nnodes:
        raise ClusterError(f"--node-rank {args.node_rank} must be in [0, --nnodes {args.nnodes})")
    path = Path(args.model_config)
    if not (path.is_dir() or path.suffix == ".json"):
        raise ClusterError(f"--nnodes {args.nnodes}: a replay over several nodes takes the placement's output (its "
                           f"folder or placement.json), got {args.model_config}")
    if args.split_by_model:
        raise ClusterError("--split-by-model runs one LLM of one model_config; it does not apply to a placement")
    if args.node_rank > 0:
        return join(args)
    spec = load_placement(path)
    workloads = mesh_workloads(spec, args.workload_file)
    ray = import_ray()
    address = ray_address(args.master_addr) if args.nnodes > 1 else os.environ.get("RAY_ADDRESS")
    gpus = args.nproc_per_node
    if gpus is None and args.device == "cpu":  # a CPU stand-in per GPU of the placement
        gpus = spec.num_gpus
    try:
        logger.info("connected to %s", connect(address, "--master-addr", "muxserve-replay", gpus))
        wait_for_nodes(args.nnodes, JOIN_TIMEOUT_S, address or "this machine")
        reservation = reserve(spec, JOIN_TIMEOUT_S)
        try:
            results = _run_meshes(spec, args, workloads, reservation)
        finally:
            reservation.remove()
    finally:
        if ray.is_initialized():
            ray.shutdown()
    doc = merge_stats(results, sys.argv, str(spec.source))
    print(format_stats(doc["summary"]), flush=True)
    if args.stats_file:
        out = Path(args.stats_file)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(msgspec.json.format(msgspec.json.encode(doc), indent=1))
        logger.info("statistics of %d meshes merged into %s", len(results), out)
    return 0


def _host_spec(mesh: MeshSpec, args) -> HostSpec:
    cwd = Path.cwd()
    return HostSpec(mesh=mesh.name, config_text=portable_config(mesh, cwd), flags=launch_flags(args),
                    log_dir=str(Path(args.log_dir).resolve()), cwd=str(cwd), mps=bool(args.mps_dir), env=driver_env())


def _run_meshes(spec: ClusterSpec, args, workloads: dict[str, tuple[bytes, int]], reservation) -> list[MeshResult]:
    import ray

    task = ray.remote(replay_mesh)
    pending = {}
    for mesh in spec.meshes:
        data, count = workloads[mesh.name]
        if not count:
            logger.info("%s (%s): no requests in the workload; not started", mesh.name, ", ".join(mesh.llms))
            continue
        options = task.options(num_cpus=0, num_gpus=mesh.num_gpus, max_retries=0,
                               scheduling_strategy=reservation.strategy(mesh))
        ref = options.remote(ReplaySpec(_host_spec(mesh, args), data))
        pending[ref] = mesh
        logger.info("%s (%s; %d GPU%s): replaying %d requests", mesh.name, ", ".join(mesh.llms), mesh.num_gpus,
                    "" if mesh.num_gpus == 1 else "s", count)
    results = []
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=5.0)
            for ref in done:
                mesh = pending.pop(ref)
                try:
                    out = ray.get(ref)
                except ray.exceptions.RayError as e:  # the task itself failed (its node went away, ...)
                    raise MeshFailed(f"{mesh.name}: {e}") from None
                where = f"node {out['node_ip']} [{out['node_id'][:8]}] GPUs {','.join(out['gpus']) or '-'}"
                if out["returncode"] != 0 or out["stats"] is None:
                    raise MeshFailed(f"{mesh.name} on {where} exited with code {out['returncode']}; last lines of "
                                     f"{out['log']}:\n{out['tail']}")
                stats = msgspec.json.decode(out["stats"])
                logger.info("%s done on %s in %.1f s (%d requests)", mesh.name, where, out["wall_s"],
                            len(stats["requests"]))
                results.append(MeshResult(mesh.name, mesh.node, list(mesh.llms), stats, out["node_ip"],
                                          out["node_id"], out["gpus"], out["wall_s"]))
    finally:
        for ref in pending:  # a failure or Ctrl-C: the other meshes stop too
            ray.cancel(ref, force=True)
    return results

