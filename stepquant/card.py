"""The model card (`README.md`) of a converted checkpoint, written from what made it and what measured it.

Everything in it comes from files: `stepquant.json` (recipe, source, calibration, which modules were
quantized), the checkpoint's quantization config, and, when there is one, `stepquant verify`'s
`report.json`. Nothing is claimed that those files do not say; a missing verify report is said so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import open_checkpoint
from .errors import StepquantError
from .families import detect_family
from .hub import REPO_ID

# quant_algo (as `Checkpoint.quantization()` reports it) -> what the card calls it, and its Hub tags
FORMATS: dict[str | None, tuple[str, tuple[str, ...]]] = {
    "NVFP4": ("NVFP4 (FP4 E2M1 weights and activations, E4M3 scale per 16 values, FP32 global scale)", ("nvfp4", "fp4", "4-bit")),
    "W4A16_NVFP4": ("NVFP4 weights only (W4A16; activations stay BF16)", ("nvfp4", "fp4", "w4a16", "4-bit")),
    "FP8": ("FP8 E4M3 (per-tensor weight and static activation scales)", ("fp8", "8-bit")),
    "FP8_BLOCK": ("FP8 E4M3 in 128x128 weight blocks (dynamic activations)", ("fp8", "8-bit")),
    None: ("BF16 (nothing quantized)", ("bf16",)),
}

# Serving commands per format: engine -> command; {repo}, {tp}, {kv}, {moe} are filled in below.
SERVE: dict[str, dict[str, str]] = {
    "NVFP4": {
        "vLLM (Blackwell: native FP4; Hopper: Marlin W4A16)": "vllm serve {repo} --tensor-parallel-size {tp}{kv[vllm]}",
        "SGLang, Blackwell": "python -m sglang.launch_server --model-path {repo} --tp {tp} --quantization modelopt_fp4{kv[sglang]}{moe[blackwell]}",
        "SGLang, Hopper (Marlin W4A16 fallback)": "python -m sglang.launch_server --model-path {repo} --tp {tp} --quantization modelopt_fp4{kv[sglang]}{moe[hopper]}",
        "TensorRT-LLM": "trtllm-serve {repo} --backend pytorch --tp_size {tp}{kv[trtllm]}",
    },
    "W4A16_NVFP4": {
        "vLLM": "vllm serve {repo} --tensor-parallel-size {tp}{kv[vllm]}",
    },
    "FP8": {
        "vLLM": "vllm serve {repo} --tensor-parallel-size {tp}{kv[vllm]}",
        "SGLang": "python -m sglang.launch_server --model-path {repo} --tp {tp} --quantization modelopt_fp8{kv[sglang]}",
        "TensorRT-LLM": "trtllm-serve {repo} --backend pytorch --tp_size {tp}{kv[trtllm]}",
    },
    "FP8_BLOCK": {
        "vLLM": "vllm serve {repo} --tensor-parallel-size {tp}",
        "SGLang": "python -m sglang.launch_server --model-path {repo} --tp {tp}",
    },
    "BF16": {
        "vLLM": "vllm serve {repo} --tensor-parallel-size {tp}",
        "SGLang": "python -m sglang.launch_server --model-path {repo} --tp {tp}",
    },
}
KV_FLAGS = {"vllm": " --kv-cache-dtype fp8", "sglang": " --kv-cache-dtype fp8_e4m3", "trtllm": " --kv_cache_dtype fp8"}
MOE_FLAGS = {"blackwell": " --moe-runner-backend flashinfer_trtllm", "hopper": " --moe-runner-backend marlin"}
ROLE_NAMES = {
    "experts": "routed experts", "shared_expert": "shared expert", "dense_mlp": "dense MLP", "attention": "attention",
    "router": "router", "lm_head": "lm_head", "embedding": "embeddings", "vision": "vision tower",
    "projector": "vision projector", "mtp": "MTP layers",
}  # fmt: skip
GPU_GB = 80  # the card's tensor-parallel suggestion: weights in <= 70% of one 80 GB GPU per rank


@dataclass
class CardInputs:
    """What a card is written from."""

    dst: Path
    repo_id: str
    base_model: str
    manifest: dict
    quant: dict  # Checkpoint.quantization()
    config: dict
    weight_bytes: int
    report: dict | None = None
    plots: tuple[str, ...] = ()  # paths in the repo of the verify plots


def base_model_of(manifest: dict, given: str | None) -> str:
    """The Hub repo the source came from: `given`, else the manifest's source id when it is a repo id or
    a folder of the Hugging Face cache."""
    if given:
        if not REPO_ID.match(given):
            raise StepquantError(f"--base-model {given}: not a Hub repo id (org/name)")
        return given
    src = str((manifest.get("source") or {}).get("id") or "")
    if REPO_ID.match(src) and not Path(src).exists():
        return src
    m = re.search(r"models--([^/]+)--([^/]+)/snapshots/", src)
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    raise StepquantError(f"{src or 'the source'}: a local folder, so the card cannot name the base model; pass --base-model org/name")


def card_inputs(dst: Path, repo_id: str, base_model: str | None, manifest: dict, report: dict | None,
                plots: tuple[str, ...]) -> CardInputs:  # fmt: skip
    """Gather what the card of `dst` says; `manifest` is its stepquant.json ({} when there is none)."""
    with open_checkpoint(dst) as ckpt:
        quant, config, size = ckpt.quantization(), ckpt.config, ckpt.total_bytes
    return CardInputs(dst, repo_id, base_model_of(manifest, base_model), manifest, quant, config, size, report, plots)


def render_card(c: CardInputs) -> str:
    """README.md text: YAML metadata that huggingface_hub's ModelCard parses, then the body."""
    from huggingface_hub import ModelCard, ModelCardData

    algo = c.quant.get("quant_algo")
    what, fmt_tags = FORMATS.get(algo, (str(algo), (str(algo).lower(),)))
    source = c.manifest.get("source") or {}
    carried = source.get("card") or {}
    family = detect_family(c.config)
    tags = [*fmt_tags, "modelopt", "stepquant"] + ([family.name] if family else [])
    pipeline = carried.get("pipeline_tag") or ("image-text-to-text" if family and family.multimodal else "text-generation")
    data = ModelCardData(
        base_model=c.base_model, base_model_relation="quantized", license=carried.get("license"),
        license_name=carried.get("license_name"), license_link=carried.get("license_link"),
        language=carried.get("language"), pipeline_tag=pipeline, library_name="transformers", tags=tags,
    )  # fmt: skip
    body = "\n".join([
        f"# {c.repo_id.split('/')[-1]}", "",
        f"[{c.base_model}](https://huggingface.co/{c.base_model}) quantized to {what}, in NVIDIA ModelOpt's "
        f"Hugging Face checkpoint format (`hf_quant_config.json`, `quantization_config` with `quant_method: modelopt`). "
        f"Built with stepquant {c.manifest.get('producer', {}).get('version', '?')}.",
        "", *_quantized_section(c), "", *_calibration_section(c), "", *_accuracy_section(c), "",
        *_serving_section(c, algo), "", *_reproduce_section(c),
    ])  # fmt: skip
    text = f"---\n{data.to_yaml()}\n---\n\n{body}\n"
    ModelCard(text)  # raises if the metadata does not parse
    return text


def _quantized_section(c: CardInputs) -> list[str]:
    q = c.quant
    lines = ["## What is quantized", ""]
    roles = (c.manifest.get("modules") or {}).get("roles") or {}
    if roles:
        lines += ["| part | quantized modules | kept as in the source |", "|---|---|---|"]
        lines += [f"| {ROLE_NAMES.get(r, r)} | {n['quantized']} | {n['kept']} |" for r, n in roles.items()]
        lines.append("")
        lines.append("Routed experts count one module per expert.")
    mods = c.manifest.get("modules") or {}
    if "copied_tensors" in mods:
        lines.append(f"{mods['copied_tensors']} tensors ({_size(mods['copied_bytes'])}) are byte-for-byte copies of "
                     "the source's: everything not quantized is carried over unchanged, never re-encoded.")  # fmt: skip
    if q.get("group_size"):
        lines.append(f"Group size {q['group_size']}.")
    kv = q.get("kv_cache_quant_algo")
    lines.append(f"KV cache: {'FP8 E4M3 with calibrated `k_scale`/`v_scale` (amax/448)' if kv == 'FP8' else 'not quantized'}.")
    excl = q.get("exclude_modules") or []
    if excl:
        lines += ["", f"<details><summary>exclude_modules ({len(excl)} patterns, kept in BF16)</summary>", "",
                  *[f"- `{p}`" for p in excl], "", "</details>"]  # fmt: skip
    lines += ["", f"Checkpoint size: {_size(c.weight_bytes)} of weights."]
    return lines


def _calibration_section(c: CardInputs) -> list[str]:
    cal = c.manifest.get("calibration")
    recipe = c.manifest.get("recipe") or {}
    if not c.manifest:
        return ["## Recipe and calibration", "", "Unknown: the folder has no `stepquant.json`."]
    lines = ["## Recipe and calibration", "", f"Recipe `{recipe.get('name', '?')}`: format `{recipe.get('format')}`, "
             f"scope `{recipe.get('scope')}`, KV cache `{recipe.get('kv_cache')}`, MoE layout `{recipe.get('moe_layout')}`, "
             f"naming `{recipe.get('naming')}`."]  # fmt: skip
    if not cal:
        return [*lines, "", "No calibration: the format needs none (weights only)."]
    lines += ["", f"Calibration data: {cal['data']}; {cal['samples']} samples, {cal['tokens']} tokens."]
    empty = cal.get("experts_without_tokens") or {}
    counted = cal.get("expert_tokens") or {}
    if counted:
        n_empty = sum(len(v) for v in empty.values())
        total = sum(len(v) for v in counted.values())
        every = (c.manifest.get("options") or {}).get("calib_all_experts")
        rest = (f"every one of the {cal['tokens']} tokens also went through every expert for the statistics"
                " (`--calib-all-experts`)" if every
                else f"the other {n_empty} use their layer's largest activation scale")  # fmt: skip
        lines.append(f"{total - n_empty} of {total} routed experts were routed calibration tokens"
                     + (f"; {rest}." if n_empty or every else "."))  # fmt: skip
    if (c.dst / "expert_coverage.png").is_file():
        lines += ["", "![calibration tokens per expert](expert_coverage.png)"]
    return lines


def _accuracy_section(c: CardInputs) -> list[str]:
    from .verify import format_table

    lines = ["## Accuracy", ""]
    if c.report is None:
        return [*lines, "Not measured yet: run `stepquant verify DST --ref SRC --report DIR` and push with `--report DIR`."]
    r = c.report
    mode = r.get("mode")
    how = {"w4a4": "`w4a4`, activations quantized as a Blackwell GPU does (SPEC §9)",
           "w4a16": "`w4a16`, FP4 weights with BF16 activations, as Hopper engines run it"}.get(mode, f"`{mode}`")  # fmt: skip
    lines += [f"Measured with `stepquant verify` against the source checkpoint; execution mode {how}.", "", format_table(r).rstrip()]
    lines += [f"\n![{Path(p).stem}]({p})" for p in c.plots]
    return lines


def _serving_section(c: CardInputs, algo: str | None) -> list[str]:
    cmds = SERVE.get(algo or "BF16", {})
    tp = 1
    while c.weight_bytes > tp * 0.7 * GPU_GB * 1e9 and tp < 8:
        tp *= 2
    kv = KV_FLAGS if c.quant.get("kv_cache_quant_algo") == "FP8" else dict.fromkeys(KV_FLAGS, "")
    moe = MOE_FLAGS if (c.manifest.get("modules") or {}).get("roles", {}).get("experts") else dict.fromkeys(MOE_FLAGS, "")
    lines = ["## Serving", "", f"Commands for {tp} GPU(s) of 80 GB (the weights take {_size(c.weight_bytes)}):", ""]
    for engine, cmd in cmds.items():
        lines += [f"{engine}:", "", "```", cmd.format(repo=c.repo_id, tp=tp, kv=kv, moe=moe), "```", ""]
    if algo == "NVFP4":
        lines.append("Hopper GPUs have no FP4 tensor cores: engines there run the weights as W4A16 and ignore the "
                     "activation scales, so accuracy on Hopper is the `w4a16` figure, on Blackwell the `w4a4` one.")  # fmt: skip
    return lines


def _reproduce_section(c: CardInputs) -> list[str]:
    m = c.manifest
    src = m.get("source") or {}
    if not m:
        return []
    opts = {k: v for k, v in (m.get("options") or {}).items() if v not in (None, False) and k != "device"}
    flags = " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in opts.items())
    rev = f" (revision {src['revision']})" if src.get("revision") else ""
    return ["## Reproduce", "", f"Source: `{src.get('id')}`{rev}. Every file's sha256 is in `stepquant.json`.", "",
            "```", f"stepquant convert {c.base_model} OUT {flags}".rstrip(), "```"]  # fmt: skip


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def write_card(c: CardInputs, regenerate: bool = False) -> tuple[Path, bool]:
    """DST/README.md from `c`, unless one exists and `regenerate` is False; returns (path, written)."""
    path = c.dst / "README.md"
    if path.exists() and not regenerate:
        return path, False
    tmp = path.with_name("README.md.partial")
    tmp.write_text(render_card(c))
    tmp.replace(path)
    return path, True

