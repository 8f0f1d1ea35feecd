#!/usr/bin/env bash
# One device call of the end-to-end benchmark on a GPU machine (run from the repository root).
#   bash benchmark/end_to_end/run_gpu.sh OUT [--sweep] [run_end_to_end flags ...]
# Runs the grid of run_end_to_end.py (workloads prepared beforehand with --prepare-only and carried
# in benchmark/results/end_to_end/runs) with --device cuda, a time budget that ends the call before
# the device's 10-minute limit (E2E_BUDGET_S, default 480 s; runs left are resumed by the next call)
# from the script's start, and --max-drain-s 60 (E2E_DRAIN_S). --sweep first measures the MPS sweep
# (mps_sweep.py, a few minutes). The run folder is E2E_RUNS (default benchmark/results/end_to_end/runs):
# the one --prepare-only wrote, with the same workload flags.
# Into OUT: device.txt, the logs, e2e_runs.tgz (rewritten after every run, so it survives a killed
# call: the run folder without runtime logs and workloads; untar it into benchmark/results/end_to_end/
# here) and the sweep's files.
# Lanes: E2E_LANES (default auto) runs that many runs at a time, each on its own GPUs (--num-gpus of
# them), MPS daemon, ports and CPUs: on a 4-GPU host with single-GPU runs, 4 at once; on one GPU, 1
# (the runner without lanes). E2E_LANES=1 runs one at a time.
# E2E_SCRIPT=benchmark.chatlmsys.run_chatlmsys runs the ChatLMSYS pipeline instead.
set -uo pipefail
script=${E2E_SCRIPT:-benchmark.end_to_end.run_end_to_end}
runs=${E2E_RUNS:-benchmark/results/end_to_end/runs}
out=${1:?usage: $0 OUT [--sweep] [run_end_to_end.py flags]}
shift
mkdir -p "$out"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader > "$out/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
    >> "$out/device.txt" 2>&1
if [ "${1:-}" = "--sweep" ]; then
    shift
    PYTHONUNBUFFERED=1 python -m benchmark.end_to_end.mps_sweep --output-dir "$out" 2>&1 | tee "$out/mps_sweep.log"
fi
budget=$(( ${E2E_BUDGET_S:-480} - SECONDS ))  # the sweep's time counts against the same call
PYTHONUNBUFFERED=1 python -m "$script" --device cuda --output-dir "$runs" \
    --time-budget-s "$budget" --max-drain-s "${E2E_DRAIN_S:-60}" --lanes "${E2E_LANES:-auto}" \
    --export-tgz "$out/e2e_runs.tgz" "$@" 2>&1 \
    | tee "$out/run_end_to_end.log"
exit "${PIPESTATUS[0]}"
