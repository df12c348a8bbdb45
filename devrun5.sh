python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD STEPQUANT_SHARED=$PWD/.shared || exit
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
mkdir -p /tmp/w && timeout 190 python3 benchmarks/layerwise.py /tmp/w --layers 4 --experts 96 --cleanup > $OUT/layerwise.json 2> $OUT/layerwise.err; echo rc $?; tail -c 300 $OUT/layerwise.err; date -u
python3 -c "
import json; r = json.load(open('$OUT/layerwise.json'))
print({k: v for k, v in r.items() if k not in ('per_layer',)})"
