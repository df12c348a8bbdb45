"""NVFP4 linear layers on GPUs without FP4 tensor cores (Hopper), SPEC §9.

- `w4a16`: FP4 weights dequantized in registers (exact `code x block scale` values in BF16), BF16
  activations, BF16 MMA with fp32 accumulation, `x weight_scale_2` in fp32: what Hopper engines run.
- `w4a4`: activations quantized to NVFP4 per 16-block with Blackwell's recipe (approximate reciprocals
  through `rcp.approx.ftz.f32`), both operands fed to the MMA as exact `code x scale` BF16 values, fp32
  accumulation, `alpha = input_scale x weight_scale_2` in fp32: what Blackwell computes, up to summation
  order.

Under the Triton interpreter (CPU, for CI) the approximate reciprocals are exact divisions and the
operands are cast to fp32 before `tl.dot` (the interpreter's BF16 dot is wrong).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dataclasses import dataclass

from . import interpreting
from .quantize import _e2m1, _e4m3_rne


@triton.jit
def _e4m3_value(bits):
    """fp32 value of E4M3 bits (uint8); block scales are never negative or NaN."""
    b = bits.to(tl.int32)
    e = (b >> 3) & 15
    m = (b & 7).to(tl.float32)
    scale = ((e + 117) << 23).to(tl.float32, bitcast=True)  # 2^(e-10)
    return tl.where(e == 0, m * 0.001953125, (8.0 + m) * scale)


@triton.jit
def _rcp(x, APPROX: tl.constexpr):
    if APPROX:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)  # fmt: skip
    else:
        return 1.0 / x


@triton.jit
def _act_scales(vmax, gs, rcp_gs, APPROX: tl.constexpr):
    """Blackwell's per-16-block activation scales from the block maxima: (E4M3 bits, E4M3 value, the
    multiplier that takes the block to E2M1 range; 0 for an all-zero block)."""
    sf_bits, sf = _e4m3_rne(tl.minimum(gs * (vmax * _rcp(6.0, APPROX)), 448.0))
    out_scale = tl.where(vmax != 0.0, _rcp(tl.where(vmax != 0.0, sf * rcp_gs, 1.0), APPROX), 0.0)
    return sf_bits, sf, out_scale


@triton.jit
def _fp4_bits_to_f32(code):
    """E2M1 code (sign bit 3) -> its value / 2^14, decoded on the bits: the magnitude goes into an fp16's
    exponent/mantissa fields (0.5 lands on the fp16 subnormal 2^-15), the caller multiplies by 2^14."""
    c = code.to(tl.uint16)
    half = ((c & 7) << 9) | ((c & 8) << 12)
    return half.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _w_tile(w_ptr, sf_ptr, rows, rmask, k0, K, WFMT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Even and odd K columns ([BN, BK/2] each, fp32) of a row-major weight tile: NVFP4 (WFMT 0) as exact
    `code x block scale` values, BF16 (1) and FP8 bits (2) as stored."""
    HK: tl.constexpr = BK // 2
    if WFMT == 0:
        rkh = k0 // 2 + tl.arange(0, HK)  # byte (= column pair) index
        packed = tl.load(w_ptr + rows[:, None] * (K // 2) + rkh[None, :], mask=rmask[:, None] & (rkh[None, :] < K // 2), other=0)
        rks = k0 // 16 + tl.arange(0, BK // 16)
        sfw = _e4m3_value(tl.load(sf_ptr + rows[:, None] * (K // 16) + rks[None, :],
                                  mask=rmask[:, None] & (rks[None, :] < K // 16), other=0)) * 16384.0  # fmt: skip
        sfw = tl.reshape(tl.broadcast_to(sfw[:, :, None], (BN, BK // 16, 8)), (BN, HK))
        w_even = _fp4_bits_to_f32(packed & 15) * sfw
        w_odd = _fp4_bits_to_f32(packed >> 4) * sfw
    else:
        rk = k0 + tl.arange(0, BK)
        w = tl.load(w_ptr + rows[:, None] * K + rk[None, :], mask=rmask[:, None] & (rk[None, :] < K), other=0)
        if WFMT == 2:
            wf = _e4m3_value(w & 0x7F)
            w = tl.where((w & 0x80) != 0, -wf, wf)
        w_even, w_odd = tl.split(tl.reshape(w.to(tl.float32), (BN, HK, 2)))
    return w_even, w_odd


@triton.jit
def _a_tile(a_ptr, rows, rmask, stride, k0, K, gs, rcp_gs, isc, AQ: tl.constexpr, APPROX: tl.constexpr,
            BM: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    """Even and odd K columns ([BM, BK/2] each, fp32) of an activation tile, as the MMA sees them: as
    given (AQ 0), NVFP4-quantized with Blackwell's recipe and dequantized exactly (1), or FP8-quantized
    with the static scale `isc` (2)."""
    HK: tl.constexpr = BK // 2
    rk = k0 + tl.arange(0, BK)
    a = tl.load(a_ptr + rows[:, None] * stride + rk[None, :], mask=rmask[:, None] & (rk[None, :] < K), other=0.0)
    a_even, a_odd = tl.split(tl.reshape(a.to(tl.float32), (BM, HK, 2)))
    if AQ == 1:
        e3 = tl.reshape(a_even, (BM, BK // 16, 8))
        o3 = tl.reshape(a_odd, (BM, BK // 16, 8))
        vmax = tl.maximum(tl.max(tl.abs(e3), axis=2), tl.max(tl.abs(o3), axis=2))
        _, sfa, out_scale = _act_scales(vmax, gs, rcp_gs, APPROX)
        sfa16 = sfa * 16384.0
        a_even = tl.reshape(_fp4_bits_to_f32(_e2m1(e3 * out_scale[:, :, None])) * sfa16[:, :, None], (BM, HK))
        a_odd = tl.reshape(_fp4_bits_to_f32(_e2m1(o3 * out_scale[:, :, None])) * sfa16[:, :, None], (BM, HK))
    elif AQ == 2:
        _, a_even = _e4m3_rne(tl.minimum(tl.maximum(tl.math.div_rn(a_even, isc), -448.0), 448.0))
        _, a_odd = _e4m3_rne(tl.minimum(tl.maximum(tl.math.div_rn(a_odd, isc), -448.0), 448.0))
    return a_even, a_odd


@triton.jit
def _mma(acc, a_even, a_odd, w_even, w_odd, DOT_FP32: tl.constexpr):
    """acc + a @ w.T over the even and odd columns; operands are exact in BF16."""
    if DOT_FP32:
        acc += tl.dot(a_even, tl.trans(w_even), input_precision="ieee")
        acc += tl.dot(a_odd, tl.trans(w_odd), input_precision="ieee")
    else:
        acc += tl.dot(a_even.to(tl.bfloat16), tl.trans(w_even.to(tl.bfloat16)))
        acc += tl.dot(a_odd.to(tl.bfloat16), tl.trans(w_odd.to(tl.bfloat16)))
    return acc


@triton.jit
def _nvfp4_linear_kernel(
    a_ptr, w_ptr, sf_ptr, out_ptr, scalars_ptr,
    M, N, K, K_PER_SPLIT,
    stride_am, stride_om,
    W4A4: tl.constexpr, APPROX: tl.constexpr, DOT_FP32: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """One [BM, BN] output tile over one K range; with SPLIT > 1 the raw fp32 partial sums go to
    out_ptr[split] and are added up (deterministically) and scaled by the caller.

    K is walked as even and odd columns: the low nibbles of a weight byte meet the even activation
    columns and the high nibbles the odd ones, so nothing is interleaved in registers.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    alpha = tl.load(scalars_ptr)  # ws2 (w4a16) or input_scale * ws2 (w4a4)
    gs = tl.load(scalars_ptr + 1)  # 1 / input_scale
    rcp_gs = _rcp(gs, APPROX)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(pid_k * K_PER_SPLIT, tl.minimum((pid_k + 1) * K_PER_SPLIT, K), BK):
        a_even, a_odd = _a_tile(a_ptr, rm, rm < M, stride_am, k0, K, gs, rcp_gs, 1.0, 1 if W4A4 else 0, APPROX, BM, BK)
        w_even, w_odd = _w_tile(w_ptr, sf_ptr, rn, rn < N, k0, K, 0, BN, BK)
        acc = _mma(acc, a_even, a_odd, w_even, w_odd, DOT_FP32)
    omask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT == 1:
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], (acc * alpha).to(out_ptr.dtype.element_ty), mask=omask)
    else:
        tl.store(out_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :], acc, mask=omask)


def _blocks(m: int, n: int, k: int) -> tuple[int, int, int, int, int, int]:
    """(BM, BN, BK, warps, K splits, stages): decode shapes split K so that the grid fills the GPU."""
    if interpreting():
        return 16, 16, 32, 4, (2 if k >= 64 else 1), 1
    if m <= 16:
        bm, bn, bk, warps = 16, 64, 128, 4
    elif m <= 64:
        bm, bn, bk, warps = 64, 64, 128, 4
    else:
        bm, bn, bk, warps = 128, 128, 64, 8
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = 1
    while tiles * split < 264 and k // (split * 2) >= 4 * bk:  # ~2 programs per SM on 132 SMs
        split *= 2
    return bm, bn, bk, warps, split, 3


@dataclass
class NVFP4Weight:
    """An NVFP4 Linear's tensors on the GPU, with its fp32 scalars precomputed on the same device
    (alpha for each mode and 1/input_scale), so a call needs no host synchronization."""

    weight: torch.Tensor  # uint8 [N, K/2]
    weight_scale: torch.Tensor  # E4M3 [N, K/16]
    scalars: torch.Tensor  # fp32 [4]: ws2, input_scale * ws2, 1 / input_scale, 1

    @classmethod
    def from_parts(cls, weight, weight_scale, weight_scale_2, input_scale=None) -> NVFP4Weight:
        ws2 = weight_scale_2.detach().float().reshape(()).cpu()
        isc = (input_scale.detach().float().reshape(()).cpu() if input_scale is not None
               else torch.tensor(float("nan")))  # fmt: skip
        one = torch.tensor(1.0)
        scalars = torch.stack([ws2, isc * ws2, one / isc, one])  # divided on the CPU: exactly rounded
        return cls(weight.contiguous(), weight_scale.contiguous().view(torch.uint8), scalars.to(weight.device))

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape[0], self.weight.shape[1] * 2


@triton.jit
def _splitk_reduce_kernel(part_ptr, out_ptr, scalars_ptr, MN, SPLIT: tl.constexpr, ALPHA_IDX: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT):  # a fixed order: deterministic
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, (acc * tl.load(scalars_ptr + ALPHA_IDX)).to(out_ptr.dtype.element_ty), mask=mask)


def nvfp4_linear(x: torch.Tensor, w: NVFP4Weight, mode: str = "w4a16", out_dtype: torch.dtype = torch.bfloat16,
                 config: tuple[int, ...] | None = None) -> torch.Tensor:  # fmt: skip
    """`x @ W.T` for an NVFP4 weight. `out_dtype=torch.float32` keeps the fp32 accumulator
    (for checking against fp64); `config` = (BM, BN, BK, warps, splits, stages) overrides the tiling."""
    if mode not in ("w4a16", "w4a4"):
        raise ValueError(f"mode must be w4a16 or w4a4, not {mode!r}")
    *lead, K = x.shape
    N = w.weight.shape[0]
    a = x.reshape(-1, K)
    if a.dtype != torch.bfloat16 or not a.is_contiguous():
        a = a.to(torch.bfloat16).contiguous()
    M = a.shape[0]
    bm, bn, bk, warps, split, stages = config or _blocks(M, N, K)
    per_split = triton.cdiv(triton.cdiv(K, split), bk) * bk
    out = torch.empty(M, N, dtype=out_dtype, device=x.device)
    target = out if split == 1 else torch.empty(split, M, N, dtype=torch.float32, device=x.device)
    # scalars: [ws2, input_scale * ws2, 1 / input_scale, 1]; the kernel reads alpha at 0 and gs at 1,
    # so pass the matching view for the mode
    scalars = w.scalars[0:] if mode == "w4a16" else w.scalars[1:]
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn), split)
    _nvfp4_linear_kernel[grid](
        a, w.weight, w.weight_scale, target, scalars,
        M, N, K, per_split, a.stride(0), out.stride(0),
        W4A4=mode == "w4a4", APPROX=not interpreting(), DOT_FP32=interpreting(),
        BM=bm, BN=bn, BK=bk, SPLIT=split, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(M * N, block),)](target, out, scalars, M * N, SPLIT=split, ALPHA_IDX=0, BLOCK=block)
    return out.reshape(*lead, N)


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, sf_ptr, scalars_ptr, M, K, APPROX: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    mask = (rm[:, None] < M) & (rk[None, :] < K)
    x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=mask, other=0.0).to(tl.float32)
    gs = tl.load(scalars_ptr + 1)
    x3 = tl.reshape(x, (BM, BK // 16, 16))
    sf_bits, _, out_scale = _act_scales(tl.max(tl.abs(x3), axis=2), gs, _rcp(gs, APPROX), APPROX)
    codes = _e2m1(x3 * out_scale[:, :, None])
    lo, hi = tl.split(tl.reshape(codes, (BM, BK // 2, 2)))
    rkh = tl.program_id(1) * (BK // 2) + tl.arange(0, BK // 2)
    tl.store(q_ptr + rm[:, None] * (K // 2) + rkh[None, :], lo | (hi << 4), mask=(rm[:, None] < M) & (rkh[None, :] < K // 2))
    rks = tl.program_id(1) * (BK // 16) + tl.arange(0, BK // 16)
    tl.store(sf_ptr + rm[:, None] * (K // 16) + rks[None, :], sf_bits, mask=(rm[:, None] < M) & (rks[None, :] < K // 16))


def nvfp4_quantize_activations(x: torch.Tensor, input_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blackwell's NVFP4 activation quantization as the w4a4 linear does it: packed codes, E4M3 scales."""
    K = x.shape[-1]
    a = x.reshape(-1, K).to(torch.bfloat16).contiguous()
    M = a.shape[0]
    isc = input_scale.detach().float().reshape(()).cpu()
    scalars = torch.stack([isc, torch.tensor(1.0) / isc]).to(x.device)
    q = torch.empty(M, K // 2, dtype=torch.uint8, device=x.device)
    sf = torch.empty(M, K // 16, dtype=torch.uint8, device=x.device)
    bm, bk = (4, 32) if interpreting() else (16, 256)
    _act_quant_kernel[(triton.cdiv(M, bm), triton.cdiv(K, bk))](a, q, sf, scalars, M, K, APPROX=not interpreting(), BM=bm, BK=bk)
    return q.reshape(*x.shape[:-1], K // 2), sf.view(torch.float8_e4m3fn).reshape(*x.shape[:-1], K // 16)


# -- plain-torch references ------------------------------------------------------------------------
def dequantize_nvfp4(packed: torch.Tensor, sf: torch.Tensor, global_scale: float | torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    from ..formats import E2M1_VALUES, unpack_nibbles

    values = E2M1_VALUES.to(packed.device, dtype)[unpack_nibbles(packed).long()]
    return values * sf.to(dtype).repeat_interleave(16, -1) * torch.as_tensor(global_scale, dtype=dtype)


def quantize_activations_reference(x: torch.Tensor, input_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Blackwell's recipe in torch with exact reciprocals (the GPU's rcp.approx can differ for
    data-dependent values): packed codes and E4M3 scales."""
    from ..formats import e2m1, pack_nibbles

    xf = x.float().reshape(*x.shape[:-1], -1, 16)
    gs = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(input_scale, dtype=torch.float32)
    vmax = xf.abs().amax(-1)
    sf = (gs * (vmax * torch.tensor(1 / 6, dtype=torch.float32))).clamp(max=448).to(torch.float8_e4m3fn)
    rcp_gs = 1.0 / gs
    out_scale = torch.where(vmax != 0, 1.0 / (sf.float() * rcp_gs), torch.zeros_like(vmax))
    codes = e2m1(xf * out_scale.unsqueeze(-1)).reshape(x.shape)
    return pack_nibbles(codes), sf


def blackwell_activations(x: torch.Tensor, input_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 activations exactly as SPEC §9 computes them on this device: on CUDA through the
    activation kernel, whose `rcp.approx` no correctly rounded torch division reproduces (it moves
    codes that sit on a rounding midpoint); elsewhere the torch recipe (the interpreter's kernel
    computes the same). Checked against the recipe by the activation tests."""
    if x.is_cuda:
        return nvfp4_quantize_activations(x, torch.tensor(float(input_scale)))
    return quantize_activations_reference(x, float(input_scale))


def nvfp4_linear_reference(x, weight, weight_scale, weight_scale_2, input_scale=None, mode="w4a16") -> torch.Tensor:
    """fp64 reference: dequantized operands (activations quantized for w4a4), fp64 matmul, alpha."""
    w = dequantize_nvfp4(weight, weight_scale, 1.0)
    if mode == "w4a4":
        qa, sfa = blackwell_activations(x, float(input_scale))
        a = dequantize_nvfp4(qa, sfa, 1.0)
        alpha = float(torch.tensor(float(input_scale), dtype=torch.float32) * torch.tensor(float(weight_scale_2), dtype=torch.float32))
    else:
        a = x.to(torch.float64)
        alpha = float(weight_scale_2)
    return (a @ w.T) * alpha
