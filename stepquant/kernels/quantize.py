"""Weight-quantization kernels. Same numbers as the CPU formats, bit for bit (SPEC §2-§3):
divisions are correctly rounded (`div_rn`), and the roundings to BF16 and E4M3 are done on the bits
(round to nearest even), which is exact on the GPU and under the interpreter alike (the interpreter's
own float8/bfloat16 casts round ties and carries differently).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting


@triton.jit
def _e2m1(x):
    """E2M1 code (int32, sign in bit 3) of fp32 x, round half to even, saturating at 6; on the bits.
    Below 1 the grid is multiples of 0.5: adding 2^22 (whose fp32 ulp is 0.5) rounds there, and the
    low bits of the sum are the code. From 1 up, rounding the fp32 to one mantissa bit gives
    (exponent, mantissa bit), i.e. the code + 252; then saturate at code 7 (6.0)."""
    a = tl.abs(x)
    small = (a + 4194304.0).to(tl.int32, bitcast=True) - 0x4A800000
    bits = a.to(tl.int32, bitcast=True)
    big = tl.minimum(((bits + 0x1FFFFF + ((bits >> 22) & 1)) >> 22) - 252, 7)
    code = tl.where(a < 1.0, small, big)
    return code | tl.where(x < 0, 8, 0)  # -0.0 keeps code 0, as on the CPU


@triton.jit
def _bf16_rne(x):
    """fp32 -> the nearest bf16 value (ties to even), returned as fp32."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _e4m3_rne(x):
    """fp32 (|x| <= 448 after rounding) -> (E4M3 bits as uint8, the E4M3 value as fp32), ties to even."""
    a = tl.abs(x)
    bits = a.to(tl.uint32, bitcast=True)
    r = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000  # keep 3 mantissa bits
    e = ((r >> 23) & 0xFF).to(tl.int32) - 127
    normal_code = ((e + 7) << 3) | ((r >> 20) & 7).to(tl.int32)
    sub = (a * 512.0 + 8388608.0) - 8388608.0  # subnormals: multiples of 2^-9, rounded by the fp32 add
    is_normal = a >= 0.015625
    code = tl.where(is_normal, normal_code, sub.to(tl.int32))
    code = tl.minimum(code, 0x7E)  # 448 is the largest finite E4M3 value
    value = tl.where(is_normal, r.to(tl.float32, bitcast=True), sub * 0.001953125)
    value = tl.minimum(value, 448.0)
    sign = (x.to(tl.uint32, bitcast=True) >> 31) != 0  # the sign bit: -0.0 and flushed denormals too
    return (code | tl.where(sign, 0x80, 0)).to(tl.uint8), tl.where(sign, -value, value)


@triton.jit
def _nvfp4_weight_kernel(
    w_ptr, ws2_ptr, q_ptr, sf_ptr,
    R, C, rows_per_group,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, FAST_DIV: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_R, BLOCK_C] tile of a row-major [R, C] bf16 weight -> packed codes and E4M3 scales.

    The weight is read as int32 words, each holding the bf16 pair (2k, 2k+1) that one output byte
    packs (the low half is element 2k), addressed as [rows, 16-blocks, 8 words] so that the block
    reductions and the stores need no reshapes.
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    NB: tl.constexpr = BLOCK_C // 16
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    blocks = pid_c * NB + tl.arange(0, NB)
    words = tl.arange(0, 8)
    rmask = rows < R
    bmask = rmask[:, None] & (blocks[None, :] < C // 16)
    offs = rows[:, None, None] * (C // 2) + blocks[None, :, None] * 8 + words[None, None, :]
    mask = bmask[:, :, None]
    w = tl.load(w_ptr + offs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    even = (w << 16).to(tl.float32, bitcast=True)
    odd = (w & 0xFFFF0000).to(tl.float32, bitcast=True)
    ws2 = tl.load(ws2_ptr + rows // rows_per_group, mask=rmask, other=1.0)
    amax = tl.maximum(tl.max(tl.abs(even), axis=2), tl.max(tl.abs(odd), axis=2))
    s = tl.math.div_rn(amax, 6.0 * ws2[:, None])
    s = tl.where(s == 0.0, 1.0, s)
    s = tl.minimum(tl.maximum(s, 0.001953125), 448.0)
    sf_bits, sf_value = _e4m3_rne(s)
    denom = (sf_value * ws2[:, None])[:, :, None]
    if FAST_DIV:
        # correctly rounded w / denom from one division per block: q0 = w * RN(1/denom), then one
        # Newton step on the exact remainder (Markstein); benchmarks/gpu_quantize.py checks it
        # against div_rn bit for bit at scale
        r = tl.math.div_rn(1.0, denom)
        q0 = even * r
        xe = tl.fma(tl.fma(-q0, denom, even), r, q0)
        q1 = odd * r
        xo = tl.fma(tl.fma(-q1, denom, odd), r, q1)
    else:
        xe = tl.math.div_rn(even, denom)
        xo = tl.math.div_rn(odd, denom)
    tl.store(q_ptr + offs, _e2m1(xe) | (_e2m1(xo) << 4), mask=mask)
    tl.store(sf_ptr + rows[:, None] * (C // 16) + blocks[None, :], sf_bits, mask=bmask)


def nvfp4_quantize(w: torch.Tensor, ws2: torch.Tensor, fast_div: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed E2M1 codes (uint8 [..., in/2]) and E4M3 block scales ([..., in/16]) of `w` (bf16).

    `ws2` is a 0-dim global scale, or one per leading index of a stacked `[E, out, in]` weight.
    """
    shape = w.shape
    C = shape[-1]
    assert C % 16 == 0, "NVFP4 needs the input dim to be a multiple of 16"
    rows = w.reshape(-1, C).contiguous().to(torch.bfloat16)
    R = rows.shape[0]
    ws2 = ws2.reshape(-1).to(device=w.device, dtype=torch.float32).contiguous()
    groups = ws2.numel()
    assert R % groups == 0
    q = torch.empty(R, C // 2, dtype=torch.uint8, device=w.device)
    sf = torch.empty(R, C // 16, dtype=torch.uint8, device=w.device)
    block_r, block_c = (4, 64) if interpreting() else (16, 512)  # an H100 sweep: BENCHMARKS.md
    block_c = min(block_c, triton.next_power_of_2(C))
    grid = (triton.cdiv(R, block_r), triton.cdiv(C, block_c))
    fast = not interpreting() if fast_div is None else fast_div
    _nvfp4_weight_kernel[grid](rows.view(torch.int32), ws2, q, sf, R, C, R // groups,
                               BLOCK_R=block_r, BLOCK_C=block_c, FAST_DIV=fast)  # fmt: skip
    return q.reshape(*shape[:-1], C // 2), sf.view(torch.float8_e4m3fn).reshape(*shape[:-1], C // 16)


@triton.jit
def _fp8_tensor_kernel(w_ptr, scale_ptr, q_ptr, N, BLOCK: tl.constexpr):
    """(W_bf16 / scale) rounded to bf16, then to E4M3: ModelOpt's FP8 division happens in bf16."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr)
    code, _ = _e4m3_rne(_bf16_rne(tl.math.div_rn(w, scale)))
    tl.store(q_ptr + offs, code, mask=mask)


def fp8_quantize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-tensor FP8 E4M3 codes of `w` for a 0-dim fp32 `scale`."""
    flat = w.reshape(-1).contiguous().to(torch.bfloat16)
    q = torch.empty(flat.numel(), dtype=torch.uint8, device=w.device)
    block = 1024 if interpreting() else 4096
    scale = scale.reshape(1).to(device=w.device, dtype=torch.float32)
    _fp8_tensor_kernel[(triton.cdiv(flat.numel(), block),)](flat, scale, q, flat.numel(), BLOCK=block)
    return q.view(torch.float8_e4m3fn).reshape(w.shape)


@triton.jit
def _fp8_block_kernel(w_ptr, q_ptr, s_ptr, R, C, SB: tl.constexpr):
    """One SB x SB block: scale = amax / 448 (1 where the block is all zeros), codes = W / scale."""
    br = tl.program_id(0)
    bc = tl.program_id(1)
    rows = br * SB + tl.arange(0, SB)
    cols = bc * SB + tl.arange(0, SB)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    w = tl.load(w_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(w), axis=1), axis=0)
    scale = tl.math.div_rn(amax, 448.0)
    scale = tl.where(scale == 0.0, 1.0, scale)
    code, _ = _e4m3_rne(tl.math.div_rn(w, scale))
    tl.store(q_ptr + rows[:, None] * C + cols[None, :], code, mask=mask)
    tl.store(s_ptr + br * tl.cdiv(C, SB) + bc, scale)


def fp8_block_quantize(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Block FP8: E4M3 codes and fp32 `weight_scale_inv` per block x block tile of a 2-D `w`."""
    R, C = w.shape
    src = w.contiguous().to(torch.bfloat16)
    q = torch.empty(R, C, dtype=torch.uint8, device=w.device)
    s = torch.empty(triton.cdiv(R, block), triton.cdiv(C, block), dtype=torch.float32, device=w.device)
    _fp8_block_kernel[(s.shape[0], s.shape[1])](src, q, s, R, C, SB=block)
    return q.view(torch.float8_e4m3fn), s
