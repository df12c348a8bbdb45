python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
timeout 200 python3 -m pytest -q -x tests/kernels 2>&1 | tail -15
timeout 200 python3 benchmarks/gpu_moe.py --out $OUT 2>&1 | grep -v Warning | tail -60
timeout 240 python3 benchmarks/gpu_linear.py --no-sweep --out $OUT 2>&1 | grep -v Warning | tail -100
