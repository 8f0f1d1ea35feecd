#!/usr/bin/env bash
# Stop the MPS control daemon started by scripts/start_mps.sh DIR.
set -euo pipefail
if [ $# -ne 1 ]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
dir=$(realpath -m "$1")
here=$(dirname "$0")
ctl=$("$here/find_mps_control.sh")
export CUDA_MPS_PIPE_DIRECTORY="$dir/nvidia-mps"
export CUDA_MPS_LOG_DIRECTORY="$dir/nvidia-log"
if [ ! -S "$dir/nvidia-mps/control" ]; then
    echo "no MPS daemon is running with pipe directory $dir/nvidia-mps"
    exit 0
fi
if ! out=$(echo quit | "$ctl" 2>&1); then
    if [[ "$out" == *"Cannot find MPS control daemon"* ]]; then
        # The daemon died without removing its pipe: clear the leftovers so a new one can start.
        rm -rf "$dir/nvidia-mps"
        echo "no MPS daemon was running with pipe directory $dir/nvidia-mps (removed its stale pipe)"
        exit 0
    fi
    echo "$out" >&2
    exit 1
fi
for _ in $(seq 50); do
    [ -S "$dir/nvidia-mps/control" ] || break
    sleep 0.1
done
echo "MPS stopped ($dir)"
