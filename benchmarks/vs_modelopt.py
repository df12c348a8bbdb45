"""stepquant against NVIDIA ModelOpt on the same GPU, in one run (issue 8): a generated Qwen3-MoE
(hidden 2048, 8 layers, 64 experts x 768, top-8, 16/4 heads, vocab 32000; about 5.3 GB BF16), 128 x 512
calibration tokens, NVFP4 all-linear + FP8 KV cache. Each tool runs in its own process (ModelOpt patches
transformers on import) and converts twice: the first time after its modules are imported and CUDA is
initialized (the modules still imported inside the timed region are listed), the second warm. Wall time,
its parts and peak GPU memory are measured, then the two outputs are compared tensor by tensor as the
conformance test does.

Run: python benchmarks/vs_modelopt.py WORKDIR   (ModelOpt 0.47 importable)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPE = dict(hidden_size=2048, num_hidden_layers=8, num_experts=64, moe_intermediate_size=768, num_experts_per_tok=8,
             num_attention_heads=16, num_key_value_heads=4, head_dim=128, vocab_size=32000, intermediate_size=6144,
             decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=4096)  # fmt: skip
SAMPLES, SEQ_LEN, BATCH = 128, 512, 16
RUNS = 2  # per tool, in one process: the first after imports, the second warm


def generate(root: Path) -> None:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3MoeForCausalLM._from_config(Qwen3MoeConfig(**SHAPE), dtype=torch.bfloat16)
    model.save_pretrained(root / "bf16")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SHAPE["vocab_size"], (SAMPLES, SEQ_LEN), generator=g)
    (root / "calib.json").write_text(json.dumps({"batches": [b.tolist() for b in ids.split(BATCH)]}))


def run_modelopt(root: Path) -> list[dict]:
    import copy
    import shutil

    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM, Qwen3MoeForCausalLM  # noqa: F401 - both tools start imported

    batches = [torch.tensor(b) for b in json.loads((root / "calib.json").read_text())["batches"]]
    runs = []
    for _ in range(RUNS):
        shutil.rmtree(root / "modelopt", ignore_errors=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = set(sys.modules)
        t0 = time.time()
        model = AutoModelForCausalLM.from_pretrained(root / "bf16", dtype=torch.bfloat16, device_map="cuda").eval()
        t1 = time.time()
        cfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
        cfg["quant_cfg"] = list(cfg["quant_cfg"]) + list(mtq.FP8_KV_CFG["quant_cfg"])
        cfg["algorithm"] = "max"

        def forward_loop(m):
            with torch.no_grad():
                for ids in batches:
                    m(input_ids=ids.cuda())

        mtq.quantize(model, cfg, forward_loop)
        torch.cuda.synchronize()
        t2 = time.time()
        with torch.no_grad():
            export_hf_checkpoint(model, export_dir=root / "modelopt")
        t3 = time.time()
        runs.append({"wall_seconds": t3 - t0, "load_seconds": t1 - t0, "calibration_seconds": t2 - t1, "export_seconds": t3 - t2,
                     "peak_gpu_allocated": torch.cuda.max_memory_allocated(), "peak_gpu_reserved": torch.cuda.max_memory_reserved(),
                     "modules_imported_while_timed": _new_modules(before)})  # fmt: skip
        del model
        torch.cuda.empty_cache()
    return runs


def _new_modules(before: set) -> dict:
    new = sorted(set(sys.modules) - before)
    return {"count": len(new), "packages": sorted({".".join(m.split(".")[:2]) for m in new})[:30]}


def _timers() -> dict[str, float]:
    """Seconds spent in the main parts of a conversion (wrapping the library's functions; the shards are
    begun, experts and Linears quantized in the writer's thread while the calibration runs)."""
    from collections import defaultdict

    import stepquant.calibrate as cal
    import stepquant.convert as cv
    import stepquant.layerwise as lw
    import stepquant.quantize as q
    import stepquant.shards as sh

    spent: dict[str, float] = defaultdict(float)

    def wrap(owner, name: str) -> None:
        inner = getattr(owner, name)

        def timed(*a, **k):
            t0 = time.time()
            try:
                return inner(*a, **k)
            finally:
                spent[name] += time.time() - t0

        setattr(owner, name, timed)

    for owner, name in ((cv, "open_checkpoint"), (cv, "prepare"), (cal, "load_batches"), (lw, "build_meta_model"),
                        (lw.LayerLoader, "load"), (lw, "calibrate_layers"), (q.Executor, "quantize_experts"),
                        (q.Executor, "quantize_linear"), (sh._ShardFile, "begin"), (sh.ShardWriter, "finish")):  # fmt: skip
        wrap(owner, name)
    return spent


def _preload_stepquant() -> None:
    """What `convert` imports on its way (transformers' loading internals, the Triton kernels, the plotting
    library), imported before the timer as ModelOpt's modules are; and CUDA initialized, as for ModelOpt."""
    import matplotlib.figure  # noqa: F401
    import transformers.conversion_mapping  # noqa: F401
    import transformers.core_model_loading  # noqa: F401
    import transformers.modeling_utils  # noqa: F401

    import stepquant.distributed  # noqa: F401
    import stepquant.kernels.quantize  # noqa: F401
    import stepquant.layerwise  # noqa: F401

    torch.cuda.synchronize()


def run_stepquant(root: Path) -> list[dict]:
    from transformers import Qwen3MoeForCausalLM  # noqa: F401 - both tools start imported

    from stepquant.convert import ConvertOptions, convert

    _preload_stepquant()
    spent = _timers()
    runs = []
    for _ in range(RUNS):
        spent.clear()
        torch.cuda.reset_peak_memory_stats()
        before = set(sys.modules)
        t0 = time.time()
        out = convert(root / "bf16", root / "stepquant", ConvertOptions(
            to="nvfp4", scope="all-linear", kv_cache="fp8", moe_layout="per-expert", naming="keep",
            expert_input_scale="shared", calib_data=str(root / "calib.json"), device="cuda", overwrite=True))  # fmt: skip
        wall = time.time() - t0
        timings = json.loads((out / "stepquant.json").read_text())["timings"]
        runs.append({"wall_seconds": wall, "calibration_seconds": timings["calibration_seconds"],
                     "after_calibration_seconds": wall - timings["calibration_seconds"],
                     "peak_gpu_allocated": torch.cuda.max_memory_allocated(), "peak_gpu_reserved": torch.cuda.max_memory_reserved(),
                     "seconds_in": {k: round(v, 2) for k, v in spent.items()},
                     "modules_imported_while_timed": _new_modules(before)})  # fmt: skip
    return runs


def compare(ours: Path, ref: Path) -> dict:
    """Names, dtypes, shapes; weights and weight scales bit for bit; activation scales' largest relative gap."""
    from safetensors.torch import load_file

    def load(folder: Path) -> dict:
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

    a, b = load(ours), load(ref)
    out = {"same_names": sorted(a) == sorted(b), "only_ours": sorted(set(a) - set(b))[:5], "only_modelopt": sorted(set(b) - set(a))[:5]}
    bits_differ, worst = [], {}
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if (x.dtype, x.shape) != (y.dtype, y.shape):
            bits_differ.append(name)
        elif name.endswith(("input_scale", "k_scale", "v_scale")):
            kind = name.rsplit(".", 1)[1]
            rel = ((x.float() - y.float()).abs() / y.float().abs().clamp_min(1e-30)).max().item()
            worst[kind] = max(worst.get(kind, 0.0), rel)
            if rel > 1e-6:
                bits_differ.append(name)
        elif not torch.equal(x.view(torch.uint8) if x.element_size() == 1 else x, y.view(torch.uint8) if y.element_size() == 1 else y):
            bits_differ.append(name)
    out.update({"tensors": len(b), "differ": len(bits_differ), "first_differing": bits_differ[:8],
                "activation_scale_max_rel_diff": worst})  # fmt: skip
    out["explained_by_cuda_division"] = _explain(a, b, ours.parent / "bf16", bits_differ)
    hq = [json.loads((p / "hf_quant_config.json").read_text())["quantization"] for p in (ours, ref)]
    out["hf_quant_config_equal"] = hq[0] == hq[1]
    return out


def _explain(a: dict, b: dict, src: Path, differing: list[str]) -> dict:
    """Whether every differing NVFP4 module is explained by how ModelOpt's weight_scale_2 was rounded on the
    GPU: PyTorch's CUDA division by a Python scalar multiplies by fp32(1/2688) (one rounding more than
    `amax / 2688`). For each differing fusion group: ModelOpt's ws2 against both roundings of the source
    amax, and our quantizer run with ModelOpt's ws2 against ModelOpt's codes and block scales."""
    from safetensors.torch import load_file

    from stepquant.formats import nvfp4_codes, pack_nibbles

    source = {k: v for f in sorted(src.glob("*.safetensors")) for k, v in load_file(f).items()}
    groups = {"gate_proj": ("gate_proj", "up_proj"), "up_proj": ("gate_proj", "up_proj"),
              "q_proj": ("q_proj", "k_proj", "v_proj"), "k_proj": ("q_proj", "k_proj", "v_proj"),
              "v_proj": ("q_proj", "k_proj", "v_proj")}  # fmt: skip
    modules = sorted({n.rsplit(".", 1)[0] for n in differing if not n.endswith(("input_scale", "k_scale", "v_scale"))})
    rcp = torch.tensor(1 / 2688, dtype=torch.float32)
    counts = {"modules": len(modules), "ws2_is_reciprocal_product": 0, "ours_is_exact_quotient": 0, "requantized_equal": 0}
    for m in modules:
        parent, proj = m.rsplit(".", 1)
        members = [f"{parent}.{p}" for p in groups.get(proj, (proj,))]
        amax = torch.stack([source[f"{x}.weight"].float().abs().amax() for x in members]).amax()
        ws2 = b[f"{m}.weight_scale_2"]
        counts["ws2_is_reciprocal_product"] += bool(ws2 == amax * rcp)
        counts["ours_is_exact_quotient"] += bool(a[f"{m}.weight_scale_2"] == amax / 2688)
        codes, sf = nvfp4_codes(source[f"{m}.weight"], ws2, 16)
        counts["requantized_equal"] += bool(torch.equal(pack_nibbles(codes), b[f"{m}.weight"])
                                            and torch.equal(sf.view(torch.uint8), b[f"{m}.weight_scale"].view(torch.uint8)))  # fmt: skip
    return counts


def main(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    generate(root)
    result = {"device": torch.cuda.get_device_name(), "generate_seconds": round(time.time() - t0, 1),
              "source_bytes": sum(p.stat().st_size for p in (root / "bf16").glob("*.safetensors"))}  # fmt: skip
    for tool in ("modelopt", "stepquant"):
        proc = subprocess.run([sys.executable, __file__, tool, str(root)], capture_output=True, text=True)
        if proc.returncode:
            result[tool] = {"error": proc.stderr[-3000:]}
            continue
        result[tool] = json.loads(proc.stdout.strip().splitlines()[-1])
    if all("error" not in result[t] for t in ("modelopt", "stepquant")):
        mo, sq = result["modelopt"], result["stepquant"]
        for i, run in enumerate(("first", "second")[:RUNS]):
            result[f"{run}_run"] = {
                "wall_ratio": round(sq[i]["wall_seconds"] / mo[i]["wall_seconds"], 3),
                "peak_gpu_ratio": round(sq[i]["peak_gpu_allocated"] / mo[i]["peak_gpu_allocated"], 3),
            }
        result["comparison"] = compare(root / "stepquant", root / "modelopt")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("modelopt", "stepquant"):
        runner = run_modelopt if sys.argv[1] == "modelopt" else run_stepquant
        print(json.dumps(runner(Path(sys.argv[2]))))
    else:
        main(Path(sys.argv[1]))
