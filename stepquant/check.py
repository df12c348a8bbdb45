"""`check`: lint a quantized checkpoint (ours or anyone's) against what vLLM, SGLang and TensorRT-LLM
load (SPEC §2-§6, §12). Defects make a checkpoint load wrongly or not at all; warnings are worth knowing.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import Checkpoint, open_checkpoint
from .families import GENERIC, detect_family
from .naming import builtin_map, canonical_names
from .plan import FUSION, Experts, Linear, build_plan, role_of
from .quantize import Executor
from .recipes import Recipe

ENGINES = ("vllm", "sglang", "trtllm")
STEP = ("step3p7", "step3p5")
REF_MAX_REL_ERR = {"nvfp4": 0.25, "w4a16-nvfp4": 0.25, "fp8": 0.08, "fp8-block": 0.08}


@dataclass
class Report:
    defects: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.defects else 0


def _matches(module: str, patterns: list[str]) -> bool:
    return any(module == p or module.startswith(p + ".") or fnmatch.fnmatchcase(module, p) for p in patterns)


def check_checkpoint(path: str | Path, engines: tuple[str, ...] = ENGINES, ref: str | Path | None = None) -> Report:
    """Lint the checkpoint at `path`; with `ref`, also compare its dequantized weights with the source."""
    rep = Report()
    with open_checkpoint(path) as ckpt:
        plan, naming, to_canon = _lint_plan(ckpt)
        family = plan.family
        out_name = builtin_map("step-hub", naming).apply if to_canon else (lambda n: n)
        num_layers = ckpt.text_config.get(family.num_layers_key)
        quant = ckpt.quantization()
        excl = list(quant["exclude_modules"] or [])
        _check_configs(ckpt, quant, rep)
        quantized = [u for u in [*plan.linears, *plan.experts] if u.fmt_in.quant_algo]
        if not quantized:
            rep.warnings.append(f"{ckpt.root}: no quantized module found")
        for lin in plan.linears:
            _check_linear(ckpt, lin, out_name(lin.module), excl, num_layers, rep)
        _check_fusion(ckpt, plan.linears, out_name, rep)
        for ex in plan.experts:
            _check_experts(ckpt, ex, family.name, out_name, excl, engines, rep)
        _check_kv(ckpt, plan.linears, quant, family.name, num_layers, out_name, engines, rep)
        _check_engines(plan.linears, family.name, out_name, excl, engines, rep)
        if ref is not None:
            _compare_with_ref(ckpt, plan, ref, out_name, rep)
    return rep


def _lint_plan(ckpt: Checkpoint):
    """The checkpoint's plan as it stands (canonical module names, the checkpoint's own tensor names),
    its naming, and the map to canonical names."""
    family = detect_family(ckpt.config) or GENERIC
    naming, to_canon, canonical = canonical_names(list(ckpt.tensors))
    plan = build_plan(ckpt.tensors, canonical, family, ckpt.text_config.get(family.num_layers_key), Recipe())
    _to_source_names(plan)
    return plan, naming, to_canon


def _to_source_names(plan) -> None:
    """Point the plan's tensor references at the checkpoint's own names (modules stay canonical)."""
    src = plan.canonical
    for lin in plan.linears:
        lin.parts = {s: src[n] for s, n in lin.parts.items()}
    for ex in plan.experts:
        for key, experts in ex.parts.items():
            ex.parts[key] = [{s: (src[n], i) for s, (n, i) in parts.items()} for parts in experts]
    plan.canonical = {n: n for n in src.values()}


def _check_configs(ckpt: Checkpoint, quant: dict, rep: Report) -> None:
    hqc = (ckpt.read_json("hf_quant_config.json") or {}).get("quantization")
    qc = ckpt.config.get("quantization_config") or ckpt.text_config.get("quantization_config")
    algo = quant["quant_algo"]
    if algo in ("NVFP4", "W4A16_NVFP4"):
        if not isinstance(hqc, dict):
            rep.defects.append(f"{ckpt.root}/hf_quant_config.json: missing (vLLM's NVFP4 loader reads it)")
        else:
            for key in ("group_size", "kv_cache_quant_algo", "exclude_modules"):
                if key not in hqc:
                    rep.defects.append(f"{ckpt.root}/hf_quant_config.json: missing {key} (vLLM requires it for NVFP4)")
    if isinstance(hqc, dict) and isinstance(qc, dict) and qc.get("quant_method") == "modelopt":
        pairs = (("quant_algo", "quant_algo"), ("exclude_modules", "ignore"))
        for hk, qk in pairs:
            a, b = hqc.get(hk), qc.get(qk)
            if hk == "exclude_modules":
                a, b = sorted(a or []), sorted(b or [])
            if a != b:
                rep.defects.append(
                    f"{ckpt.root}: config.json quantization_config.{qk} differs from hf_quant_config.json {hk};"
                    " engines read config.json first"
                )
        kv_h = hqc.get("kv_cache_quant_algo")
        kv_q = "FP8" if isinstance(qc.get("kv_cache_scheme"), dict) else qc.get("kv_cache_quant_algo")
        if kv_h != kv_q:
            rep.defects.append(f"{ckpt.root}: config.json and hf_quant_config.json disagree on the KV cache ({kv_q} vs {kv_h})")


def _scalar_ok(ckpt: Checkpoint, name: str, rep: Report, stacked: int | None = None) -> torch.Tensor | None:
    t = ckpt.tensors[name]
    value = ckpt.read(name).float()
    if stacked is None and t.shape not in ((), (1,)):
        rep.defects.append(f"tensor '{name}': shape {list(t.shape)}, engines expect a 0-dim scalar")
    if t.dtype != "F32":
        rep.defects.append(f"tensor '{name}': dtype {t.dtype}, engines expect F32")
    if not torch.isfinite(value).all() or (value == 0).any():
        bad = [i for i, v in enumerate(value.reshape(-1).tolist()) if not (v == v and abs(v) != float("inf") and v != 0)]
        rep.defects.append(f"tensor '{name}': NaN, Inf or zero scale" + (f" (experts {bad[:8]})" if stacked else ""))
    return value


def _check_linear(ckpt: Checkpoint, lin: Linear, module: str, excl: list[str], num_layers, rep: Report) -> None:
    excluded = _matches(module, excl)
    fmt = lin.fmt_in
    if not fmt.quant_algo:
        scales = [s for s in lin.parts if s != "weight" and s not in ("k_scale", "v_scale")]
        if scales and excluded:
            rep.defects.append(f"module '{module}': excluded but carries {', '.join(scales)} (breaks vLLM's loader)")
        return
    if excluded:
        rep.defects.append(f"module '{module}': quantized but matched by exclude_modules")
    if lin.role == "mtp":
        rep.defects.append(f"module '{module}': MTP layers must stay BF16 and be excluded")
    expect = fmt.specs(lin.shape)
    if fmt.calibrated and fmt.name != "fp8-block":
        expect = {**expect, "input_scale": ("F32", ())}
    for suffix, (dtype, shape) in expect.items():
        name = lin.parts.get(suffix)
        if name is None:
            rep.defects.append(f"module '{module}': missing {suffix}")
            continue
        t = ckpt.tensors[name]
        if shape == ():
            _scalar_ok(ckpt, name, rep)
        elif (t.dtype, t.shape) != (dtype, shape):
            rep.defects.append(f"tensor '{name}': {t.dtype}{list(t.shape)}, expected {dtype}{list(shape)}")
        elif "scale" in suffix:
            v = ckpt.read(name).float()
            if not torch.isfinite(v).all() or (suffix == "weight_scale_inv" and (v == 0).any()):
                rep.defects.append(f"tensor '{name}': NaN/Inf or zero scales")


def _check_fusion(ckpt: Checkpoint, linears: list[Linear], out_name, rep: Report) -> None:
    by = {lin.module: lin for lin in linears}
    seen = set()
    for lin in linears:
        if not lin.fmt_in.shares_fusion_amax:
            continue
        for pattern, members in FUSION:
            m = re.match(pattern, lin.module)
            if not m or m.group(1) in seen:
                continue
            seen.add(m.group(1))
            group = [by[f"{m.group(1)}.{p}"] for p in members if f"{m.group(1)}.{p}" in by]
            for suffix in ("weight_scale_2", "input_scale"):
                values = [ckpt.read(g.parts[suffix]).float() for g in group if suffix in g.parts]
                if len(values) > 1 and not all(torch.equal(values[0], v) for v in values[1:]):
                    rep.defects.append(
                        f"{out_name(m.group(1))}: {'/'.join(members)} {suffix} differ; engines read only one"
                    )


def _check_experts(ckpt: Checkpoint, ex: Experts, family: str, out_name, excl, engines, rep: Report) -> None:
    fmt = ex.fmt_in
    layer = out_name(ex.layer)
    modules = (f"{layer}.moe.experts", f"{layer}.mlp.experts")
    if not fmt.quant_algo:
        return
    if any(_matches(m, excl) for m in modules):
        rep.defects.append(f"experts of {layer}: quantized but matched by exclude_modules")
    needed = dict(fmt.specs(ex.shapes["gate"]))
    if fmt.calibrated and fmt.name != "fp8-block":
        needed["input_scale"] = ("F32", ())
    for key in ("gate", "up", "down"):
        for e, parts in enumerate(ex.parts[key]):
            for suffix in needed:
                if suffix not in parts:
                    rep.defects.append(f"experts of {layer}: expert {e} {key} is missing {suffix}")
    for key in ("gate", "up", "down"):
        for suffix in ("weight_scale_2", "input_scale", "weight_scale"):
            refs = [p.get(suffix) for p in ex.parts[key]]
            if not refs or refs[0] is None:
                continue
            names = sorted({r[0] for r in refs if r})
            for name in names:
                t = ckpt.tensors[name]
                value = ckpt.read(name).float()
                if suffix != "weight_scale" and ex.layout == "stacked" and t.shape != (ex.num,):
                    msg = f"tensor '{name}': shape {list(t.shape)}, the stacked layout needs [{ex.num}]"
                    (rep.defects if "sglang" in engines else rep.warnings).append(msg + " (SGLang indexes it by expert)")
                if not torch.isfinite(value).all() or (suffix != "weight_scale" and (value == 0).any()):
                    rep.defects.append(f"tensor '{name}': NaN, Inf or zero scales")
    if fmt.shares_fusion_amax:
        for e in range(ex.num):
            g, u = ex.parts["gate"][e].get("weight_scale_2"), ex.parts["up"][e].get("weight_scale_2")
            if g and u and not torch.equal(_part(ckpt, g), _part(ckpt, u)):
                rep.defects.append(f"experts of {layer}: expert {e} gate/up weight_scale_2 differ; engines read only the gate's")
                break
    if family in STEP and ex.layout == "per-expert" and "sglang" in engines:
        rep.defects.append(f"experts of {layer}: per-expert layout; SGLang loads only the stacked layout (vLLM loads both)")
    inter = ex.shapes["down"][1]
    group = getattr(fmt.config, "group_size", 1)
    bad_tp = [tp for tp in (2, 4, 8) if inter % (tp * group)]
    if bad_tp:
        rep.warnings.append(f"experts of {layer}: intermediate size {inter} does not split into groups of {group} at TP {bad_tp}")


def _part(ckpt: Checkpoint, ref: tuple[str, int | None]) -> torch.Tensor:
    name, idx = ref
    return ckpt.read(name) if idx is None else ckpt.read_slice(name, idx)


def _check_kv(ckpt, linears, quant, family, num_layers, out_name, engines, rep: Report) -> None:
    if quant["kv_cache_quant_algo"] != "FP8":
        return
    attns = sorted({lin.module.rpartition(".")[0] for lin in linears
                    if lin.module.endswith("self_attn.k_proj") and role_of(lin.module, num_layers) != "mtp"})  # fmt: skip
    by = {lin.module: lin for lin in linears}
    for attn in attns:
        for kv in ("k", "v"):
            lin = by.get(f"{attn}.{kv}_proj")
            name = lin.parts.get(f"{kv}_scale") if lin else None
            if name is None:
                rep.defects.append(f"{out_name(attn)}: KV cache is FP8 but {kv}_proj.{kv}_scale is missing")
            else:
                _scalar_ok(ckpt, name, rep)
    if family in STEP and attns and ("vllm" in engines or "sglang" in engines):
        rep.warnings.append(
            "KV-cache scales: neither the vLLM nor the SGLang Step loader consumes self_attn.*_proj.{k,v}_scale;"
            " the FP8 KV cache runs with scale 1.0 there"
        )


def _check_engines(linears, family, out_name, excl, engines, rep: Report) -> None:
    for lin in linears:
        module = out_name(lin.module)
        quantized = bool(lin.fmt_in.quant_algo)
        kind = ("g_proj" if lin.module.endswith(".g_proj") else "lm_head" if lin.role == "lm_head"
                else "projector" if lin.role == "projector" else None)  # fmt: skip
        if kind is None:
            continue
        if not quantized and not _matches(module, excl) and "vllm" in engines:
            rep.defects.append(f"module '{module}': BF16 but not in exclude_modules; vLLM would load it as quantized")
        if quantized and family in STEP and "sglang" in engines:
            rep.defects.append(f"module '{module}': quantized {kind}; SGLang never quantizes it (vLLM-only checkpoint)")


def _compare_with_ref(ckpt: Checkpoint, plan, ref, out_name, rep: Report) -> None:
    """Dequantize every quantized module and compare it with the source's weight (catches swapped nibbles)."""
    with open_checkpoint(ref) as src:
        src_plan = _lint_plan(src)[0]
        src_ex = Executor(src, src_plan, None, "shared")
        ours = Executor(ckpt, plan, None, "shared")
        src_lin = {lin.module: lin for lin in src_plan.linears}
        for lin in plan.linears:
            if not lin.fmt_in.quant_algo or lin.module not in src_lin:
                continue
            _rel_err(ours.linear_weight(lin), src_ex.linear_weight(src_lin[lin.module]), out_name(lin.module),
                     lin.fmt_in.name, rep)  # fmt: skip
        src_experts = {ex.layer: ex for ex in src_plan.experts}
        for ex in plan.experts:
            if not ex.fmt_in.quant_algo or ex.layer not in src_experts:
                continue
            for key in ("gate", "up", "down"):
                for e in range(ex.num):
                    _rel_err(ours.expert_weight(ex, key, e), src_ex.expert_weight(src_experts[ex.layer], key, e),
                             f"{out_name(ex.layer)} expert {e} {key}", ex.fmt_in.name, rep)  # fmt: skip


def _rel_err(w: torch.Tensor, ref: torch.Tensor, where: str, fmt: str, rep: Report) -> None:
    if w.shape != ref.shape:
        rep.defects.append(f"{where}: shape {list(w.shape)} but the reference has {list(ref.shape)}")
        return
    err = float((w.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
    if err > REF_MAX_REL_ERR.get(fmt, 0.25):
        rep.defects.append(f"{where}: dequantized weight is {err:.1%} off the reference (> {REF_MAX_REL_ERR[fmt]:.0%})")


def format_report(rep: Report) -> str:
    lines = [f"DEFECT  {d}" for d in rep.defects] + [f"warning {w}" for w in rep.warnings]
    lines.append(f"{len(rep.defects)} defect(s), {len(rep.warnings)} warning(s)")
    return "\n".join(lines)
