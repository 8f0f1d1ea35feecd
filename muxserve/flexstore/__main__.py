"""``python -m muxserve.flexstore``: one FlexStore process (weights, KV pool, page allocator)."""

from __future__ import annotations

import argparse
import logging
import re
import sys

import msgspec

from muxserve.flexstore.auth import SECRET_ENV, load_secret_file, secret_from_env
from muxserve.flexstore.config import FlexStoreConfig, parse_model_arg

_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_bytes(text: str) -> int:
    """``536870912``, ``512MiB``, ``2GiB``, ``1.5GB`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 536870912, 512MiB or 2GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m muxserve.flexstore",
        description="FlexStore: load every model's weights once, allocate one head-wise paged KV pool, "
                    "and serve page allocations and zero-copy attach handles over ZeroMQ.",
        epilog="Every client must present the secret: FlexStoreClient(address, secret=...). "
               "example: python -m muxserve.flexstore --model llm-0=smollm2-135m --model llm-1=/models/qwen:bfloat16 "
               "--address ipc:///tmp/mux/flexstore --secret-file ~/.muxserve-secret --kv-cache-bytes 1GiB")
    p.add_argument("--model", action="append", default=[], metavar="NAME=MODEL[:DTYPE]",
                   help="a model to serve (repeat): a short name, HF folder or .gguf file; "
                        "'random:FOLDER' fills random weights from FOLDER/config.json")
    p.add_argument("--dtype", default="float32", help="dtype of models that name none (default: float32)")
    p.add_argument("--address", help="ZeroMQ endpoint to bind, e.g. tcp://127.0.0.1:50051 or ipc:///tmp/flexstore")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--kv-cache-bytes", type=parse_bytes, default=None,
                   help="KV pool size (default: 512MiB on CPU; gpu-memory-utilization x total memory on GPU)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                   help="fraction of the GPU's total memory for the KV pool (default: 0.5)")
    p.add_argument("--page-bytes", type=int, default=16384, help="bytes per KV page (default: 16384)")
    p.add_argument("--shm-prefix", default="muxserve", help="prefix of shared-memory names (default: muxserve)")
    p.add_argument("--secret-file", metavar="PATH",
                   help="file holding the secret that clients must present; if it does not exist, a new random "
                        "secret is written there (mode 0600). Default: the environment variable "
                        f"{SECRET_ENV}")
    p.add_argument("--config-json", help="the whole FlexStoreConfig as JSON (replaces the options above)")
    p.add_argument("--exit-with-parent", action="store_true", help="shut down when the parent process dies")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def config_from_args(args: argparse.Namespace) -> FlexStoreConfig:
    if args.config_json:
        return msgspec.json.decode(args.config_json, type=FlexStoreConfig)
    if not args.model or not args.address:
        raise ValueError("give --model (at least one) and --address, or --config-json")
    return FlexStoreConfig(models=tuple(parse_model_arg(m, args.dtype) for m in args.model), address=args.address,
                           device=args.device, kv_cache_bytes=args.kv_cache_bytes,
                           gpu_memory_utilization=args.gpu_memory_utilization, page_bytes=args.page_bytes,
                           shm_prefix=args.shm_prefix)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s flexstore: %(message)s")
    try:
        config = config_from_args(args)
        secret = load_secret_file(args.secret_file) if args.secret_file else secret_from_env()
    except (ValueError, msgspec.ValidationError) as exc:
        parser.error(str(exc))
    if secret is None:
        parser.error(f"give --secret-file PATH (a new secret is written there if it does not exist) or set "
                     f"{SECRET_ENV}: every client must present it")
    from muxserve.flexstore.server import AddressInUse, run

    try:
        run(config, secret, exit_with_parent=args.exit_with_parent)
    except AddressInUse as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
