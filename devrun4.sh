python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl-mo/*.whl && export PYTHONPATH=/tmp/site:$PWD STEPQUANT_SHARED=$PWD/.shared || exit
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
mkdir -p /tmp/m && timeout 400 python3 benchmarks/vs_modelopt.py /tmp/m > $OUT/vs_modelopt.json 2> $OUT/vs_modelopt.err; echo rc $?; date -u
python3 - $OUT/vs_modelopt.json <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for t in ("modelopt", "stepquant"):
    if "error" in r[t]:
        print(t, r[t]["error"][-2000:]); continue
    for i, run in enumerate(r[t]):
        print(t, i, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in run.items()})
print("first", r.get("first_run"), "second", r.get("second_run"))
c = r.get("comparison", {})
print({k: c.get(k) for k in ("same_names", "tensors", "differ", "explained_by_cuda_division", "hf_quant_config_equal")})
PY
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels tests/test_convert.py tests/test_shards.py tests/test_layerwise.py tests/test_calibrate.py 2>&1 | tail -2; date -u
