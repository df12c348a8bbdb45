"""Weight formats: one registry of handlers keyed by typed configs (SPEC §2, §3).

Each handler turns one Linear weight `[out, in]` into its on-disk tensors (`weight`, `weight_scale`, ...)
and back. Callers supply the weight amax, because NVFP4 shares it across a fusion group (q/k/v, gate/up)
while FP8 does not; callers also turn activation amax into `input_scale`. The numerics are ModelOpt's,
bit for bit; GPU kernels must reproduce these functions exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .errors import StepquantError

E2M1_MAX = 6.0
E4M3_MAX = 448.0
# code -> value for the low 3 bits of an E2M1 nibble; bit 3 is the sign
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])

ROWS_ELEMENTS = 1 << 18  # elements quantized per step on the CPU: 1 MiB of fp32, cache-sized
Parts = dict[str, torch.Tensor]  # suffix ("weight", "weight_scale", ...) -> tensor


@dataclass(frozen=True)
class FormatConfig:
    name: ClassVar[str]


@dataclass(frozen=True)
class BF16Config(FormatConfig):
    name: ClassVar[str] = "bf16"


@dataclass(frozen=True)
class FP8Config(FormatConfig):
    """Per-tensor FP8 E4M3 weights and static per-tensor activation scales (ModelOpt `FP8`)."""

    name: ClassVar[str] = "fp8"


@dataclass(frozen=True)
class FP8BlockConfig(FormatConfig):
    """Block-scaled FP8 (DeepSeek / Step-3.7-Flash-FP8): `weight_scale_inv` per 128x128 block, dynamic activations."""

    name: ClassVar[str] = "fp8-block"
    block: int = 128


@dataclass(frozen=True)
class NVFP4Config(FormatConfig):
    """NVFP4: E2M1 codes, an E4M3 scale per 16 inputs, an fp32 global scale; W4A4 unless weight-only."""

    name: ClassVar[str] = "nvfp4"
    group_size: int = 16
    weight_only: bool = False


class Format:
    """A handler: how one format writes and reads a Linear's weight."""

    config: FormatConfig
    quant_algo: str | None = None  # hf_quant_config.json's name for it
    calibrated = False  # writes a static input_scale
    shares_fusion_amax = False  # q/k/v and gate/up share one global weight amax

    def __init__(self, config: FormatConfig) -> None:
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    def specs(self, shape: tuple[int, int]) -> dict[str, tuple[str, tuple[int, ...]]]:
        """suffix -> (safetensors dtype, shape) of what `quantize` writes for a weight of `shape`."""
        raise NotImplementedError

    def cannot_hold(self, shape: tuple[int, ...]) -> str | None:
        """Why the format cannot hold a weight of this shape (NVFP4 needs in % 16 == 0), else None."""
        return None

    def quantize(self, w: torch.Tensor, amax: torch.Tensor) -> Parts:
        raise NotImplementedError

    # the scale tensors that follow from the weight amax alone: the writer makes them without quantizing
    amax_scale_names: tuple[str, ...] = ()

    def amax_scales(self, amax: torch.Tensor) -> Parts:
        """The `amax_scale_names` tensors for these amax values (one value per amax)."""
        return {}

    def quantize_stacked(self, w: torch.Tensor, amax: torch.Tensor) -> Parts:
        """`quantize` of each `w[i]` with `amax[i]`, stacked (formats with a batched kernel override it)."""
        parts = [self.quantize(w[i], amax[i]) for i in range(w.shape[0])]
        return {s: torch.stack([p[s] for p in parts]) for s in parts[0]}

    def input_scale(self, act_amax: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self, parts: Parts) -> torch.Tensor:
        raise NotImplementedError


class BF16(Format):
    def specs(self, shape):
        return {"weight": ("BF16", tuple(shape))}

    def quantize(self, w, amax):
        return {"weight": w.to(torch.bfloat16)}

    def dequantize(self, parts):
        return parts["weight"].to(torch.bfloat16)


class FP8(Format):
    quant_algo = "FP8"
    calibrated = True

    def specs(self, shape):
        return {"weight": ("F8_E4M3", tuple(shape)), "weight_scale": ("F32", ())}

    amax_scale_names = ("weight_scale",)

    def amax_scales(self, amax):
        return {"weight_scale": _cpu_div(amax, E4M3_MAX)}

    def quantize(self, w, amax):
        scale = _cpu_scale(amax, E4M3_MAX)
        if w.is_cuda:
            from .kernels.quantize import fp8_quantize

            return {"weight": fp8_quantize(w, scale), "weight_scale": scale}
        # the division happens in the weight's dtype (bf16), as ModelOpt does: an fp32 division
        # rounds differently for some values
        return {"weight": (w.to(torch.bfloat16) / scale).to(torch.float8_e4m3fn), "weight_scale": scale}

    def input_scale(self, act_amax):
        return (act_amax.float() / E4M3_MAX).reshape(())

    def dequantize(self, parts):
        return (parts["weight"].float() * parts["weight_scale"].float()).to(torch.bfloat16)


class FP8Block(Format):
    quant_algo = "FP8_BLOCK"

    def specs(self, shape):
        b = self.config.block
        out, inp = shape
        return {"weight": ("F8_E4M3", (out, inp)), "weight_scale_inv": ("F32", (-(-out // b), -(-inp // b)))}

    def quantize(self, w, amax):
        b = self.config.block
        if w.is_cuda:
            from .kernels.quantize import fp8_block_quantize

            q, scale = fp8_block_quantize(w, b)
            return {"weight": q, "weight_scale_inv": scale}
        out, inp = w.shape
        wf = _pad_to(w.float(), b)
        blocks = wf.reshape(wf.shape[0] // b, b, wf.shape[1] // b, b)
        scale = blocks.abs().amax(dim=(1, 3)) / E4M3_MAX
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = (blocks / scale[:, None, :, None]).reshape(wf.shape)[:out, :inp]
        return {"weight": q.to(torch.float8_e4m3fn), "weight_scale_inv": scale}

    def dequantize(self, parts):
        b = self.config.block
        q, s = parts["weight"], parts["weight_scale_inv"].float()
        full = s.repeat_interleave(b, 0).repeat_interleave(b, 1)[: q.shape[0], : q.shape[1]]
        return (q.float() * full).to(torch.bfloat16)


class NVFP4(Format):
    calibrated = True
    shares_fusion_amax = True

    def __init__(self, config: NVFP4Config) -> None:
        super().__init__(config)
        self.quant_algo = "W4A16_NVFP4" if config.weight_only else "NVFP4"
        self.calibrated = not config.weight_only

    def specs(self, shape):
        out, inp = shape
        g = self.config.group_size
        return {
            "weight": ("U8", (out, inp // 2)),
            "weight_scale": ("F8_E4M3", (out, inp // g)),
            "weight_scale_2": ("F32", ()),
        }

    def cannot_hold(self, shape):
        g = self.config.group_size
        return f"input dim {shape[-1]} is not a multiple of the group size {g}" if shape[-1] % g else None

    amax_scale_names = ("weight_scale_2",)

    def amax_scales(self, amax):
        return {"weight_scale_2": _cpu_div(amax, E2M1_MAX * E4M3_MAX)}

    def quantize(self, w, amax):
        ws2 = _cpu_scale(amax, E2M1_MAX * E4M3_MAX)
        if w.is_cuda:
            from .kernels.quantize import nvfp4_quantize

            packed, sf = nvfp4_quantize(w, ws2)
            return {"weight": packed, "weight_scale": sf, "weight_scale_2": ws2}
        rows = w.reshape(-1, w.shape[-1])
        packed = torch.empty(rows.shape[0], rows.shape[1] // 2, dtype=torch.uint8)
        scales = torch.empty(rows.shape[0], rows.shape[1] // self.config.group_size, dtype=torch.float8_e4m3fn)
        step = max(1, ROWS_ELEMENTS // rows.shape[1])  # row blocks small enough to stay in cache
        for i in range(0, rows.shape[0], step):
            codes, sf = nvfp4_codes(rows[i : i + step], ws2, self.config.group_size)
            packed[i : i + step] = pack_nibbles(codes)
            scales[i : i + step] = sf
        return {
            "weight": packed.reshape(*w.shape[:-1], -1),
            "weight_scale": scales.reshape(*w.shape[:-1], -1),
            "weight_scale_2": ws2,
        }

    def quantize_stacked(self, w, amax):
        if not w.is_cuda:
            return super().quantize_stacked(w, amax)
        from .kernels.quantize import nvfp4_quantize

        ws2 = _cpu_div(amax, E2M1_MAX * E4M3_MAX)  # one per expert
        packed, sf = nvfp4_quantize(w, ws2)
        return {"weight": packed, "weight_scale": sf, "weight_scale_2": ws2}

    def input_scale(self, act_amax):
        return (act_amax.float() / (E2M1_MAX * E4M3_MAX)).reshape(())

    def dequantize(self, parts):
        g = self.config.group_size
        values = E2M1_VALUES[unpack_nibbles(parts["weight"]).long()]
        sf = parts["weight_scale"].float().repeat_interleave(g, -1)
        return (values * sf * parts["weight_scale_2"].float()).to(torch.bfloat16)


def _cpu_scale(amax: torch.Tensor, divisor: float) -> torch.Tensor:
    """amax / divisor as a 0-dim fp32 on the CPU. Always on the CPU: CUDA torch divides a tensor by a
    scalar through its reciprocal, which is 1 ulp off for some values; the CPU division is exact."""
    return _cpu_div(amax, divisor).reshape(())


def _cpu_div(amax: torch.Tensor, divisor: float) -> torch.Tensor:
    return amax.detach().float().cpu() / divisor


def nvfp4_codes(w: torch.Tensor, ws2: torch.Tensor, group: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """E2M1 codes (uint8, one per element) and E4M3 block scales of `w` under global scale `ws2` (SPEC §2)."""
    wf = w.float().reshape(*w.shape[:-1], w.shape[-1] // group, group)
    block_amax = wf.abs().amax(-1)
    s = block_amax / (E2M1_MAX * ws2)  # this exact order: amax / 6 / ws2 rounds differently
    s = torch.where(s == 0, torch.ones_like(s), s)
    sf = s.clamp(2**-9, E4M3_MAX).to(torch.float8_e4m3fn)
    x = wf / (sf.float() * ws2).unsqueeze(-1)
    return e2m1(x).reshape(w.shape), sf


def e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round to E2M1 (half to even on {0, .5, 1, 1.5, 2, 3, 4, 6}, saturating); sign in bit 3."""
    a = x.abs()
    # ties go to the even code: down at 0.25, 1.25, 2.5, 5; up at 0.75, 1.75, 3.5
    code = (a > 0.25).to(torch.uint8)
    code += a >= 0.75
    code += a > 1.25
    code += a >= 1.75
    code += a > 2.5
    code += a >= 3.5
    code += a > 5.0
    code += (x < 0).to(torch.uint8) << 3
    return code


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte, element 2k in the low nibble."""
    return (codes[..., 1::2] << 4) | codes[..., 0::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)


def _pad_to(w: torch.Tensor, b: int) -> torch.Tensor:
    pad_r, pad_c = -w.shape[0] % b, -w.shape[1] % b
    return torch.nn.functional.pad(w, (0, pad_c, 0, pad_r)) if pad_r or pad_c else w


FORMATS: dict[str, Format] = {
    "bf16": BF16(BF16Config()),
    "fp8": FP8(FP8Config()),
    "fp8-block": FP8Block(FP8BlockConfig()),
    "nvfp4": NVFP4(NVFP4Config()),
    "w4a16-nvfp4": NVFP4(NVFP4Config(weight_only=True)),
}


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise StepquantError(f"unknown format '{name}' (choose from {', '.join(FORMATS)})") from None


def detect_format(parts: dict[str, str]) -> Format:
    """The input format of a Linear from its tensors' suffix -> dtype (for dequantizing a source)."""
    w = parts.get("weight")
    if w == "U8" and parts.get("weight_scale") == "F8_E4M3":
        return FORMATS["nvfp4"]
    if w in ("F8_E4M3",) and "weight_scale_inv" in parts:
        return FORMATS["fp8-block"]
    if w in ("F8_E4M3",) and "weight_scale" in parts:
        return FORMATS["fp8"]
    if w in ("BF16", "F16", "F32"):
        return FORMATS["bf16"]
    raise StepquantError(f"unrecognised weight format: {parts}")
