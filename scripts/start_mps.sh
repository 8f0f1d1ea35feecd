#!/usr/bin/env bash
# Start the NVIDIA MPS control daemon with its pipe and log directories under DIR:
#   bash scripts/start_mps.sh DIR        ->  DIR/nvidia-mps, DIR/nvidia-log
# Then pass --mps-dir DIR to python -m muxserve.launch / muxserve.serve. Runs as root (no sudo needed
# when you are root; otherwise run the script itself with sudo).
set -euo pipefail
if [ $# -ne 1 ]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
dir=$(realpath -m "$1")
here=$(dirname "$0")
ctl=$("$here/find_mps_control.sh")
mkdir -p "$dir/nvidia-mps" "$dir/nvidia-log"
export CUDA_MPS_PIPE_DIRECTORY="$dir/nvidia-mps"
export CUDA_MPS_LOG_DIRECTORY="$dir/nvidia-log"
if [ -S "$dir/nvidia-mps/control" ] && echo get_server_list | "$ctl" >/dev/null 2>&1; then
    echo "MPS is already running with pipe directory $dir/nvidia-mps"
    exit 0
fi
"$ctl" -d
for _ in $(seq 50); do
    [ -S "$dir/nvidia-mps/control" ] && break
    sleep 0.1
done
if [ ! -S "$dir/nvidia-mps/control" ]; then
    echo "error: the MPS daemon did not start; see $dir/nvidia-log/control.log" >&2
    exit 1
fi
echo "MPS started: pipe $dir/nvidia-mps, log $dir/nvidia-log"
