#!/usr/bin/env bash
# The basic example on one GPU: three random-weight LLMs (1B, 3B, 8B shapes, bf16) replaying
# benchmark/launch/sharegpt_n3_rate_8_4_2_30s.json, once without MPS (temporal multiplexing,
# fcfs) and once under MPS (MuxServe, adbs). Stats and the stdout of each run go to OUT.
#   bash benchmark/launch/run_gpu.sh OUT
set -uo pipefail
out=${1:?usage: $0 OUT}
mkdir -p "$out"
cfg=examples/basic/model_config_gpu.yaml
wl=benchmark/launch/sharegpt_n3_rate_8_4_2_30s.json
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$out/device.txt"

python -m muxserve.launch "$cfg" --workload-file "$wl" --schedule-approach fcfs \
    --log-dir /tmp/logs_temporal --stats-file "$out/launch_gpu_temporal_fcfs.json.gz" \
    > "$out/launch_gpu_temporal_fcfs.log" 2>&1
echo "temporal exit $?"; tail -3 /tmp/logs_temporal/*.log | grep -i -B2 error || true

bash scripts/start_mps.sh /tmp/mps
python -m muxserve.launch "$cfg" --workload-file "$wl" --schedule-approach adbs --mps-dir /tmp/mps \
    --log-dir /tmp/logs_mps --stats-file "$out/launch_gpu_mps_adbs.json.gz" \
    > "$out/launch_gpu_mps_adbs.log" 2>&1
echo "muxserve exit $?"; tail -3 /tmp/logs_mps/*.log | grep -i -B2 error || true
bash scripts/stop_mps.sh /tmp/mps
