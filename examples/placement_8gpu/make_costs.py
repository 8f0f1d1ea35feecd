"""Write an ESTIMATED single-GPU H100 cost table for the shapes of this example.

Nothing here is measured on an H100. The table scales the one measured on an H200 for the
Llama-3-8B shape (``benchmark/results/end_to_end/mps_sweep_llama-3-8b.json``: SM 30..100 %, batch 1,
8, 32, 128, length 128 and 512, bf16) to each shape:

    prefill_m = prefill_8b * F_m / F_8b                          (compute bound; H100 and H200 have
                                                                  the same bf16 peak)
    decode_m  = decode_8b * (W_m + b*l*K_m) / (W_8b + b*l*K_8b) * 4.8 / 3.35
                                                                 (memory bound: bytes read per step,
                                                                  H200 / H100 HBM bandwidth)

with F the parameters that do work per token (all but the input embedding), W the weight bytes,
K the KV bytes per token, b the batch and l the length of the cell. Cells the H200 could not run
stay -1. Only ``num_gpus`` 1 is written; the placement estimates bigger meshes with --estimate-tp.
Replace this table with a profiled one (python -m muxserve.muxsched.profile on the H100s) when
you have the machine.

    python examples/placement_8gpu/make_costs.py --output examples/placement_8gpu/h100_estimated_costs.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from muxserve.engine.model_config import ModelSpec
from muxserve.placement.llms import model_facts

REPO = Path(__file__).resolve().parents[2]
MEASURED = REPO / "benchmark/results/end_to_end/mps_sweep_llama-3-8b.json"
SHAPES = ["llama-3-8b", "qwen2.5-7b", "qwen2.5-14b", "yi-34b", "llama-3-70b",
          "llama-2-7b", "llama-2-13b", "codellama-34b"]
H200_OVER_H100_BANDWIDTH = 4.8 / 3.35  # TB/s, HBM3e vs HBM3 (SXM)
DTYPE_BYTES = 2  # bf16


def facts(shape: str) -> tuple[float, float, float]:
    """(parameters that compute per token, weight bytes, KV bytes per token) of a shape."""
    folder = REPO / "examples/shapes" / shape
    params, kv_elems = model_facts(str(folder))
    spec = ModelSpec.from_folder(folder)
    return params - spec.vocab_size * spec.hidden_size, params * DTYPE_BYTES, kv_elems * DTYPE_BYTES


def scaled(measured: dict, base: str, shape: str) -> dict:
    f0, w0, k0 = facts(base)
    f, w, k = facts(shape)
    out: dict = {}
    for ngpu, by_sm in measured.items():
        for sm, rows in by_sm.items():
            for bs, cells in rows.items():
                for sl, c in cells.items():
                    tokens = int(bs) * int(sl)
                    pre = c["prefill"] * f / f0 if c["prefill"] >= 0 else -1
                    dec = (c["decoding"] * (w + tokens * k) / (w0 + tokens * k0) * H200_OVER_H100_BANDWIDTH
                           if c["decoding"] >= 0 else -1)
                    out.setdefault(ngpu, {}).setdefault(sm, {}).setdefault(bs, {})[sl] = {
                        "prefill": round(pre, 4) if pre >= 0 else -1, "decoding": round(dec, 4) if dec >= 0 else -1}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True)
    args = p.parse_args()
    measured = json.loads(MEASURED.read_text())["llama-3-8b"]
    table = {"_meta": {
        "estimated": True,
        "device": "NVIDIA H100 80GB (SXM), bf16, num_gpus 1",
        "how": "scaled from the H200 measurement of the Llama-3-8B shape "
               f"({MEASURED.relative_to(REPO)}) by compute (prefill) and bytes read per step (decode); "
               "not measured on an H100. Made by examples/placement_8gpu/make_costs.py",
    }}
    for shape in SHAPES:
        table[shape] = scaled(measured, "llama-3-8b", shape)
    Path(args.output).write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {args.output}: {', '.join(SHAPES)} (estimated)")


if __name__ == "__main__":
    main()
