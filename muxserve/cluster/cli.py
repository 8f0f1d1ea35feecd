"""``muxserve cluster {up,down,status}`` (also ``python -m muxserve.cluster ...``).

  up PLACEMENT [-- SERVE FLAGS]  start every mesh of the placement on the Ray cluster and serve
                                 all LLMs behind one OpenAI-compatible endpoint (foreground)
  down                           stop a running cluster (its instances, the actors, the front door)
  status                         show the instances, their nodes, GPUs, states and restarts

Flags after ``--`` go to every instance's ``muxserve serve`` (e.g. ``-- --device cpu
--schedule-approach fcfs``); the cluster sets the instance's address, ports, logs and key itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time

from muxserve.cluster.host import RESERVED_FLAGS
from muxserve.cluster.state import process_alive, read_state, remove_state, state_path
from muxserve.errors import ClusterError

RESERVED_UP_FLAGS = (*RESERVED_FLAGS, "--api-key", "--split-by-model")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="muxserve cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{up,down,status}")
    up = sub.add_parser("up", help="start the placement's meshes on Ray and serve them behind one endpoint",
                        description="Start one instance (muxserve serve) per mesh of the placement, each on a Ray "
                                    "node that has the mesh's GPUs, wait until all serve, then route OpenAI requests "
                                    "by model until SIGTERM (drains) or Ctrl-C. Flags after -- go to every instance.")
    up.add_argument("placement", help="the placement's output folder (python -m muxserve.muxsched.placement "
                                      "--output-dir) or its placement.json")
    up.add_argument("--address", help="Ray cluster to use, host:port of its head (`ray start --head` prints it); "
                                      "default: $RAY_ADDRESS, else a Ray started on this machine only")
    up.add_argument("--num-gpus", type=int, default=None,
                    help="GPUs of the Ray started on this machine (no --address); default: detected, or for "
                         "`-- --device cpu` one CPU stand-in per GPU of the placement")
    up.add_argument("--host", default="127.0.0.1", help="front door address to listen on (default: 127.0.0.1)")
    up.add_argument("--port", type=int, default=8000, help="front door port (default: 8000)")
    up.add_argument("--api-key", default=None,
                    help="key clients must send (Authorization: Bearer KEY) for /v1 and /cluster; also the "
                         "instances' key (default: $MUXSERVE_API_KEY; without one the front door is open and "
                         "the instances get a random key)")
    up.add_argument("--mps", action="store_true",
                    help="run each instance under an NVIDIA MPS daemon of its own, started on its node over "
                         "its GPUs (GPU nodes; the runtimes then use their mps_percentage)")
    _add_common(up)
    up.add_argument("--log-dir", default="log/cluster",
                    help="logs on each node: <log-dir>/<mesh>/server.log and procs/ (default: log/cluster)")
    up.add_argument("--max-restarts", type=int, default=3,
                    help="restarts of a dead instance allowed within 10 minutes; past that the cluster "
                         "stops (default: 3)")
    up.add_argument("--ready-timeout", type=float, default=1200.0,
                    help="seconds for the GPUs to be reserved and for each instance to serve (default: 1200)")
    up.add_argument("--drain-timeout", type=float, default=30.0,
                    help="on SIGTERM, seconds for running requests to finish (default: 30)")
    up.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    down = sub.add_parser("down", help="stop a running cluster",
                          description="Stop the cluster started by `muxserve cluster up` on this machine: its front "
                                      "door drains, every instance stops, the Ray actors end.")
    _add_common(down)
    down.add_argument("--timeout", type=float, default=120.0,
                      help="seconds to wait for a clean stop before it is forced (default: 120)")
    status = sub.add_parser("status", help="show the instances of a running cluster",
                            description="Ask a running cluster's front door for its instances.")
    _add_common(status)
    status.add_argument("--api-key", default=None, help="the cluster's key (default: $MUXSERVE_API_KEY)")
    status.add_argument("--json", action="store_true", help="print the front door's /cluster answer as JSON")
    return p


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default="default",
                        help="the cluster's name: one state file per name in $MUXSERVE_CLUSTER_DIR "
                             "(default: ~/.cache/muxserve/cluster) and its Ray namespace (default: default)")


def split_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """The cluster's own arguments and the instances' flags (after ``--``)."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    flags = argv[i + 1:]
    for flag in flags:
        if flag.split("=", 1)[0] in RESERVED_UP_FLAGS:
            raise ClusterError(f"instance flag {flag} (after --) is set by the cluster itself; "
                               f"reserved: {', '.join(RESERVED_UP_FLAGS)}")
    return argv[:i], flags


def run_down(args) -> int:
    state = read_state(args.name)
    if state is None:
        print(f"no cluster named {args.name!r} runs on this machine (no state file {state_path(args.name)})")
        return 1
    pid = state["pid"]
    if not process_alive(pid):
        remove_state(args.name, pid)
        print(f"cluster {args.name!r} (pid {pid}) was not running; removed its state file")
        return 0
    print(f"stopping cluster {args.name!r} (pid {pid}, {state.get('url')})", flush=True)
    for sig, wait in ((signal.SIGTERM, args.timeout), (signal.SIGINT, 30.0), (signal.SIGKILL, 10.0)):
        if sig == signal.SIGKILL:  # Ray ends the actors of a dead driver, and each instance dies with its actor
            print(f"cluster {args.name!r} did not stop; killing pid {pid}", flush=True)
        try:
            os.kill(pid, sig)
        except ProcessLookupError:  # it ended meanwhile
            pass
        deadline = time.monotonic() + wait
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not process_alive(pid):
            remove_state(args.name, pid)
            print(f"cluster {args.name!r} stopped")
            return 0
    return 1


def run_status(args) -> int:
    import httpx

    state = read_state(args.name)
    if state is None or not process_alive(state.get("pid", -1)):
        print(f"no cluster named {args.name!r} runs on this machine")
        return 1
    if not state.get("serving"):
        print(f"cluster {args.name!r} (pid {state['pid']}) is starting; its front door will be {state['url']}")
        return 0
    key = args.api_key or os.environ.get("MUXSERVE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        resp = httpx.get(state["url"] + "/cluster", headers=headers, timeout=10, trust_env=False)
    except httpx.HTTPError as e:
        print(f"cluster {args.name!r} (pid {state['pid']}) does not answer at {state['url']}: {e}")
        return 1
    if resp.status_code != 200:
        print(f"cluster {args.name!r} answered {resp.status_code}: {resp.text}")
        return 1
    doc = resp.json()
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(f"cluster {args.name!r}: {state['url']}/v1 (pid {state['pid']}, Ray {state.get('ray_address') or 'local'})")
    print("| instance | state | LLMs | node | GPUs | url | restarts |")
    print("|---|---|---|---|---|---|---|")
    for inst in doc["instances"]:
        print(f"| {inst['instance']} | {inst['state']} | {', '.join(inst['llms'])} | {inst['node_ip']} "
              f"[{(inst['node_id'] or '')[:8]}] | {','.join(inst['gpus']) or '-'} | {inst['url'] or '-'} | "
              f"{inst['restarts']} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        own, flags = split_flags(argv)
        args = build_parser().parse_args(own)
        if args.command == "up":
            if args.drain_timeout < 0 or args.ready_timeout <= 0 or args.max_restarts < 0:
                raise ClusterError("--drain-timeout and --max-restarts must be >= 0 and --ready-timeout > 0")
            logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per proxied request
            from muxserve.cluster.up import run_up

            return run_up(args, flags)
        if flags:
            raise ClusterError(f"`cluster {args.command}` takes no instance flags (after --): {flags}")
        return run_down(args) if args.command == "down" else run_status(args)
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
