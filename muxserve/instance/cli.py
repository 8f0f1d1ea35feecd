"""Command-line pieces shared by the launcher (``muxserve.launch``) and the server (``muxserve.serve``).

Both start one :class:`~muxserve.instance.Instance` from a model_config YAML and the same flags:
where FlexStore listens, MPS, device, logs, restarts of dead runtimes, the schedule approach and
its limits, the page size.
"""

from __future__ import annotations

import argparse
import errno
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from muxserve.config import MuxServeConfig
from muxserve.engine.kv_cache import DEFAULT_CPU_KV_BYTES, DEFAULT_PAGE_BYTES, KVLayout
from muxserve.engine.model_config import ModelSpec
from muxserve.engine.model_hub import resolve_model
from muxserve.engine.parallel import check_tensor_parallel
from muxserve.errors import ConfigError
from muxserve.instance.budget import check_memory_budget
from muxserve.instance.options import InstanceOptions
from muxserve.instance.processes import ChildDied
from muxserve.instance.supervisor import RestartPolicy
from muxserve.ipc.devices import parse_dtype
from muxserve.scheduler.policy import POLICIES, get_policy


def add_instance_arguments(parser: argparse.ArgumentParser, default_log_dir: str = "log/vllm_proc") -> None:
    """The flags that shape an instance, in three groups: addresses, run, scheduler."""
    g = parser.add_argument_group("instance")
    g.add_argument("--flexstore-port", type=int, default=None,
                   help="serve FlexStore on this TCP port of 127.0.0.1; refused if the port is taken (default: "
                        "an ipc socket in the instance's private directory, which no other user can reach)")
    g.add_argument("--server-port", type=int, default=None,
                   help="base port of the tensor-parallel runtimes' torch.distributed groups (the k-th group at "
                        "port + k; refused if taken); default: files in the instance's private directory, no port")
    g.add_argument("--mps-dir", help="MPS directory given to scripts/start_mps.sh; runtimes then run under MPS "
                                     "with their mps_percentage (without it they time-share the GPU)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where models run (default: cuda if available, else cpu)")
    g.add_argument("--log-dir", default=default_log_dir,
                   help=f"folder for the logs of FlexStore and each runtime (default: {default_log_dir})")
    g.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    g.add_argument("--enforce-eager", action="store_true",
                   help="run decode steps eagerly instead of replaying CUDA graphs (GPU only; for debugging)")
    g.add_argument("--max-runtime-restarts", type=int, default=3,
                   help="restarts in a row of a dead runtime (its requests are recomputed; one that ran 60 s "
                        "counts from 0 again) before its LLM fails and its requests get errors; the other LLMs "
                        "go on (default: 3; 0: never restart)")
    g.add_argument("--restart-backoff", type=float, default=0.5,
                   help="seconds before the first restart of a dead runtime, doubling with each further one "
                        "(default: 0.5)")
    g.add_argument("--offload-idle-s", type=float, default=None,
                   help="elastic residency: offload an LLM with 'residency: elastic' in the config once it has "
                        "been idle (no request waiting or running) this many seconds; its weights go to a pinned "
                        "host copy and its GPU memory serves the other LLMs' KV; its next request wakes it (the "
                        "wait counts in that request's TTFT). Default: never offload on its own")
    g.add_argument("--min-resident-s", type=float, default=0.0,
                   help="elastic residency: an LLM stays resident at least this long after a wake (against "
                        "thrash; default: 0)")
    g = parser.add_argument_group("scheduler")
    g.add_argument("--schedule-approach", choices=list(POLICIES), default="adbs",
                   help="adbs (MuxServe), fcfs (temporal multiplexing), roundrobin, fix, fix-adbs (default: adbs)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="prompt tokens in one prefill job at most (default: 2048)")
    g.add_argument("--block-size", type=int, default=None,
                   help="tokens per KV page for the LLM with the widest K/V per token; sets the page size "
                        "(rounded up to a multiple of 64 B; default: 16 KiB pages, e.g. 32 tokens of "
                        "128-dim bf16, 51 of 80-dim bf16)")
    g.add_argument("--max-num-seqs", type=int, default=None,
                   help="sequences per LLM at most; overrides the config's instance-wide max_num_seqs")


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when available, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_instance_args(args: argparse.Namespace, config: MuxServeConfig, device: str, source: str,
                        dist_host: str = "127.0.0.1") -> None:
    """Refuse, before anything starts, what this version cannot run (ConfigError naming the value).

    ``dist_host``: where the tensor-parallel groups meet with ``--server-port`` (the launcher's ``--master-addr``)."""
    for m in config.models:
        if m.pipeline_parallel_size > 1:
            raise ConfigError(f"{source}: LLM {m.name!r} asks for pipeline_parallel_size {m.pipeline_parallel_size}; "
                              "pipeline parallelism is not supported: use tensor_parallel_size (a mesh of up to 8 "
                              "GPUs of one node) instead")
        if m.tensor_parallel_size > 1:
            try:
                check_tensor_parallel(ModelSpec.from_folder(resolve_model(m.model)), m.tensor_parallel_size)
            except ValueError as e:
                raise ConfigError(f"{source}: LLM {m.name!r}: {e}") from None
    if args.mps_dir and device != "cuda":
        raise ConfigError("--mps-dir needs a CUDA device (MPS partitions GPU SMs)")
    if args.max_num_batched_tokens < 1:
        raise ConfigError(f"--max-num-batched-tokens must be >= 1, got {args.max_num_batched_tokens}")
    if args.max_num_seqs is not None and args.max_num_seqs < 1:
        raise ConfigError(f"--max-num-seqs must be >= 1, got {args.max_num_seqs}")
    if args.max_runtime_restarts < 0:
        raise ConfigError(f"--max-runtime-restarts must be >= 0, got {args.max_runtime_restarts}")
    if args.restart_backoff < 0:
        raise ConfigError(f"--restart-backoff must be >= 0, got {args.restart_backoff}")
    if args.offload_idle_s is not None and args.offload_idle_s < 0:
        raise ConfigError(f"--offload-idle-s must be >= 0, got {args.offload_idle_s}")
    if args.min_resident_s < 0:
        raise ConfigError(f"--min-resident-s must be >= 0, got {args.min_resident_s}")
    elastic = any(m.residency == "elastic" for m in config.models)
    if args.offload_idle_s is not None and not elastic:
        raise ConfigError(f"--offload-idle-s: no LLM of {source} has 'residency: elastic', so none can be offloaded")
    if elastic and args.block_size is not None:
        page = page_bytes_for(config, args.block_size)
        if ELASTIC_GRANULE % page:
            raise ConfigError(f"--block-size {args.block_size} gives pages of {page} B, which do not divide the "
                              f"{ELASTIC_GRANULE >> 20} MiB granule that an elastic LLM's memory budget maps: choose "
                              f"a block size whose page is a power of two, or leave --block-size out")
    if config.memory_budget_bytes is not None:
        check_memory_budget(config, page_bytes_for(config, args.block_size), ELASTIC_GRANULE, source)
    if args.flexstore_port is not None:
        if not 1 <= args.flexstore_port <= 65535:
            raise ConfigError(f"--flexstore-port must be a TCP port (1-65535), got {args.flexstore_port}")
        check_port_free("--flexstore-port", "127.0.0.1", args.flexstore_port)
    groups = 2 * sum(m.tensor_parallel_size > 1 for m in config.models)
    server_port = args.server_port
    if groups and server_port is not None:
        if not 1 <= server_port <= 65536 - groups:
            raise ConfigError(f"--server-port {server_port}: the {groups} tensor-parallel groups need ports "
                              f"{server_port}..{server_port + groups - 1}")
        for port in range(server_port, server_port + groups):
            check_port_free("--server-port", dist_host, port)


def check_port_free(flag: str, host: str, port: int) -> None:
    """ConfigError naming ``flag`` when something already listens on ``host:port``.

    Binds as the listeners will (SO_REUSEADDR: connections of a past run in TIME_WAIT do not count).
    An address that is not this host's cannot be checked here and is left to the rendezvous.
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"{flag}: port {port} of {host} is already in use (another instance?); choose "
                                  f"a free port, or leave {flag} out to use the instance's private directory") from None
            if e.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                raise ConfigError(f"{flag}: cannot use port {port} of {host}: {e.strerror}") from None


ELASTIC_GRANULE = 2 * 1024 * 1024  # InstanceOptions.granule_bytes: what the budget maps at a time
PAGE_ALIGN = 64  # FlexStore's page sizes are multiples of 64 bytes (FlexStoreConfig checks it)


def page_bytes_for(config: MuxServeConfig, block_size: int | None) -> int:
    """16 KiB by default; with --block-size, the page that holds that many tokens of the widest LLM.

    The widest LLM is the one whose token of K+V (of one layer and kv-head) takes the most bytes;
    its page is rounded up to a multiple of 64 bytes, which still holds exactly ``block_size`` of
    its tokens whenever one token takes at least 64 bytes (narrower LLMs hold more per page, and
    any remainder of a page is unused).
    """
    specs = {m.name: (ModelSpec.from_folder(resolve_model(m.model)), parse_dtype(m.torch_dtype_name))
             for m in config.models}
    if block_size is None:
        page = DEFAULT_PAGE_BYTES
    else:
        if block_size < 1:
            raise ConfigError(f"--block-size must be >= 1, got {block_size}")
        widest = max(2 * spec.head_dim * dtype.itemsize for spec, dtype in specs.values())
        page = -(-block_size * widest // PAGE_ALIGN) * PAGE_ALIGN
        if config.kv_cache_bytes is not None and page > config.kv_cache_bytes:
            raise ConfigError(f"--block-size {block_size} makes pages of {page} B, more than the whole KV pool "
                              f"(kv_cache_bytes {config.kv_cache_bytes})")
    for name, (spec, dtype) in specs.items():
        try:
            KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, dtype, page)
        except ValueError as e:
            raise ConfigError(f"LLM {name!r}: {e}") from None
    return page


def planned_max_tokens(config: MuxServeConfig, page_bytes: int, device: str) -> dict[str, int] | None:
    """Tokens one request of each LLM can hold with the whole pool, known before start on CPU."""
    if config.memory_budget_bytes is not None or (config.kv_cache_bytes is None and device != "cpu"):
        return None  # sized by FlexStore at start (from the GPU's memory, or from the memory budget)
    pages = (config.kv_cache_bytes or DEFAULT_CPU_KV_BYTES) // page_bytes
    out = {}
    for m in config.models:
        spec = ModelSpec.from_folder(resolve_model(m.model))
        # A tensor-parallel rank holds num_kv_heads / tp heads; every rank's device has the same pool.
        layout = KVLayout(spec.num_layers, spec.num_kv_heads // m.tensor_parallel_size, spec.head_dim,
                          parse_dtype(m.torch_dtype_name), page_bytes)
        out[m.name] = pages // layout.pages_per_block * layout.page_tokens
    return out


def instance_options(args: argparse.Namespace, config: MuxServeConfig, device: str,
                     rates: dict[str, float] | None = None, avg_seq_len: int | None = None,
                     dist_host: str = "127.0.0.1") -> InstanceOptions:
    """InstanceOptions from the shared flags; ``rates``/``avg_seq_len`` size the initial ADBS quotas;
    ``dist_host`` as for ``check_instance_args``."""
    extra = {} if avg_seq_len is None else {"avg_seq_len": avg_seq_len}
    return InstanceOptions(
        policy=get_policy(args.schedule_approach), device=device,
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
        page_bytes=page_bytes_for(config, args.block_size), mps_dir=args.mps_dir,
        flexstore_address=None if args.flexstore_port is None else f"tcp://127.0.0.1:{args.flexstore_port}",
        log_dir=Path(args.log_dir), rates=dict(rates or {}), enforce_eager=args.enforce_eager,
        dist_host=dist_host, dist_base_port=args.server_port,
        restart=RestartPolicy(args.max_runtime_restarts, args.restart_backoff),
        offload_idle_s=args.offload_idle_s, min_resident_s=args.min_resident_s, **extra,
    )


class Terminated(BaseException):
    """SIGTERM arrived: unwind like Ctrl-C (stopping the instance on the way), exit 128 + 15."""


def _sigterm(signum, _frame):
    raise Terminated(f"signal {signum}")


def run_instance_command(body: Callable[[], int], usage_errors: tuple[type[BaseException], ...]) -> int:
    """Run a command that drives an Instance and map its failures to exit codes.

    2: bad input (``usage_errors``), 1: a process of the instance died or failed,
    130: Ctrl-C, 143: SIGTERM. In every case the instance has stopped what it started.
    """
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        return body()
    except usage_errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ChildDied, RuntimeError, TimeoutError) as e:
        print(f"error: {e}; every process of the instance was stopped", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; every process of the instance was stopped", file=sys.stderr)
        return 128 + signal.SIGINT
    except Terminated:
        print("terminated (SIGTERM); every process of the instance was stopped", file=sys.stderr)
        return 128 + signal.SIGTERM
