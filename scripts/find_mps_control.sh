#!/usr/bin/env bash
# Print the path of nvidia-cuda-mps-control: from PATH or the usual driver folders; fail clearly if absent.
for candidate in "$(command -v nvidia-cuda-mps-control 2>/dev/null || true)" \
        /usr/bin/nvidia-cuda-mps-control /usr/local/nvidia/bin/nvidia-cuda-mps-control \
        /usr/local/cuda/bin/nvidia-cuda-mps-control /usr/lib/nvidia/bin/nvidia-cuda-mps-control; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then
        echo "$candidate"
        exit 0
    fi
done
echo "error: nvidia-cuda-mps-control not found (no NVIDIA driver with MPS on this machine); run without --mps-dir" >&2
exit 1
