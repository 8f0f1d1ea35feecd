"""Decode and prefill latency of one model under MPS at 30 ... 100 % active threads (paper Fig. 3).

    python -m benchmark.end_to_end.mps_sweep                      # GPU: Llama-3-8B shape, bf16, MPS started here
    python -m benchmark.end_to_end.mps_sweep --from-table T.json  # only the table and plot of a cost table

Runs the cost profiler (``python -m muxserve.muxsched.profile --mps-dir D --sm-percentages ...``:
one child process per percentage, started with ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``) on a grid
of batch sizes and sequence lengths, then writes into ``--output-dir``:

* ``mps_sweep_<key>.json``: the cost table (ms per prefill step / decode step);
* ``mps_sweep_<key>.png``: prefill and decode latency vs SM percentage, one line per (batch,
  length), and the same relative to 100 %;
* ``mps_sweep_<key>.md``: the table with the slowdown at each percentage, device and command.

The paper's observation is that a decode step barely slows down with fewer SMs (it is bound by
memory bandwidth) while prefill slows down in proportion. MPS is started with
scripts/start_mps.sh and stopped on exit (``--no-start-mps`` when it already runs). Without CUDA
(or with ``--device cpu``) only 100 % can be measured, which checks the pipeline.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from benchmark.end_to_end.e2e_common import REPO, BenchError, device_info, read_json
from benchmark.end_to_end.e2e_plan import model_ref
from benchmark.end_to_end.e2e_runs import MPSControl

DEFAULT_OUT = "benchmark/results/end_to_end"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmark.end_to_end.mps_sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="examples/shapes/llama-3-8b",
                   help="model (folder with config.json only -> random weights; default: the Llama-3-8B shape)")
    p.add_argument("--key", default=None, help="name in the table and the file names (default: the folder's name)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda (default) or cpu (100 %% only: checks the pipeline)")
    p.add_argument("--dtype", default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--sm-percentages", default="30,40,50,60,70,80,90,100", help="active thread percentages (cuda)")
    p.add_argument("--batch-sizes", default="1,8,32,128", help="batch sizes (default: 1,8,32,128)")
    p.add_argument("--seq-lens", default="128,512", help="sequence lengths (default: 128,512)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per cell (median kept; default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per cell (default: 2)")
    p.add_argument("--mps-dir", default="/tmp/muxserve-e2e-mps", help="MPS folder (default: /tmp/muxserve-e2e-mps)")
    p.add_argument("--no-start-mps", action="store_true", help="MPS already runs in --mps-dir: do not start or stop it")
    p.add_argument("--output-dir", default=DEFAULT_OUT, help=f"default: {DEFAULT_OUT}")
    p.add_argument("--from-table", default=None, help="skip profiling: plot this cost table")
    p.add_argument("--overwrite", action="store_true", help="measure again even if the table exists")
    return p.parse_args(argv)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def sweep_rows(table: dict, key: str) -> tuple[list[int], list[dict]]:
    """(SM percentages, rows): one row per (phase, batch, length) with ms and slowdown vs 100 % per percentage."""
    by_sm = table[key]["1"]
    sms = sorted(int(s) for s in by_sm)
    top = str(max(sms))
    rows = []
    for phase in ("decoding", "prefill"):
        for bs in sorted(by_sm[top], key=int):
            for sl in sorted(by_sm[top][bs], key=int):
                ms = {sm: by_sm[str(sm)].get(bs, {}).get(sl, {}).get(phase, -1) for sm in sms}
                ref = ms[max(sms)]
                if ref is None or ref <= 0:
                    continue
                rows.append({"phase": phase, "batch_size": int(bs), "seq_len": int(sl), "ms": ms,
                             "slowdown": {sm: (v / ref if v and v > 0 else None) for sm, v in ms.items()}})
    return sms, rows


def write_markdown(path: Path, key: str, sms: list[int], rows: list[dict], command: str | None, device: dict) -> None:
    lines = [f"# {key}: prefill and decode latency under MPS", "",
             f"- device: {'; '.join(device.get('nvidia_smi', [])) or device.get('device')}; torch "
             f"{device.get('torch', '?')}, triton {device.get('triton', '-')}, "
             f"commit {device.get('muxserve_commit', '?')}"]
    if command:
        lines.append(f"- command: `{command}`")
    lines += ["- cells: median ms of one prefill step (batch x length prompt tokens) or one decode step (batch "
              "sequences holding length tokens); in brackets the slowdown vs 100 %", "",
              "| phase | batch | length | " + " | ".join(f"{sm} %" for sm in sms) + " |",
              "|---|---:|---:|" + "---:|" * len(sms)]
    for r in rows:
        cells = [f"{r['ms'][sm]:.2f} ({r['slowdown'][sm]:.2f}x)" if r["slowdown"][sm] else "-" for sm in sms]
        lines.append(f"| {r['phase']} | {r['batch_size']} | {r['seq_len']} | " + " | ".join(cells) + " |")
    if len(sms) > 1:
        low = min(sms)
        for phase in ("decoding", "prefill"):
            vals = [r["slowdown"][low] for r in rows if r["phase"] == phase and r["slowdown"][low]]
            if vals:
                lines.append(f"\nAt {low} % of the SMs, {phase} is {min(vals):.2f}x-{max(vals):.2f}x slower than at "
                             f"{max(sms)} % (over the cells above).")
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, key: str, sms: list[int], rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), squeeze=False)
    for j, phase in enumerate(("prefill", "decoding")):
        for r in (r for r in rows if r["phase"] == phase):
            xs = [sm for sm in sms if r["slowdown"][sm]]
            label = f"bs {r['batch_size']}, len {r['seq_len']}"
            axes[0][j].plot(xs, [r["ms"][sm] for sm in xs], marker="o", markersize=3, label=label)
            axes[1][j].plot(xs, [r["slowdown"][sm] for sm in xs], marker="o", markersize=3, label=label)
        axes[0][j].set_title(f"{key}: {'decode step' if phase == 'decoding' else 'prefill step'}")
        axes[0][j].set_ylabel("latency (ms)")
        axes[0][j].set_yscale("log")
        axes[1][j].set_ylabel("slowdown vs 100 %")
        axes[1][j].axhline(1.0, color="gray", linestyle=":")
        for i in range(2):
            axes[i][j].set_xlabel("active thread percentage (MPS)")
            axes[i][j].grid(alpha=0.3, which="both")
        axes[0][j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not args.from_table and not _cuda_available():
        # Measuring would fail in the profiler; re-plotting the stored table would overwrite the
        # GPU results' notes with this machine's description.
        print("error: --device cuda needs a CUDA GPU (none is visible); --device cpu checks the pipeline at "
              "100 %, --from-table re-plots a cost table", file=sys.stderr)
        return 2
    out = (REPO / args.output_dir if args.output_dir == DEFAULT_OUT else Path(args.output_dir)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = None
    try:
        if args.from_table:
            table = read_json(args.from_table)
            key = args.key or next(iter(table))
        else:
            model, load_format = model_ref(args.model)
            key = args.key or Path(model).name
            table_path = out / f"mps_sweep_{key}.json"
            dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
            sms = args.sm_percentages if args.device == "cuda" else "100"
            cmd = [sys.executable, "-m", "muxserve.muxsched.profile",
                   "--model", f"{key}={'random:' if load_format == 'random' else ''}{model}", "--device", args.device,
                   "--dtype", dtype, "--sm-percentages", sms, "--batch-sizes", args.batch_sizes,
                   "--seq-lens", args.seq_lens, "--repeats", str(args.repeats), "--warmup", str(args.warmup),
                   "--output", str(table_path), "--overwrite"]
            mps = MPSControl(Path(args.mps_dir).resolve(), enabled=args.device == "cuda" and not args.no_start_mps)
            if args.device == "cuda" and sms != "100":
                cmd += ["--mps-dir", str(Path(args.mps_dir).resolve())]
            command = shlex.join(["python", *cmd[1:]])
            if args.overwrite or not table_path.exists():
                print(command, flush=True)
                try:
                    mps.ensure(args.device == "cuda" and sms != "100")
                    done = subprocess.run(cmd, cwd=REPO)
                finally:
                    mps.stop()
                if done.returncode != 0:
                    raise BenchError(f"the profiler failed (exit {done.returncode})")
            table = read_json(table_path)
        sms_list, rows = sweep_rows(table, key)
        if not rows:
            raise BenchError(f"the table has no measured cell for {key}")
        write_markdown(out / f"mps_sweep_{key}.md", key, sms_list, rows, command,
                       device_info(args.device) if not args.from_table else {"device": "from " + str(args.from_table)})
        try:
            plot(out / f"mps_sweep_{key}.png", key, sms_list, rows)
        except ImportError:  # the GPU machine may lack matplotlib: plot later with --from-table
            print(f"matplotlib is missing: no plot; later: python -m benchmark.end_to_end.mps_sweep --from-table "
                  f"{out / f'mps_sweep_{key}.json'}", flush=True)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out / f'mps_sweep_{key}.md'} and .png ({len(rows)} rows, SM % {sms_list})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
