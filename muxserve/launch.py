"""``python -m muxserve.launch MODEL_CONFIG.yaml``: replay a workload on one instance (one mesh).

Starts FlexStore, two runtimes per LLM and the scheduler, waits until all are ready, measures
each LLM alone (the base latency of the SLO figures), replays the workload file, prints the
statistics block, writes ``--stats-file`` and stops everything it started.

Given a placement's output instead (its folder or placement.json), every mesh replays its share
of the workload on a Ray cluster and the statistics are merged (``--nnodes``, ``--node-rank``,
``--master-addr``; see muxserve/cluster/replay.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections import deque
from pathlib import Path

import msgspec

from muxserve import files
from muxserve.config import MuxServeConfig, load_config
from muxserve.engine.model_config import ModelSpec
from muxserve.engine.model_hub import resolve_model
from muxserve.engine.sampling_params import SamplingParams
from muxserve.engine.sequence import FinishReason
from muxserve.errors import ConfigError, InputError
from muxserve.instance.cli import (
    add_instance_arguments,
    check_instance_args,
    instance_options,
    planned_max_tokens,
    resolve_device,
    run_instance_command,
)
from muxserve.instance.instance import Instance
from muxserve.instance.options import InstanceOptions
from muxserve.progress import Progress
from muxserve.scheduler.recovery import LLMUnavailable
from muxserve.scheduler.state import Request
from muxserve.scheduler.stats import format_stats, summarize_run
from muxserve.workload.workload_file import Workload, WorkloadRequest, load_workload

logger = logging.getLogger("muxserve.launch")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m muxserve.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_config", help="the instance's model_config YAML (see examples/basic/model_config.yaml), "
                                        "or a placement's output folder / placement.json to replay every mesh of "
                                        "it on a Ray cluster (muxserve.cluster.replay; needs Ray)")
    g = p.add_argument_group("mesh (as torch.distributed.launch); with a placement: the nodes of the Ray cluster")
    g.add_argument("--nnodes", type=int, default=1,
                   help="nodes; more than 1 needs a placement and a Ray cluster at --master-addr (default: 1)")
    g.add_argument("--node-rank", "--node_rank", type=int, default=0,
                   help="rank of this node: 0 runs the replay, others join the Ray cluster (default: 0)")
    g.add_argument("--master-addr", "--master_addr", default="127.0.0.1",
                   help="address of rank 0; with --nnodes > 1 its Ray head, host or host:port (port 6379 unless "
                        "given) (default: 127.0.0.1)")
    g.add_argument("--master-port", "--master_port", type=int, default=29500,
                   help="torch.distributed port of rank 0 (default: 29500)")
    g.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=None,
                   help="GPUs of this mesh; must equal num_gpus of the config on GPU (default: num_gpus)")
    g = p.add_argument_group("run")
    g.add_argument("--workload-file", help="workload JSON to replay (default: workloads.workload_file of the config)")
    g.add_argument("--split-by-model", help="serve only this LLM of the config and its requests (spatial partitioning)")
    g.add_argument("--stats-file", help="write per-request records (with output token ids) and the summary as JSON "
                                        "(gzip-compressed when the name ends in .gz)")
    g.add_argument("--no-slo", action="store_true", help="skip measuring each LLM alone (no SLO attainment figures)")
    g.add_argument("--max-drain-s", type=float, default=None,
                   help="abort requests still unfinished this many seconds after the last arrival; they count "
                        "as unfinished (default: wait for every request)")
    add_instance_arguments(p)
    return p


def check_requests_fit(workload: Workload, max_tokens: dict[str, int], source: str) -> None:
    too_big = [r.idx for r in workload.requests if len(r.prompt_token_ids) + r.output_len > max_tokens[r.llm]]
    if too_big:
        raise ConfigError(f"requests {too_big[:10]} of {source} need more KV cache than the pool holds for their "
                          f"LLM (at most {max_tokens} tokens); raise kv_cache_bytes / gpu_memory_utilization")


def check_token_ids(workload: Workload, config: MuxServeConfig, source: str) -> None:
    """Every prompt token id inside its LLM's vocabulary, checked before anything starts (a runtime
    would refuse the request only at replay)."""
    vocab = {m.name: ModelSpec.from_folder(resolve_model(m.model)).vocab_size for m in config.models}
    for r in workload.requests:
        size = vocab[r.llm]
        bad = next((t for t in r.prompt_token_ids if not 0 <= t < size), None)
        if bad is not None:
            raise ConfigError(f"workload {source}: request idx {r.idx} of LLM {r.llm!r} has prompt token id {bad}, "
                              f"outside the vocabulary of its model {config.model(r.llm).model!r} (ids 0..{size - 1}); "
                              "was the workload tokenized for another model?")


def check_args(args, config: MuxServeConfig, device: str) -> None:
    if args.nnodes != 1 or args.node_rank != 0:
        raise ConfigError("an instance runs on one node (--nnodes 1 --node-rank 0); start one launch per mesh")
    if device == "cuda" and args.nproc_per_node is not None and args.nproc_per_node != config.num_gpus:
        raise ConfigError(f"--nproc_per_node {args.nproc_per_node} differs from num_gpus {config.num_gpus} "
                          f"in {args.model_config}")
    check_instance_args(args, config, device, args.model_config, dist_host=args.master_addr)


def launch_options(args, config: MuxServeConfig, device: str, workload: Workload | None = None) -> InstanceOptions:
    """The instance's options from the launcher's flags; the workload's rates and lengths size the quotas."""
    if workload is None:
        return instance_options(args, config, device, dist_host=args.master_addr)
    return instance_options(args, config, device, rates=workload.rates(), avg_seq_len=average_seq_len(workload),
                            dist_host=args.master_addr)


def select(config: MuxServeConfig, workload: Workload, split_by_model: str | None, source: str):
    """Apply --split-by-model and check that every LLM of the workload exists."""
    if split_by_model:
        config.model(split_by_model)  # ConfigError when unknown
        config = msgspec.structs.replace(config, models=[config.model(split_by_model)])
        workload = workload.only({split_by_model})
    unknown = sorted(set(workload.llms) - set(config.model_names))
    if unknown:
        raise ConfigError(f"workload {source} names LLMs that the config lacks: {unknown}; "
                          f"config LLMs: {config.model_names}")
    if not workload.requests:
        raise ConfigError(f"workload {source} has no request for the LLMs {config.model_names}")
    return config, workload


def average_seq_len(workload: Workload) -> int:
    reqs = workload.requests
    return max(1, round(sum(len(r.prompt_token_ids) + r.output_len for r in reqs) / len(reqs)))


def replay(instance: Instance, workload: Workload, max_drain_s: float | None = None) -> list:
    """Submit each request at its arrival time; return every request, times relative to the start.

    With ``max_drain_s``, requests still unfinished that long after the last arrival are aborted
    (their ``end`` stays None: they count as unfinished); this bounds an overloaded run. Requests
    of an LLM that failed (its runtime kept dying) end with ``finish_reason`` ``error``, unfinished.
    """
    pending = deque(workload.requests)
    last_arrival = workload.requests[-1].arrival if workload.requests else 0.0
    requests = []
    aborted = False
    t0 = time.monotonic()

    def due() -> float | None:
        """Submit what has arrived, abort what is left after the drain time; seconds to the next arrival."""
        nonlocal aborted
        now = time.monotonic() - t0
        while pending and pending[0].arrival <= now:
            requests.append(_submit(instance, pending.popleft(), t0))
        if max_drain_s is not None and not aborted and not pending and now > last_arrival + max_drain_s:
            left = [r for r in requests if r.end is None]
            logger.warning("%.0f s after the last arrival: aborting %d unfinished requests", max_drain_s, len(left))
            for r in left:
                instance.abort(r.req_id)
            aborted = True
        return pending[0].arrival - now if pending else None

    with Progress(len(pending), "requests", "req") as bar:
        instance.run_until_done(due, lambda finished: bar.update(len(finished)))
    for r in requests:  # report times relative to the start of replay
        if r.finish_reason in (FinishReason.ABORT, FinishReason.ERROR):
            r.end = None
        for key in ("arrival", "submit", "prefill_end", "end"):
            if getattr(r, key) is not None:
                setattr(r, key, getattr(r, key) - t0)
    return requests


def _submit(instance: Instance, r: WorkloadRequest, t0: float) -> Request:
    """Queue one workload request; one of an LLM that failed comes back ended with ``error``."""
    params = SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True)
    try:
        return instance.submit(r.llm, r.prompt_token_ids, params, t0 + r.arrival, r.idx)
    except LLMUnavailable as e:
        return Request(str(-r.idx), list(r.prompt_token_ids), params, idx=r.idx, llm=r.llm, arrival=t0 + r.arrival,
                       finish_reason=FinishReason.ERROR, error=str(e))


def run(args) -> int:
    config = load_config(args.model_config)
    workload_path = args.workload_file or config.workloads.workload_file
    if not workload_path:
        raise ConfigError(f"no workload: give --workload-file or workloads.workload_file in {args.model_config}")
    workload = load_workload(workload_path)
    config, workload = select(config, workload, args.split_by_model, workload_path)
    check_token_ids(workload, config, workload_path)
    device = resolve_device(args.device)
    check_args(args, config, device)
    options = launch_options(args, config, device, workload)
    planned = planned_max_tokens(config, options.page_bytes, device)
    if planned is not None:
        check_requests_fit(workload, planned, workload_path)
    instance = Instance(config, options)
    try:
        instance.start()
        check_requests_fit(workload, {m: instance.max_tokens(m) for m in config.model_names}, workload_path)
        bases = None if args.no_slo else instance.calibrate()
        logger.info("replaying %d requests of %s with %s", len(workload.requests), workload_path,
                    args.schedule_approach)
        requests = replay(instance, workload, args.max_drain_s)
        figures = instance.metrics()
        failed = instance.failed_llms
    finally:
        instance.stop()
    records = [r.record() for r in requests]
    summary = summarize_run(records, bases)
    summary["overall"]["scheduler_preemptions"] = figures.preemptions
    for llm, wait in figures.decode_waits.items():
        if llm in summary["per_model"]:
            summary["per_model"][llm]["scheduler"] = wait
    for llm, row in figures.residency.items():  # elastic LLMs: offloads and wakes with their durations
        if llm in summary["per_model"]:
            summary["per_model"][llm]["residency"] = row
    if figures.residency_events:
        summary["overall"]["residency_events"] = [e.as_dict() for e in figures.residency_events]
    print(format_stats(summary), flush=True)
    if args.stats_file:
        write_stats(args, records, summary, bases)
    for llm, message in failed.items():
        lost = sum(r.llm == llm and r.finish_reason is FinishReason.ERROR for r in requests)
        print(f"error: {message}; {lost} of its requests did not finish (the other LLMs' requests were served)",
              file=sys.stderr)
    return 1 if failed else 0


def write_stats(args, records, summary, bases) -> None:
    doc = {
        "command": sys.argv,
        "schedule_approach": args.schedule_approach,
        "requests": [dataclasses.asdict(r) for r in records],
        "summary": summary,
        "base_latency": {k: {"prefill_points": v.prefill_points, "decode_step": v.decode_step}
                         for k, v in (bases or {}).items()},
    }
    files.write_json(args.stats_file, doc, indent=1)  # gzip-compressed when the name ends in .gz
    logger.info("statistics written to %s", args.stats_file)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.max_drain_s is not None and args.max_drain_s < 0:
        parser.error(f"--max-drain-s must be >= 0, got {args.max_drain_s}")
    path = Path(args.model_config)
    if path.is_dir() or path.suffix == ".json" or args.nnodes > 1 or args.node_rank > 0:
        from muxserve.cluster import replay  # the only path that needs Ray

        return replay.main(args)
    return run_instance_command(lambda: run(args), (InputError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
