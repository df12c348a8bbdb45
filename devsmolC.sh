python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
timeout 200 python3 benchmarks/smollm2.py throughput --dir /tmp/sm --device cuda --json $OUT/smol_tps.json 2>&1 | grep -v "Loading\|it/s" | tail -25
