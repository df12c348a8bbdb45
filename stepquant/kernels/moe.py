"""Fused MoE over stacked experts (SPEC §9): tokens sorted by expert, one grouped GEMM for gate_up with
the SwiGLU (Step clamp optional) in its epilogue, one for down with the routing weight, then the combine.

Experts are NVFP4 (`w4a16`: BF16 activations; `w4a4`: activations quantized with Blackwell's recipe, the
SwiGLU output re-quantized with the down input scale), FP8 (static per-tensor activations, W8A8 emulated
exactly on the BF16 MMA) or BF16. One activation scale per projection and layer: the max over experts.
NVFP4 experts are stored in the linear's blocks and run through the linear's mma.sync step: at decode (up to 32 pairs,
while they fall on distinct experts) without routing, one program per pair (gate_up) and per token (down, with the
combine); up to MOE_MMA_SYNC_MAX_SHARING pairs an expert routed in blocks of 8 pairs of one expert; beyond, Triton's
MMA over blocks of 16 to 64 pairs (`sharing`, `MmaSync.rule`, `_moe_blocks`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import interpreting
from .quantize import _bf16_rne, _e4m3_rne
from .linear import (_MMA_SYNC_PTX, _blocked_codes, _e4m3_value, _fit, _from_blocks, _mma_sync_range, _mma_sync_store, _mma_t, _nvfp4_tile,
                     _sets, _sets_sum_ptx, _step_checks, _to_blocks, _unblocked_codes, _warp_sum_ptx, blackwell_activations,
                     dequantize_nvfp4, nvfp4_fake_quantize)  # fmt: skip

WFMTS = {"bf16": 1, "fp8": 2}  # the reference kernel's weight formats


@dataclass
class Experts:
    """One stacked projection of a layer's experts on the device: weight [E, N, K] (NVFP4 packed
    [E, N, K/2] with E4M3 scales [E, N, K/16]; FP8 as uint8 bits), and per-expert fp32 scalars
    [E, 4] = (weight scale, input_scale x weight scale, 1 / input_scale, input_scale). `blocked`: each NVFP4 expert
    in NVFP4Weight's blocks (the mma.sync kernels need them)."""

    fmt: str
    weight: torch.Tensor
    weight_scale: torch.Tensor | None
    scalars: torch.Tensor
    blocked: bool = False

    @classmethod
    def nvfp4(cls, weight, weight_scale, weight_scale_2, input_scale=None) -> Experts:
        """Blocked wherever N is a multiple of 16 and K of 128 (one copy of the weight; the blocks of 16 rows never
        straddle two experts)."""
        e, n, c = weight.shape
        if tuple(weight_scale.shape) != (e, n, c // 8) or c % 8:
            raise ValueError(f"NVFP4 experts: weight {tuple(weight.shape)} (packed [E, N, K/2]) needs weight_scale "
                             f"[E, N, K/16] = {(e, n, c // 8)}, not {tuple(weight_scale.shape)}")  # fmt: skip
        weight_scale = weight_scale.view(torch.uint8)
        blocked = n % 16 == 0 and c % 64 == 0
        if blocked:
            weight = _blocked_codes(_to_blocks(weight.reshape(e * n, c), 64)).view(e, n, c)
            weight_scale = _to_blocks(weight_scale.reshape(e * n, c // 8), 8).view(e, n, c // 8)
        return cls("nvfp4", weight.contiguous(), weight_scale.contiguous(),
                   _scalars(weight_scale_2, input_scale, e, weight.device), blocked)  # fmt: skip

    @classmethod
    def fp8(cls, weight, weight_scale, input_scale) -> Experts:
        return cls("fp8", weight.contiguous().view(torch.uint8), None,
                   _scalars(weight_scale, input_scale, weight.shape[0], weight.device))  # fmt: skip

    @classmethod
    def bf16(cls, weight) -> Experts:
        w = weight.to(torch.bfloat16).contiguous()
        return cls("bf16", w, None, _scalars(torch.ones(w.shape[0]), None, w.shape[0], w.device))

    @property
    def shape(self) -> tuple[int, int, int]:
        e, n, k = self.weight.shape
        return e, n, (k * 2 if self.fmt == "nvfp4" else k)

    def dequantize(self, e: int) -> torch.Tensor:
        """Expert e's fp64 [N, K] weight values times its weight scale (plain torch, for the reference)."""
        s = self.scalars[e, 0].double()
        if self.fmt == "nvfp4":
            w, sf = self.weight[e], self.weight_scale[e]
            if self.blocked:  # the checkpoint's bytes back (plain torch)
                w, sf = _unblocked_codes(_from_blocks(w, 64)), _from_blocks(sf, 8)
            return dequantize_nvfp4(w, sf.view(torch.float8_e4m3fn), 1.0) * s
        if self.fmt == "fp8":
            return self.weight[e].view(torch.float8_e4m3fn).double() * s
        return self.weight[e].double()


def _scalars(weight_scale, input_scale, n_experts: int, device) -> torch.Tensor:
    ws = torch.as_tensor(weight_scale).detach().float().cpu().reshape(-1).expand(n_experts)
    isc = (torch.as_tensor(input_scale).detach().float().cpu().max() if input_scale is not None
           else torch.tensor(float("nan")))  # fmt: skip
    one = torch.ones(n_experts)
    return torch.stack([ws, isc * ws, one / isc, one * isc], 1).contiguous().to(device)  # divided on the CPU


# -- the reference kernel's tiles (BF16 and FP8 experts): even and odd K columns in fp32 ----------
@triton.jit
def _w_tile(w_ptr, rows, rmask, k0, K, WFMT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Even and odd K columns ([BN, BK/2] each, fp32) of a row-major BF16 (WFMT 1) or FP8 (2) weight
    tile (the fused MoE's reference formats; NVFP4 goes through `_nvfp4_tile`)."""
    HK: tl.constexpr = BK // 2
    rk = k0 + tl.arange(0, BK)
    w = tl.load(w_ptr + rows[:, None] * K + rk[None, :], mask=rmask[:, None] & (rk[None, :] < K), other=0)
    if WFMT == 2:
        wf = _e4m3_value(w & 0x7F)
        w = tl.where((w & 0x80) != 0, -wf, wf)
    return tl.split(tl.reshape(w.to(tl.float32), (BN, HK, 2)))


@triton.jit
def _a_tile(a_ptr, rows, rmask, stride, k0, K, isc, AQ: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """Even and odd K columns ([BM, BK/2] each, fp32) of an activation tile, as the MMA sees them: as
    given (AQ 0) or FP8-quantized with the static scale `isc` (2)."""
    HK: tl.constexpr = BK // 2
    rk = k0 + tl.arange(0, BK)
    a = tl.load(a_ptr + rows[:, None] * stride + rk[None, :], mask=rmask[:, None] & (rk[None, :] < K), other=0.0)
    a_even, a_odd = tl.split(tl.reshape(a.to(tl.float32), (BM, HK, 2)))
    if AQ == 2:
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
def _block(ids_ptr, block_expert_ptr, TOPK, GATHER: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """This program's expert (-1: an unused block), its routed pairs (-1: padding), which are valid, their
    activation rows (the token with GATHER, else the pair) and its output columns."""
    e = tl.load(block_expert_ptr + tl.program_id(0))
    ids = tl.load(ids_ptr + tl.program_id(0) * BM + tl.arange(0, BM))
    rows = ids // TOPK if GATHER else ids
    return e, ids, ids >= 0, rows, tl.program_id(1) * BN + tl.arange(0, BN)


@triton.jit
def _epilogue(acc, acc_up, alpha, limit, GLU: tl.constexpr, HAS_LIMIT: tl.constexpr):
    """alpha x the accumulator; with GLU, SwiGLU(gate, up) with the Step clamp (HAS_LIMIT), rounded to
    BF16 on the bits (the interpreter's cast truncates)."""
    y = acc * alpha
    if GLU:
        up = acc_up * alpha
        y = y * tl.sigmoid(y)
        if HAS_LIMIT:
            y = tl.minimum(y, limit)
            up = tl.minimum(tl.maximum(up, -limit), limit)
        y = _bf16_rne(y * up)
    return y


@triton.jit
def _moe_nvfp4_kernel(
    a_ptr, w_ptr, sf_ptr, scalars_ptr, out_ptr, ids_ptr, block_expert_ptr, topk_w_ptr,
    N, K, stride_a, TOPK, limit, ALPHA_IDX,
    GATHER: tl.constexpr, GLU: tl.constexpr, HAS_LIMIT: tl.constexpr, WEIGHTED: tl.constexpr,
    ASM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BLOCKED: tl.constexpr,
):  # fmt: skip
    """`_moe_gemm_kernel` for NVFP4 experts, the way the linear GEMV does it: the expert's rows on the
    MMA's M side, decoded from int32 words into the operand registers, the routed pairs on N;
    activations arrive as given (w4a16) or already rounded to their NVFP4 values (w4a4)."""
    e, ids, valid, rows, rn = _block(ids_ptr, block_expert_ptr, TOPK, GATHER, BM, BN)
    if e < 0:
        return
    nmask = rn < N
    NW = 2 * N if GLU else N
    e64 = e.to(tl.int64)
    w_e = w_ptr + e64 * NW * (K // 8)
    sf_e = sf_ptr + e64 * NW * (K // 64)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    acc_up = tl.zeros((BN, BM), dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptr + rows[:, None] * stride_a + k0 + tl.arange(0, BK)[None, :], mask=valid[:, None], other=0.0)
        acc = _mma_t(acc, _nvfp4_tile(w_e, sf_e, rn, nmask, k0, K, ASM, BN, BK, BLOCKED), a, ASM)
        if GLU:
            acc_up = _mma_t(acc_up, _nvfp4_tile(w_e, sf_e, rn + N, nmask, k0, K, ASM, BN, BK, BLOCKED), a, ASM)
    y = _epilogue(acc, acc_up, tl.load(scalars_ptr + e * 4 + ALPHA_IDX) * 256.0, limit, GLU, HAS_LIMIT)
    if WEIGHTED:
        y = y * tl.load(topk_w_ptr + ids, mask=valid, other=0.0)[None, :]
    tl.store(out_ptr + ids[None, :] * N + rn[:, None], y.to(out_ptr.dtype.element_ty), mask=valid[None, :] & nmask[:, None])


@triton.jit
def _moe_mma_sync_kernel(
    a_ptr, w_ptr, sf_ptr, scalars_ptr, out_ptr, ids_ptr, block_expert_ptr, topk_w_ptr, N, K, stride_a, TOPK, limit,
    ALPHA_IDX, GLU: tl.constexpr, ROUTED: tl.constexpr, HAS_LIMIT: tl.constexpr, ASM: tl.constexpr, W: tl.constexpr,
    P: tl.constexpr, STEP: tl.constexpr, LOAD: tl.constexpr, PX: tl.constexpr, ODD: tl.constexpr, SUM: tl.constexpr,
    SETS: tl.constexpr, SETS_SUM: tl.constexpr,
):  # fmt: skip
    """Blocked NVFP4 experts through the linear's mma.sync step (`_nvfp4_mma_sync_kernel`): 16 weight rows a program;
    GLU (gate_up) with 2 x 1 tiles, the gate's block and the up projection's N rows further on, so that warp 0, which
    gets the sums, writes SwiGLU(gate, up) to h. The second grid axis:
    - decode, GLU: a routed pair (`ids` = topk_ids); its token fills the MMA's 8 token columns (7 padding); W warps
      share K.
    - decode, down: a token; warp j on its pair j (W = P, TOPK rounded up to a power of two; warps past TOPK count
      zero), its sum times alpha and the routing weight, the warps' sums added in a fixed order in shared memory: the
      combine, deterministic.
    - ROUTED: a block of up to 8 pairs of one expert (`route` with BM 8: `ids`, `block_expert`), one a token column;
      W warps share K; down writes each pair's output times its routing weight (fp32), the caller adds a token's.
    Under the interpreter the same sums in fp32 with plain loads."""
    pid_n = tl.program_id(0)
    q = tl.program_id(1)  # the pair, the token or the block
    TR: tl.constexpr = 2 if GLU else 1
    NW = 2 * N if GLU else N  # an expert's weight rows
    if ROUTED:
        e_block = tl.load(block_expert_ptr + q)
        if e_block < 0:
            return
    if ASM:
        elem = tl.arange(0, 32 * W)  # the thread this element must be on
        j = elem // 32
        t = elem % 4
        row = pid_n * 16 + elem % 32 // 4
        if ROUTED:
            e = e_block.to(tl.int64)
            pair = tl.load(ids_ptr + q * 8 + elem % 32 // 4)  # token column g's pair
            if GLU:  # its token's activations
                xrow = tl.where(pair >= 0, pair // TOPK, 0)
            else:  # its row of h
                xrow = tl.where(pair >= 0, pair, 0)
            span = K // W
            kw = j * span
        elif GLU:
            e = tl.load(ids_ptr + q).to(tl.int64)
            xrow = q // TOPK
            span = K // W
            kw = j * span
        else:
            pair = q * TOPK + tl.minimum(j, TOPK - 1)
            e = tl.load(ids_ptr + pair).to(tl.int64)
            xrow = pair
            span = K
            kw = 0
        block = (e * (NW // 16) + row // 16) * (K // 128) + kw // 128  # the warp's first block
        wp = w_ptr + block * 256 + elem % 32 * 4
        sp = sf_ptr.to(tl.pointer_type(tl.uint8)) + block * 128 + elem % 32 * 2
        tw = N // 16 * (K // 128) * 1024  # GLU: bytes from the gate's block to the up projection's
        xp = (a_ptr + xrow.to(tl.int64) * stride_a + kw + 32 * t,)
        c = _mma_sync_range(wp, sp, xp, span, elem, tw, W, TR, 1, STEP, LOAD, PX, ODD, SETS, SETS_SUM)
        if GLU or ROUTED:
            alpha = tl.load(scalars_ptr + e * 4 + ALPHA_IDX) * 256.0
        else:  # each warp's pair: alpha x its routing weight
            alpha = tl.where(j < TOPK, tl.load(scalars_ptr + e * 4 + ALPHA_IDX) * 256.0 * tl.load(topk_w_ptr + pair), 0.0)
            c = (c[0] * alpha, c[1] * alpha, c[2] * alpha, c[3] * alpha)
        if W > 1:
            c = tl.inline_asm_elementwise(SUM, "=&f," * (4 * TR) + "f," * (4 * TR) + "r", c + (elem,),
                                          dtype=(tl.float32,) * (4 * TR), is_pure=False, pack=1)  # fmt: skip
        if GLU:
            f = (_epilogue(c[0], c[4], alpha, limit, True, HAS_LIMIT), _epilogue(c[1], c[5], alpha, limit, True, HAS_LIMIT),
                 _epilogue(c[2], c[6], alpha, limit, True, HAS_LIMIT), _epilogue(c[3], c[7], alpha, limit, True, HAS_LIMIT))  # fmt: skip
        else:
            f = (c[0], c[1], c[2], c[3])
        if ROUTED:  # token columns 2t, 2t + 1: their pairs' rows of the output
            p0 = tl.load(ids_ptr + q * 8 + 2 * t)
            p1 = tl.load(ids_ptr + q * 8 + 2 * t + 1)
            if not GLU:
                w0 = alpha * tl.load(topk_w_ptr + p0, mask=p0 >= 0, other=0.0)
                w1 = alpha * tl.load(topk_w_ptr + p1, mask=p1 >= 0, other=0.0)
                f = (f[0] * w0, f[1] * w1, f[2] * w0, f[3] * w1)
            ty = out_ptr.dtype.element_ty
            tl.store(out_ptr + p0 * N + row, f[0].to(ty), mask=(j == 0) & (p0 >= 0))
            tl.store(out_ptr + p1 * N + row, f[1].to(ty), mask=(j == 0) & (p1 >= 0))
            tl.store(out_ptr + p0 * N + row + 8, f[2].to(ty), mask=(j == 0) & (p0 >= 0))
            tl.store(out_ptr + p1 * N + row + 8, f[3].to(ty), mask=(j == 0) & (p1 >= 0))
        else:
            _mma_sync_store(out_ptr + q * N, f, row, 2 * t, 1, N, N, 1.0, j == 0)
    else:
        rn = pid_n * 16 + tl.arange(0, 16)
        rk = tl.arange(0, 128)
        if ROUTED or GLU:  # [16 rows, 8 token columns]: a block's pairs, or at decode (GLU) the pair alone
            if ROUTED:
                pairs = tl.load(ids_ptr + q * 8 + tl.arange(0, 8))
                e = e_block.to(tl.int64)
            else:
                pairs = tl.where(tl.arange(0, 8) == 0, q, -1)
                e = tl.load(ids_ptr + q).to(tl.int64)
            valid = pairs >= 0
            if GLU:
                xr = tl.where(valid, pairs // TOPK, 0)
            else:
                xr = tl.where(valid, pairs, 0)
            R: tl.constexpr = 32 if GLU else 16
            rows = e * NW + pid_n * 16 + tl.arange(0, R) % 16 + tl.arange(0, R) // 16 * N
            acc = tl.zeros((R, 8), dtype=tl.float32)
            for k0 in range(0, K, 128):
                x = tl.load(a_ptr + xr[:, None] * stride_a + k0 + rk[None, :]).to(tl.float32)
                wt = _nvfp4_tile(w_ptr, sf_ptr, rows, rows >= 0, k0, K, False, R, 128, BLOCKED=True).to(tl.float32)
                acc += tl.sum(wt[:, None, :] * x[None, :, :], 2)
            alpha = tl.load(scalars_ptr + e * 4 + ALPHA_IDX) * 256.0
            if GLU:
                gate, up = tl.split(tl.permute(tl.reshape(acc, (2, 16, 8)), (1, 2, 0)))
                y = _epilogue(gate, up, alpha, limit, True, HAS_LIMIT)
            else:
                y = acc * alpha * tl.load(topk_w_ptr + pairs, mask=valid, other=0.0)[None, :]
            tl.store(out_ptr + pairs[None, :] * N + rn[:, None], y.to(out_ptr.dtype.element_ty), mask=valid[None, :])
        else:  # decode, down: a token's pairs on the first axis
            pj = tl.arange(0, P)
            pair = q * TOPK + tl.minimum(pj, TOPK - 1)
            e = tl.load(ids_ptr + pair).to(tl.int64)
            rows = tl.reshape(e[:, None] * NW + rn[None, :], (P * 16,))
            acc = tl.zeros((P, 16), dtype=tl.float32)
            for k0 in range(0, K, 128):
                x = tl.load(a_ptr + pair[:, None] * stride_a + k0 + rk[None, :]).to(tl.float32)
                wt = tl.reshape(_nvfp4_tile(w_ptr, sf_ptr, rows, rows >= 0, k0, K, False, P * 16, 128, BLOCKED=True), (P, 16, 128))
                acc += tl.sum(wt.to(tl.float32) * x[:, None, :], 2)
            coef = tl.where(pj < TOPK, tl.load(scalars_ptr + e * 4 + ALPHA_IDX) * 256.0 * tl.load(topk_w_ptr + pair), 0.0)
            tl.store(out_ptr + q * N + rn, tl.sum(acc * coef[:, None], 0).to(out_ptr.dtype.element_ty), mask=rn < N)


@triton.jit
def _moe_gemm_kernel(
    a_ptr, w_ptr, scalars_ptr, out_ptr, ids_ptr, block_expert_ptr, topk_w_ptr,
    N, K, stride_a, TOPK, limit,
    GATHER: tl.constexpr, GLU: tl.constexpr, HAS_LIMIT: tl.constexpr, WEIGHTED: tl.constexpr,
    WFMT: tl.constexpr, AQ: tl.constexpr, DOT_FP32: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """One [BM, BN] tile of one expert's rows. Row r of the block is routed pair `ids[r]` = t*TOPK + j
    (-1: padding); its activation row is t (GATHER) or the pair itself, its output row the pair.
    With GLU the weight has 2N rows (gate, then up) and the tile is SwiGLU(gate, up)."""
    e, ids, valid, rows, rn = _block(ids_ptr, block_expert_ptr, TOPK, GATHER, BM, BN)
    if e < 0:
        return
    NW = 2 * N if GLU else N
    e64 = e.to(tl.int64)
    w_e = w_ptr + e64 * NW * K
    alpha = tl.load(scalars_ptr + e * 4 + (1 if AQ != 0 else 0))
    isc = tl.load(scalars_ptr + e * 4 + 3)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc_up = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        a_even, a_odd = _a_tile(a_ptr, rows, valid, stride_a, k0, K, isc, AQ, BM, BK)
        w_even, w_odd = _w_tile(w_e, rn, rn < N, k0, K, WFMT, BN, BK)
        acc = _mma(acc, a_even, a_odd, w_even, w_odd, DOT_FP32)
        if GLU:
            u_even, u_odd = _w_tile(w_e, rn + N, rn < N, k0, K, WFMT, BN, BK)
            acc_up = _mma(acc_up, a_even, a_odd, u_even, u_odd, DOT_FP32)
    y = _epilogue(acc, acc_up, alpha, limit, GLU, HAS_LIMIT)
    if WEIGHTED:
        y = y * tl.load(topk_w_ptr + ids, mask=valid, other=0.0)[:, None]
    tl.store(out_ptr + ids[:, None] * N + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (rn[None, :] < N))


@triton.jit
def _route_kernel(topk_ptr, ids_ptr, block_expert_ptr, scratch_ptr, P, E, N_IDS, N_BLOCKS,
                  BM: tl.constexpr, PP: tl.constexpr, EP: tl.constexpr):  # fmt: skip
    """`route` in one program (decode): per-expert counts by histogram, block starts by cumsum, pairs
    sorted by (expert, pair) so that a pair's rank in its expert is its sorted position minus the
    expert's first; then the pair ids and block experts are scattered (after -1 everywhere)."""
    i = tl.arange(0, PP)
    e = tl.load(topk_ptr + i, mask=i < P, other=EP - 1)  # padding pairs land in a bin past the experts
    hist = tl.histogram(e, EP)
    ex = tl.arange(0, EP)
    blocks = tl.where(ex < E, (hist + BM - 1) // BM, 0)
    block_start = tl.cumsum(blocks, 0) - blocks
    tl.store(scratch_ptr + ex, block_start)
    tl.store(scratch_ptr + EP + ex, tl.cumsum(hist, 0) - hist)
    for off in range(0, N_IDS, PP):
        tl.store(ids_ptr + off + i, -1, mask=off + i < N_IDS)
    for off in range(0, N_BLOCKS, PP):
        tl.store(block_expert_ptr + off + i, -1, mask=off + i < N_BLOCKS)
    tl.debug_barrier()
    key = tl.sort(e * PP + i)
    pair = key % PP
    expert = key // PP
    ok = expert < E
    start = tl.load(scratch_ptr + expert, mask=ok, other=0, cache_modifier=".cg")
    rank = i - tl.load(scratch_ptr + EP + expert, mask=ok, other=0, cache_modifier=".cg")
    tl.store(ids_ptr + start * BM + rank, pair, mask=ok)
    tl.store(block_expert_ptr + start + rank // BM, expert, mask=ok)


ROUTE_KERNEL_MAX_PAIRS = 4096  # up to this many (token, expert) pairs one program routes them


def route(topk_ids: torch.Tensor, n_experts: int, bm: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed pairs sorted by expert in blocks of `bm` rows, with no host synchronization: (pair ids
    [blocks * bm], -1 for padding; expert of each block [blocks], -1 past the last used block). One
    kernel for decode-sized batches, torch ops above ROUTE_KERNEL_MAX_PAIRS."""
    flat = topk_ids.reshape(-1)
    tk = flat.numel()
    max_blocks = triton.cdiv(tk, bm) + min(n_experts, tk)
    if tk <= ROUTE_KERNEL_MAX_PAIRS and (flat.is_cuda or interpreting()):
        pp, ep = triton.next_power_of_2(max(tk, 16)), triton.next_power_of_2(n_experts + 1)
        ids = torch.empty(max_blocks * bm, dtype=torch.int32, device=flat.device)
        block_expert = torch.empty(max_blocks, dtype=torch.int32, device=flat.device)
        scratch = torch.empty(2 * ep, dtype=torch.int32, device=flat.device)
        _route_kernel[(1,)](flat.to(torch.int32).contiguous(), ids, block_expert, scratch, tk, n_experts, ids.numel(),
                            max_blocks, BM=bm, PP=pp, EP=ep, num_warps=4)  # fmt: skip
        return ids, block_expert
    return _route_torch(flat.long(), n_experts, bm, max_blocks)


def _route_torch(flat: torch.Tensor, n_experts: int, bm: int, max_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    tk = flat.numel()
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat.device).index_add_(0, flat, torch.ones_like(flat))
    blocks = (counts + bm - 1) // bm
    block_end = torch.cumsum(blocks, 0)
    order = torch.argsort(flat, stable=True)
    expert = flat[order]
    first = torch.cumsum(counts, 0) - counts
    pos = (block_end - blocks)[expert] * bm + torch.arange(tk, device=flat.device) - first[expert]
    ids = torch.full((max_blocks * bm,), -1, dtype=torch.int32, device=flat.device)
    ids[pos] = order.to(torch.int32)
    block_expert = torch.searchsorted(block_end, torch.arange(max_blocks, device=flat.device), right=True)
    block_expert = torch.where(block_expert < n_experts, block_expert, -1).to(torch.int32)
    return ids, block_expert


def _modes(experts: Experts, mode: str) -> int:
    """The activation quantization a mode means for these experts (0 none, 1 NVFP4, 2 FP8)."""
    allowed = {"nvfp4": ("w4a16", "w4a4"), "fp8": ("w8a8",), "bf16": ("bf16",)}[experts.fmt]
    if mode not in allowed:
        raise ValueError(f"mode {mode!r} does not apply to {experts.fmt} experts (use one of {allowed})")
    return {"w4a16": 0, "w4a4": 1, "w8a8": 2, "bf16": 0}[mode]


class MmaSync(NamedTuple):
    """The tiling of `_moe_mma_sync_kernel` (blocked NVFP4 experts). Decode: a program per pair (gate_up), then per
    token (down, with the combine); `routed`: the pairs routed to their experts in blocks of 8. `warps` share gate_up's
    K range (halved until they split it into whole 128-column steps), `down_warps` down's (routed; at decode down
    has a warp a pair); `ahead`, `down_ahead`: each kernel loads its activations a step ahead."""

    warps: int = 4
    ahead: bool = False
    down_ahead: bool = False
    routed: bool = False
    down_warps: int = 1

    @classmethod
    def rule(cls, tokens: int, topk: int, hidden: int, inter: int, experts: int) -> MmaSync:
        """From H100 sweeps (BENCHMARKS.md, seventeenth and eighteenth sessions): decode up to MOE_DECODE_MAX_PAIRS
        pairs, 4 warps on gate_up's K, activations ahead where all of a kernel's warps are resident at once (2048 or
        fewer, as in the linear's rule); routed beyond, 4 warps on gate_up's K up to 1024 pairs, then 1, one on down's.
        Decode reads an expert once a pair, so where the pairs would share experts (few experts: Mixtral's 8 at 3
        tokens and more) the routed blocks, which read it once a block, take over."""
        pairs = tokens * topk
        if pairs > MOE_DECODE_MAX_PAIRS or sharing(tokens, topk, experts) > MOE_DECODE_MAX_SHARING:
            return cls(4 if pairs <= 1024 else 1, routed=True)
        return cls(4, pairs * inter // 16 * 4 <= 2048, tokens * hidden // 16 * triton.next_power_of_2(topk) <= 2048)


def sharing(tokens: int, topk: int, experts: int) -> float:
    """The (token, expert) pairs expected per expert touched, with each token's top-k a uniform draw of distinct
    experts: how many times a kernel that reads an expert once a pair (or a block of pairs) would re-read it."""
    if tokens == 0:
        return 1.0
    return tokens * topk / (experts * (1 - (1 - topk / experts) ** tokens))


def fused_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up: Experts,
              down: Experts, mode: str, limit: float | None = None, config: tuple[int, ...] | MmaSync | None = None,
              out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:  # fmt: skip
    """Routed experts of one MoE layer: `sum_j w_j * down_e(SwiGLU(gate_up_e(x)))` for each token's
    top-k experts `e = topk_ids[t, j]` with weights `topk_weights[t, j]`; `limit` is the Step clamp.
    gate_up's rows are the gate then the up projection; x [T, H] -> [T, H] (fp32 keeps the combine's
    sum unrounded, for checking). Blocked NVFP4 experts run the mma.sync kernels up to MOE_MMA_SYNC_MAX_SHARING
    pairs an expert (`sharing`; or with an `MmaSync` config); else Triton's MMA over the routed pairs, `config` =
    (BM, BN, BK, warps) overriding its tiling."""
    T, H = x.shape
    E, two_i, _ = gate_up.shape
    inter = two_i // 2
    aq1, aq2 = _modes(gate_up, mode), _modes(down, mode)
    topk = topk_ids.shape[1]
    if gate_up.fmt != down.fmt:
        raise ValueError(f"gate_up ({gate_up.fmt}) and down ({down.fmt}) experts must share a format")
    nvfp4 = gate_up.fmt == "nvfp4"
    if nvfp4 and (H % 64 or inter % 64):
        raise ValueError(f"the NVFP4 fused MoE needs hidden ({H}) and intermediate ({inter}) sizes that are multiples of 64")
    blocked = nvfp4 and gate_up.blocked and down.blocked
    if isinstance(config, MmaSync) and not blocked:
        raise ValueError("the mma.sync kernels need blocked NVFP4 experts (N a multiple of 16, K of 128)")
    a = x.to(torch.bfloat16).contiguous()
    weights = topk_weights.float().reshape(-1).contiguous()
    limit_ = float(limit or 0.0)
    # w4a4: the activations rounded to their NVFP4 values (one input scale per layer, so any expert's scalars
    # serve), then the w4a16 kernels with alpha = input_scale x weight scale
    if nvfp4 and aq1:
        a = nvfp4_fake_quantize(a, gate_up.scalars[0, 1:])
    h = torch.empty(T * topk, inter, dtype=torch.bfloat16, device=x.device)
    share = sharing(T, topk, E)
    if isinstance(config, MmaSync) or (config is None and blocked and share <= MOE_MMA_SYNC_MAX_SHARING):
        cfg = config if isinstance(config, MmaSync) else MmaSync.rule(T, topk, H, inter, E)
        if cfg.routed:
            ids, block_expert = route(topk_ids, E, 8)
            grid_gu, grid_dn = (inter // 16, block_expert.numel()), (H // 16, block_expert.numel())
            out = torch.empty(T * topk, H, dtype=torch.float32, device=x.device)
            down_warps = cfg.down_warps
        else:
            ids, block_expert = topk_ids.reshape(-1).contiguous(), None  # int64 or int32: read as they are
            grid_gu, grid_dn = (inter // 16, T * topk), (H // 16, T)
            out = torch.empty(T, H, dtype=out_dtype, device=x.device)
            down_warps = triton.next_power_of_2(topk)
        _mma_sync_launch(grid_gu, a, gate_up, h, ids, block_expert, weights, inter, H, topk, limit_, aq1,
                         limit is not None, cfg.warps, cfg.ahead, cfg.routed)  # fmt: skip
        if aq2:
            h = nvfp4_fake_quantize(h, down.scalars[0, 1:])
        _mma_sync_launch(grid_dn, h, down, out, ids, block_expert, weights, H, inter, topk, 0.0, aq2, False,
                         down_warps, cfg.down_ahead, cfg.routed)  # fmt: skip
        return out.view(T, topk, H).sum(1).to(out_dtype) if cfg.routed else out
    bm, bn, bk, warps = tuple(config)[:4] if config else _moe_blocks(T * topk, nvfp4, share)
    ids, block_expert = route(topk_ids, E, bm)
    y = torch.empty(T * topk, H, dtype=torch.float32, device=x.device)
    if nvfp4:
        common = dict(ASM=not interpreting(), BM=bm, BN=bn, num_warps=warps)  # each projection blocked or not
        _moe_nvfp4_kernel[(block_expert.numel(), triton.cdiv(inter, bn))](
            a, gate_up.weight.view(torch.int32), gate_up.weight_scale.view(torch.int32), gate_up.scalars, h, ids,
            block_expert, weights, inter, H, a.stride(0), topk, limit_, aq1,
            GATHER=True, GLU=True, HAS_LIMIT=limit is not None, WEIGHTED=False, BK=_fit(bk, H), BLOCKED=gate_up.blocked,
            **common,
        )  # fmt: skip
        if aq2:
            h = nvfp4_fake_quantize(h, down.scalars[0, 1:])
        _moe_nvfp4_kernel[(block_expert.numel(), triton.cdiv(H, bn))](
            h, down.weight.view(torch.int32), down.weight_scale.view(torch.int32), down.scalars, y, ids,
            block_expert, weights, H, inter, h.stride(0), topk, 0.0, aq2,
            GATHER=False, GLU=False, HAS_LIMIT=False, WEIGHTED=True, BK=_fit(bk, inter), BLOCKED=down.blocked,
            **common,
        )  # fmt: skip
    else:
        common = dict(DOT_FP32=interpreting(), BM=bm, BN=bn, BK=bk, num_warps=warps)
        _moe_gemm_kernel[(block_expert.numel(), triton.cdiv(inter, bn))](
            a, gate_up.weight, gate_up.scalars, h, ids, block_expert, weights,
            inter, H, a.stride(0), topk, limit_,
            GATHER=True, GLU=True, HAS_LIMIT=limit is not None, WEIGHTED=False,
            WFMT=WFMTS[gate_up.fmt], AQ=aq1, **common,
        )  # fmt: skip
        _moe_gemm_kernel[(block_expert.numel(), triton.cdiv(H, bn))](
            h, down.weight, down.scalars, y, ids, block_expert, weights,
            H, inter, h.stride(0), topk, 0.0,
            GATHER=False, GLU=False, HAS_LIMIT=False, WEIGHTED=True,
            WFMT=WFMTS[down.fmt], AQ=aq2, **common,
        )  # fmt: skip
    return y.view(T, topk, H).sum(1).to(out_dtype)


def _mma_sync_launch(grid, x, ex: Experts, out, ids, block_expert, weights, n, k, topk, limit, alpha_idx, has_limit,
                     warps, ahead, routed) -> None:  # fmt: skip
    """One `_moe_mma_sync_kernel` launch: gate_up or down (by the weight's rows), decode or routed; `warps` share K
    (halved until they split it into whole 128-column steps), except at decode's down, where each takes a pair."""
    glu = ex.shape[1] == 2 * n  # gate_up: the gate's and the up projection's rows
    shared_k = glu or routed
    while shared_k and warps > 1 and k % (128 * warps):
        warps //= 2
    tr = 2 if glu else 1
    step, load = _MMA_SYNC_PTX[tr, 1, ahead, _step_checks(tr, 1, warps)]
    sets = _sets(tr, ahead)
    span = k // warps if shared_k else k
    _moe_mma_sync_kernel[grid](
        x, ex.weight.view(torch.int32), ex.weight_scale.view(torch.int32), ex.scalars, out, ids,
        ids if block_expert is None else block_expert, weights, n, k, x.stride(0), topk, limit, alpha_idx, GLU=glu,
        ROUTED=routed, HAS_LIMIT=has_limit, ASM=not interpreting(), W=warps, P=warps, STEP=step, LOAD=load, PX=ahead,
        ODD=span % 256 != 0, SUM=_warp_sum_ptx(4 * tr, warps, warps, False) if warps > 1 else "", SETS=sets,
        SETS_SUM=_sets_sum_ptx(4 * tr) if sets > 1 else "", num_warps=warps, num_stages=1,
    )  # fmt: skip


def _moe_blocks(pairs: int, nvfp4: bool, share: float) -> tuple[int, int, int, int]:
    """(BM, BN, BK, warps) of the routed kernels by the number of (token, expert) pairs and the pairs expected an
    expert (`sharing`) (the best of sweeps on an H100, BENCHMARKS.md). NVFP4 experts: BN counts weight rows (the MMA's
    M side), BK a multiple of 64; BM grows with the pairs an expert, which each block's weight reads serve (the
    bounds sit between the measured points: 12 and 16, 24 and 32 pairs an expert)."""
    if interpreting():
        return (16, 16, 64, 4) if nvfp4 else (16, 16, 32, 4)
    if nvfp4:
        return (16, 64, 128, 4) if share <= 14 else (32, 64, 128, 4) if share <= 28 else (64, 128, 64, 4)
    if pairs <= 2048:
        return 16, 32, 128, 4
    return 64, 128, 64, 8


MOE_DECODE_MAX_PAIRS = 32  # 4 tokens at top-8: beyond, routing the pairs in blocks of 8 pays (BENCHMARKS.md, seventeenth session)
# and only while the pairs expected a touched expert stay at most this: Mixtral (8 experts, top-2) at 2 tokens (1.14)
# decodes faster, at 3 (1.30) routed (BENCHMARKS.md, eighteenth session)
MOE_DECODE_MAX_SHARING = 1.2
# routed mma.sync blocks (8 pairs) up to this many pairs an expert; beyond, Triton's MMA over 32 or 64 pairs a block
# reads each expert fewer times (Step: 4320 pairs, 540 tokens; Mixtral: 60 tokens; BENCHMARKS.md, eighteenth session)
MOE_MMA_SYNC_MAX_SHARING = 15


# -- plain-torch reference --------------------------------------------------------------------------
def fused_moe_reference(x, topk_ids, topk_weights, gate_up: Experts, down: Experts, mode: str,
                        limit: float | None = None) -> torch.Tensor:  # fmt: skip
    """Expert by expert in fp64 on the experts' device, with the kernel's roundings: activations quantized as the
    mode says (NVFP4 per SPEC §9, see `blackwell_activations`), the SwiGLU output rounded to BF16 before
    the down projection."""
    aq1, aq2 = _modes(gate_up, mode), _modes(down, mode)
    dev = gate_up.weight.device
    x = x.to(dev, torch.bfloat16)
    ids, tw = topk_ids.to(dev).long(), topk_weights.to(dev).double()
    inter = gate_up.shape[1] // 2
    out = torch.zeros(x.shape[0], down.shape[1], dtype=torch.float64, device=dev)
    for e in ids.unique().tolist():
        t, j = (ids == e).nonzero(as_tuple=True)
        g = _act_reference(x[t], gate_up.scalars[e], aq1) @ gate_up.dequantize(e).T
        gate, up = g[:, :inter], g[:, inter:]
        gate = gate * torch.sigmoid(gate)
        if limit is not None:
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        h = (gate * up).to(torch.bfloat16)
        y = _act_reference(h, down.scalars[e], aq2) @ down.dequantize(e).T
        out.index_add_(0, t, y * tw[t, j, None])
    return out


def _act_reference(a: torch.Tensor, scalars: torch.Tensor, aq: int) -> torch.Tensor:
    """Activations as the MMA sees them (fp64), times the input scale when they were quantized."""
    isc = float(scalars[3])
    if aq == 1:
        q, sf = blackwell_activations(a, isc)
        return dequantize_nvfp4(q, sf, 1.0) * isc
    if aq == 2:
        from .fp8 import quantize_input_fp8

        return quantize_input_fp8(a, torch.tensor(isc, device=a.device)).double() * isc
    return a.double()
