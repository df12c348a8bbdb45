python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
mkdir -p /tmp/gg && cat /tmp/smolparts/part_aa .smol_b/part_ab > /tmp/gg/SmolLM2-135M-Instruct.Q4_1.gguf && sha256sum /tmp/gg/*.gguf
S=benchmarks/smollm2.py
timeout 60 python3 $S prepare --out /tmp/sm --gguf /tmp/gg/SmolLM2-135M-Instruct.Q4_1.gguf 2>&1 | tail -1
timeout 150 python3 $S layers --dir /tmp/sm 2>&1 | grep -v "Loading\|it/s" | tail -5
timeout 200 python3 $S throughput --dir /tmp/sm --device cuda --json $OUT/smol_tps.json 2>&1 | grep -v "Loading\|it/s" | tail -25
