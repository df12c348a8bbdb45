"""Running a quantized checkpoint inside the family's transformers model (the harness's quantized side).

The reference model is loaded by transformers from the source checkpoint (eager experts). Every
quantized unit of the checkpoint under test (any naming or expert layout stepquant writes, and
ModelOpt's exports) is registered against the parameter it replaces; while `quantized(...)` is active,
`F.linear` on such a weight runs the quantized linear instead:

- NVFP4 `w4a16`: exact `code x block scale` weight values, BF16 activations, fp32 accumulation,
  `x weight_scale_2`; `w4a4`: activations quantized first with Blackwell's recipe (SPEC §9), `alpha =
  input_scale x weight_scale_2` (kernels on CUDA, the same numbers in fp32 torch on the CPU);
- FP8: static per-tensor activations, `torch._scaled_mm` on CUDA, exact emulation on the CPU; block FP8:
  the weight dequantized;
- FP8 KV cache: where the checkpoint has `k_scale`/`v_scale`, the keys and values every attention layer
  consumes are rounded to E4M3 with them (saturating at 448) and scaled back, as an FP8 cache stores them.

Fused experts call `F.linear` once per expert and projection with a slice of the 3-D parameter; the
expert is recovered from the slice's storage offset. Everything else (router, SwiGLU clamp, attention)
is transformers' own forward.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .calibrate import _is_fused_experts, canonical_layer, canonical_module, wrapped_attention
from .checkpoint import Checkpoint, same_tensor
from .errors import StepquantError
from .naming import canonical_names
from .plan import Plan
from .quantize import Executor

MODES = ("w4a4", "w4a16")


@dataclass
class QWeight:
    """One quantized [N, K] weight as the harness runs it."""

    fmt: str
    parts: dict[str, torch.Tensor]  # the checkpoint's tensors (gate and up of an expert concatenated)
    exact: torch.Tensor | None = None  # NVFP4 on the CPU: code x block scale, exact in BF16
    nv: object | None = None  # NVFP4 on CUDA: the kernels' NVFP4Weight

    def to(self, device: str) -> QWeight:
        from .kernels.linear import dequantize_nvfp4

        parts = {k: v.to(device) for k, v in self.parts.items()}
        q = QWeight(self.fmt, parts)
        if self.fmt.endswith("nvfp4") and device == "cpu":
            q.exact = dequantize_nvfp4(parts["weight"], parts["weight_scale"], 1.0, torch.float32).to(torch.bfloat16)
        elif self.fmt.endswith("nvfp4"):  # the kernels read the packed weight; no BF16 copy on the GPU
            from .kernels.linear import NVFP4Weight

            q.nv = NVFP4Weight.from_parts(parts["weight"], parts["weight_scale"], parts["weight_scale_2"],
                                          parts.get("input_scale"))  # fmt: skip
            # the kernels' blocked copy replaces the checkpoint's layout on the device (one copy, not two)
            q.parts = {k: v for k, v in parts.items() if k not in ("weight", "weight_scale")}
        return q


def qlinear(x: torch.Tensor, q: QWeight, mode: str) -> torch.Tensor:
    """`x @ W.T` for a quantized weight: BF16 inputs (as engines feed them, whatever the model's
    dtype), BF16 out."""
    from .kernels.fp8 import fp8_block_linear, fp8_linear

    x = x.to(torch.bfloat16)

    if q.fmt == "fp8":
        return fp8_linear(x, q.parts["weight"], q.parts["weight_scale"], q.parts["input_scale"])
    if q.fmt == "fp8-block":
        return fp8_block_linear(x, q.parts["weight"], q.parts["weight_scale_inv"])
    if "input_scale" not in q.parts:
        mode = "w4a16"  # weight-only NVFP4
    if q.nv is not None:
        from .kernels.linear import nvfp4_linear

        return nvfp4_linear(x, q.nv, mode)
    ws2 = q.parts["weight_scale_2"].float().reshape(())
    a = x.float()
    alpha = ws2
    if mode == "w4a4":
        from .kernels.linear import blackwell_activations, dequantize_nvfp4

        isc = q.parts["input_scale"].float().reshape(())
        qa, sfa = blackwell_activations(x, float(isc))
        a = dequantize_nvfp4(qa, sfa, 1.0, torch.float32)
        alpha = isc * ws2
    return ((a @ q.exact.float().T) * alpha).to(torch.bfloat16)


class QuantizedModel:
    """A reference model plus the quantized weights that replace some of its parameters."""

    def __init__(self, model: torch.nn.Module, linears: dict[int, QWeight], experts: dict[int, list[QWeight]],
                 units: int, kv: dict[torch.nn.Module, tuple[float, float]] | None = None) -> None:  # fmt: skip
        self.model = model
        self.linears = linears
        self.experts = experts
        self.units = units
        self.kv = kv or {}  # attention module -> (k_scale, v_scale) of an FP8 KV cache
        self.attacher: Attacher | None = None

    def lookup(self, weight: torch.Tensor) -> QWeight | None:
        q = self.linears.get(id(weight))
        if q is not None:
            return q
        base = weight._base
        if base is not None and id(base) in self.experts:
            e = (weight.storage_offset() - base.storage_offset()) // base[0].numel()
            return self.experts[id(base)][e]
        return None

    @contextmanager
    def quantized(self, mode: str = "w4a4"):
        """While active, the model computes with the checkpoint's quantized weights and its FP8 KV
        cache (the layers in `kv`; clear it to leave the cache in BF16)."""
        if mode not in MODES:
            raise StepquantError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
        orig = F.linear

        def linear(input, weight, bias=None):
            q = self.lookup(weight)
            if q is None:
                return orig(input, weight, bias)
            out = qlinear(input, q, mode).to(input.dtype)
            return out + bias if bias is not None else out

        def fp8_cache(module, key, value):
            scales = self.kv.get(module)
            return (key, value) if scales is None else (fp8_kv(key, scales[0]), fp8_kv(value, scales[1]))

        F.linear = linear
        try:
            with wrapped_attention(self.model, fp8_cache) if self.kv else nullcontext():
                yield self.model
        finally:
            F.linear = orig


def fp8_kv(t: torch.Tensor, scale: float) -> torch.Tensor:
    """What an FP8 (E4M3) KV cache gives back for `t` stored with `scale`: t / scale rounded to E4M3
    (saturating at +-448), times scale."""
    q = (t.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(t.dtype)


class Attacher:
    """Builds the quantized weights of `ckpt` for the transformers modules it replaces, keyed by the
    parameters they stand for (so for one decoder layer at a time, too, once its parameters are real)."""

    def __init__(self, ckpt: Checkpoint, memory_names, device: str) -> None:
        from .check import _lint_plan

        self.ckpt, self.memory_names, self.device = ckpt, memory_names, device
        self.plan, _, _ = _lint_plan(ckpt)
        self.ex = Executor(ckpt, self.plan, None, "shared")
        self.lin_by_module = {lin.module: lin for lin in self.plan.linears if lin.fmt_in.quant_algo}
        self.exp_by_layer = {e.layer: e for e in self.plan.experts if e.fmt_in.quant_algo}

    @property
    def wanted(self) -> int:
        return len(self.lin_by_module) + len(self.exp_by_layer)

    def units(self, modules) -> tuple[dict[int, QWeight], dict[int, list[QWeight]], int]:
        """(linears, experts, how many units) for the (name, module) pairs given."""
        ckpt, ex, names = self.ckpt, self.ex, self.memory_names
        linears: dict[int, QWeight] = {}
        experts: dict[int, list[QWeight]] = {}
        found = 0
        for name, module in modules:
            if isinstance(module, torch.nn.Linear) and canonical_module(name, names) in self.lin_by_module:
                lin = self.lin_by_module[canonical_module(name, names)]
                parts = {s: ckpt.read(n) for s, n in lin.parts.items()}
                linears[id(module.weight)] = QWeight(lin.fmt_in.name, parts).to(self.device)
                found += 1
            elif _is_fused_experts(module):
                unit = self.exp_by_layer.get(canonical_layer(name, names))
                if unit is None:
                    continue
                gu, dn = [], []
                for e in range(unit.num):
                    g = {s: ex.expert_part(unit, "gate", e, s) for s in unit.parts["gate"][e]}
                    u = {s: ex.expert_part(unit, "up", e, s) for s in unit.parts["up"][e]}
                    fused = {s: (torch.cat([g[s], u[s]]) if g[s].dim() else torch.maximum(g[s], u[s])) for s in g}
                    gu.append(QWeight(unit.fmt_in.name, fused).to(self.device))
                    d = {s: ex.expert_part(unit, "down", e, s) for s in unit.parts["down"][e]}
                    dn.append(QWeight(unit.fmt_in.name, d).to(self.device))
                experts[id(module.gate_up_proj)] = gu
                experts[id(module.down_proj)] = dn
                found += 1
        return linears, experts, found


def attach(model: torch.nn.Module, ckpt: Checkpoint, ref: Checkpoint, memory_names, device: str,
           weights: bool = True) -> QuantizedModel:  # fmt: skip
    """Register every quantized unit of `ckpt` against `model` (loaded from `ref`). `weights=False`:
    only check and take the KV-cache scales; the units come layer by layer (`Attacher.units`)."""
    attacher = Attacher(ckpt, memory_names, device)
    _same_unquantized(ckpt, attacher.plan, ref)
    linears, experts, found = attacher.units(model.named_modules()) if weights else ({}, {}, attacher.wanted)
    if found != attacher.wanted:
        raise StepquantError(f"{ckpt.root}: {attacher.wanted - found} quantized module(s) have no counterpart in the transformers model")
    qm = QuantizedModel(model, linears, experts, attacher.wanted, _kv_scales(model, ckpt, memory_names))
    qm.attacher = attacher
    return qm


def _kv_scales(model: torch.nn.Module, ckpt: Checkpoint, memory_names) -> dict[torch.nn.Module, tuple[float, float]]:
    """Attention module -> (k_scale, v_scale) for every layer whose FP8 KV scales the checkpoint holds."""
    _, _, names = canonical_names(list(ckpt.tensors))  # canonical -> the checkpoint's name
    scales = {}
    for canon, name in names.items():
        attn = canon.removesuffix(".k_proj.k_scale")
        v = names.get(attn + ".v_proj.v_scale")
        if attn != canon and v is not None:
            scales[attn] = (float(ckpt.read(name).float()), float(ckpt.read(v).float()))
    out = {m: scales[canonical_module(n, memory_names)] for n, m in model.named_modules()
           if canonical_module(n, memory_names) in scales}  # fmt: skip
    if len(out) != len(scales):
        raise StepquantError(f"{ckpt.root}: {len(scales) - len(out)} layer(s) with KV-cache scales have no attention module in the transformers model")
    return out


def _same_unquantized(ckpt: Checkpoint, plan: Plan, ref: Checkpoint) -> None:
    """The unquantized tensors must be the reference's (byte for byte, under the canonical names): the
    harness runs the reference's."""
    _, _, ours = canonical_names(list(ckpt.tensors))  # canonical -> the checkpoint's name
    _, _, theirs = canonical_names(list(ref.tensors))
    quantized = {n for lin in plan.linears if lin.fmt_in.quant_algo for n in lin.parts.values()}
    quantized |= {r[0] for ex in plan.experts if ex.fmt_in.quant_algo for key in ex.parts for e in ex.parts[key] for r in e.values()}
    for c, name in sorted(ours.items()):
        if name in quantized or c not in theirs:
            continue
        if not same_tensor(ckpt, name, ref, theirs[c]):
            raise StepquantError(f"{ckpt.root}: tensor '{name}' is not quantized but differs from the reference's; "
                                 "the harness runs the reference's")  # fmt: skip
