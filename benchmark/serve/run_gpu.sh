#!/usr/bin/env bash
# The OpenAI-compatible server on one GPU, driven by bench_serve.py: the basic GPU example
# (three random-weight LLMs, 1B/3B/8B shapes, bf16) replaying
# benchmark/launch/sharegpt_n3_rate_8_4_2_30s.json, once without MPS (temporal multiplexing,
# fcfs) and once under MPS (MuxServe, adbs). Results, bench output, server logs and a final
# /metrics page of each run go to OUT.
#   bash benchmark/serve/run_gpu.sh OUT
# The GPU machine lacks fastapi, uvicorn, prometheus-client, pyzmq and msgspec: carry their wheels
# (pip download fastapi==0.163.2 uvicorn==0.54.0 prometheus-client==0.26.0 pyzmq msgspec
#  --python-version 3.12 --only-binary=:all: --platform manylinux_2_28_x86_64 -d .whl) and
# install them there first: pip install --no-index --find-links .whl fastapi uvicorn prometheus-client pyzmq msgspec
set -uo pipefail
out=${1:?usage: $0 OUT}
mkdir -p "$out"
cfg=examples/basic/model_config_gpu.yaml
wl=benchmark/launch/sharegpt_n3_rate_8_4_2_30s.json
port=8000
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$out/device.txt"

wait_healthy() {  # pid
    python - "$1" "$port" <<'PY'
import sys, time, os, urllib.request
pid, port = int(sys.argv[1]), sys.argv[2]
for _ in range(1200):
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(1)
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.5)
sys.exit(1)
PY
}

run() {  # name, server flags...
    local name=$1; shift
    python -m muxserve.serve "$cfg" --port $port --no-access-log --log-dir "/tmp/logs_$name" "$@" \
        > "$out/serve_gpu_$name.server.log" 2>&1 &
    local pid=$!
    if wait_healthy $pid; then
        python -m benchmark.serve.bench_serve --base-url "http://127.0.0.1:$port" --workload-file "$wl" \
            --result-file "$out/serve_gpu_$name.json.gz" > "$out/serve_gpu_$name.log" 2>&1
        echo "$name bench exit $?"
        python -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$port/metrics').read().decode())" \
            > "$out/serve_gpu_$name.metrics.txt"
    else
        echo "$name: server did not come up"; tail -20 "$out/serve_gpu_$name.server.log"
    fi
    kill -TERM $pid; wait $pid; echo "$name server exit $?"
    ls /dev/shm | grep -c "^muxserve$pid" || true
}

run temporal_fcfs --schedule-approach fcfs
bash scripts/start_mps.sh /tmp/mps
run mps_adbs --schedule-approach adbs --mps-dir /tmp/mps
bash scripts/stop_mps.sh /tmp/mps
