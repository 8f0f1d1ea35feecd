"""``python -m muxserve.launch`` with a start barrier, for launches that run side by side.

    python -m benchmark.end_to_end.launch_synced --barrier-dir D --barrier-count N --barrier-rank K \\
        -- CONFIG --workload-file W --stats-file S ...        (every flag of muxserve.launch)

The launches of one system run (spatial partitioning: one per LLM; several meshes: one per mesh)
start together but get ready at different times. Each one here, in the folder D shared by all N:

1. waits until every launch has started its processes (``started-K``);
2. measures its LLMs alone (the SLO base latency) in rank order, one launch at a time, so that
   no calibration runs next to another launch's work (``calibrated-K``);
3. waits until all are calibrated, then replays its workload: the N replays start within a
   few milliseconds, and each records its start (``start-K.json``, wall clock).

``--calibrate-only`` stops after step 2: the launch measures its LLMs alone (on the whole GPU
when its config says ``[100, 90]`` and no MPS) and replays nothing; its statistics file holds the
base latencies and no request (the common SLO base of the end-to-end runs).

``--cpus LIST`` pins the launch and every process it starts to those CPUs (lanes of the runner).

A file ``abort`` in D (written by the runner when a launch fails) stops the waiting launches.

``--max-drain-s S`` bounds an overloaded run: S seconds after the last arrival, every request
still unfinished is aborted and recorded without an end time (it counts as served late: it
misses every SLO, and the merged statistics list it as unfinished).

Everything else is ``muxserve.launch`` unchanged: this wraps its ``Instance.calibrate`` and
``replay``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import muxserve.launch as launch

POLL_S = 0.005


class Barrier:
    def __init__(self, folder: Path, count: int, rank: int, timeout_s: float):
        if count < 1 or not 0 <= rank < count:
            raise ValueError(f"barrier rank {rank} of {count} is out of range")
        self.folder, self.count, self.rank, self.timeout_s = folder, count, rank, timeout_s
        self.folder.mkdir(parents=True, exist_ok=True)
        self.started = False
        self.calibrated = False

    def arrive(self, stage: str, payload: dict | None = None) -> None:
        path = self.folder / f"{stage}-{self.rank}"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload or {}))
        tmp.rename(path)

    def wait(self, stage: str, ranks: range | None = None) -> None:
        """Until ``stage-K`` exists for every K in ``ranks`` (default: all)."""
        ranks = range(self.count) if ranks is None else ranks
        deadline = time.monotonic() + self.timeout_s
        while True:
            if all((self.folder / f"{stage}-{k}").exists() for k in ranks):
                return
            if (self.folder / "abort").exists():
                raise RuntimeError(f"another launch of this run failed ({self.folder / 'abort'})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"launches {list(ranks)} not {stage} after {self.timeout_s:.0f} s ({self.folder})")
            time.sleep(POLL_S)

    def start_together(self) -> None:
        if not self.started:
            self.arrive("started")
            self.wait("started")
            self.started = True


def install(barrier: Barrier, max_drain_s: float | None = None, calibrate_only: bool = False) -> None:
    """Wrap the launcher's calibration and replay with the barrier."""
    if not hasattr(launch, "replay") or not hasattr(launch, "Instance"):
        raise RuntimeError("muxserve.launch has no replay()/Instance any more: update launch_synced.py")
    base_instance, base_replay = launch.Instance, launch.replay

    class SyncedInstance(base_instance):
        def calibrate(self):
            barrier.start_together()
            barrier.wait("calibrated", range(barrier.rank))
            try:
                return super().calibrate()
            finally:
                barrier.arrive("calibrated")
                barrier.calibrated = True

    def replay(instance, workload, launcher_max_drain_s=None):
        barrier.start_together()
        if not barrier.calibrated:  # --no-slo
            barrier.arrive("calibrated")
        barrier.wait("calibrated")
        if calibrate_only:
            return []
        barrier.arrive("start", {"wall": time.time()})
        return base_replay(instance, workload, launcher_max_drain_s if max_drain_s is None else max_drain_s)

    launch.Instance = SyncedInstance
    launch.replay = replay


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmark.end_to_end.launch_synced", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--barrier-dir", required=True, help="folder shared by the launches of one run")
    p.add_argument("--barrier-count", type=int, required=True, help="how many launches run side by side")
    p.add_argument("--barrier-rank", type=int, required=True, help="this launch's rank, 0..count-1")
    p.add_argument("--barrier-timeout-s", type=float, default=1800.0,
                   help="give up waiting for the others after this long (default: 1800)")
    p.add_argument("--max-drain-s", type=float, default=None,
                   help="abort what is unfinished this long after the last arrival (default: wait for all)")
    p.add_argument("--calibrate-only", action="store_true",
                   help="measure the LLMs alone (the SLO base), then stop without replaying the workload")
    p.add_argument("--cpus", default=None,
                   help="comma-separated CPUs this launch and its processes run on (default: inherited)")
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    if cut == len(argv):
        p.error("put the launcher's arguments after '--'")
    if args.cpus:  # the launcher's processes inherit it
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    install(Barrier(Path(args.barrier_dir), args.barrier_count, args.barrier_rank, args.barrier_timeout_s),
            args.max_drain_s, args.calibrate_only)
    return launch.main(argv[cut + 1:])


if __name__ == "__main__":
    sys.exit(main())
