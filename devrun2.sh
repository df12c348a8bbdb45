python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl-mo/*.whl && export PYTHONPATH=/tmp/site:$PWD STEPQUANT_SHARED=$PWD/.shared || exit
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
summary() { python3 - "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for t in ("modelopt", "stepquant"):
    print(t, {k: v for k, v in r[t].items() if k != "error"} if "error" not in r[t] else r[t]["error"][-1500:])
print("ratios", r.get("wall_ratio"), r.get("peak_gpu_ratio"))
c = r.get("comparison", {})
print({k: c.get(k) for k in ("same_names", "tensors", "differ", "explained_by_cuda_division", "hf_quant_config_equal")})
PY
}
mkdir -p /tmp/m && timeout 200 python3 benchmarks/vs_modelopt.py /tmp/m > $OUT/vs_modelopt.json 2> $OUT/vs_modelopt.err; echo rc $?; date -u
summary $OUT/vs_modelopt.json
rm -rf /tmp/m
mkdir -p /tmp/w && timeout 330 python3 benchmarks/layerwise.py /tmp/w --layers 8 --experts 96 --cleanup > $OUT/layerwise.json 2> $OUT/layerwise.err; echo rc $?; tail -c 300 $OUT/layerwise.err; date -u
python3 -c "
import json; r = json.load(open('$OUT/layerwise.json'))
print({k: v for k, v in r.items() if k not in ('per_layer',)})"
