"""``python -m muxserve.flexserver``: one runtime process (started by the launcher).

FlexStore's secret comes from the environment (``MUXSERVE_FLEXSTORE_SECRET``), never the command line.
"""

from __future__ import annotations

import argparse
import logging
import sys

from muxserve.flexserver.config import RuntimeConfig
from muxserve.ipc.process import exit_with_parent
from muxserve.ipc.runtime import Phase


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m muxserve.flexserver",
                                description="A MuxServe runtime: runs the prefill or decode steps of one LLM. "
                                            "It presents the FlexStore secret found in the environment variable "
                                            "MUXSERVE_FLEXSTORE_SECRET.")
    p.add_argument("--llm", required=True, help="the LLM's name in the model config")
    p.add_argument("--phase", required=True, choices=[p.value for p in Phase], help="which steps this runtime runs")
    p.add_argument("--flexstore", required=True, help="FlexStore's ZeroMQ address")
    p.add_argument("--jobs", required=True, help="ZeroMQ address the scheduler sends jobs on")
    p.add_argument("--results", required=True, help="ZeroMQ address results go to")
    p.add_argument("--attention-backend", default="auto", help="attention backend (default: auto)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="largest batch this runtime runs (default: 256)")
    p.add_argument("--enforce-eager", action="store_true", help="never use CUDA graphs")
    p.add_argument("--tp-size", type=int, default=1, help="tensor-parallel ranks of this LLM (default: 1)")
    p.add_argument("--tp-rank", type=int, default=0, help="this process's tensor-parallel rank (default: 0)")
    p.add_argument("--dist-init-method", metavar="URL",
                   help="rendezvous of the ranks' torch.distributed group, file:///PATH or tcp://HOST:PORT "
                        "(required with --tp-size > 1)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default: 1)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = p.parse_args(argv)
    try:
        config = RuntimeConfig(llm=args.llm, phase=Phase(args.phase), flexstore_address=args.flexstore,
                               jobs_address=args.jobs, results_address=args.results,
                               attention_backend=args.attention_backend, max_num_seqs=args.max_num_seqs,
                               enforce_eager=args.enforce_eager, tp_size=args.tp_size, tp_rank=args.tp_rank,
                               dist_init_method=args.dist_init_method)
    except ValueError as e:
        p.error(str(e))
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s runtime %(message)s")
    exit_with_parent()  # before the heavy imports: a launcher killed meanwhile leaves no orphan
    import torch

    from muxserve.flexserver.runtime import Runtime
    from muxserve.flexstore.auth import SECRET_ENV, secret_from_env

    secret = secret_from_env()
    if secret is None:
        p.error(f"the environment variable {SECRET_ENV} must hold FlexStore's secret")
    torch.set_num_threads(args.threads)
    Runtime(config, secret).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
