"""Fused MoE over stacked experts (SPEC §9): tokens sorted by expert, one grouped GEMM for gate_up with
the SwiGLU (Step clamp optional) in its epilogue, one for down with the routing weight, then the combine.

Experts are NVFP4 (`w4a16`: BF16 activations; `w4a4`: activations quantized with Blackwell's recipe, the
SwiGLU output re-quantized with the down input scale), FP8 (static per-tensor activations, W8A8 emulated
exactly on the BF16 MMA) or BF16. One activation scale per projection and layer: the max over experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import interpreting
from .quantize import _bf16_rne, _e4m3_rne
from .linear import _e4m3_value, _fit, _load_words, _mma_t, _nvfp4_tile, _nvfp4_values, _scale_bytes, _word_dots, _x_pairs, blackwell_activations, dequantize_nvfp4, nvfp4_fake_quantize

WFMTS = {"bf16": 1, "fp8": 2}  # the reference kernel's weight formats


@dataclass
class Experts:
    """One stacked projection of a layer's experts on the device: weight [E, N, K] (NVFP4 packed
    [E, N, K/2] with E4M3 scales [E, N, K/16]; FP8 as uint8 bits), and per-expert fp32 scalars
    [E, 4] = (weight scale, input_scale x weight scale, 1 / input_scale, input_scale)."""

    fmt: str
    weight: torch.Tensor
    weight_scale: torch.Tensor | None
    scalars: torch.Tensor

    @classmethod
    def nvfp4(cls, weight, weight_scale, weight_scale_2, input_scale=None) -> Experts:
        return cls("nvfp4", weight.contiguous(), weight_scale.contiguous().view(torch.uint8),
                   _scalars(weight_scale_2, input_scale, weight.shape[0], weight.device))  # fmt: skip

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
            return dequantize_nvfp4(self.weight[e], self.weight_scale[e].view(torch.float8_e4m3fn), 1.0) * s
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
    ASM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
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
        acc = _mma_t(acc, _nvfp4_tile(w_e, sf_e, rn, nmask, k0, K, ASM, BN, BK), a, ASM)
        if GLU:
            acc_up = _mma_t(acc_up, _nvfp4_tile(w_e, sf_e, rn + N, nmask, k0, K, ASM, BN, BK), a, ASM)
    y = _epilogue(acc, acc_up, tl.load(scalars_ptr + e * 4 + ALPHA_IDX) * 256.0, limit, GLU, HAS_LIMIT)
    if WEIGHTED:
        y = y * tl.load(topk_w_ptr + ids, mask=valid, other=0.0)[None, :]
    tl.store(out_ptr + ids[None, :] * N + rn[:, None], y.to(out_ptr.dtype.element_ty), mask=valid[None, :] & nmask[:, None])


@triton.jit
def _moe_row_gate_up_kernel(
    a_ptr, w_ptr, sf_ptr, scalars_ptr, down_scalars_ptr, h_ptr, topk_ids_ptr, N, K, stride_a, TOPK, limit, ALPHA_IDX,
    HAS_LIMIT: tl.constexpr, AQ_OUT: tl.constexpr, ASM: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Decode, one program per routed pair and BN rows: SwiGLU(gate, up) of the pair's token through its
    expert, with the one-row GEMV's fp32 products of decoded words (no MMA, no routing: the expert is
    topk_ids[pair]), STAGES weight tiles in flight. w4a4: AQ_OUT rounds the BN outputs (whole 16-blocks of
    the intermediate) to their NVFP4 values with down's input scale, so that needs no launch of its own."""
    pair = tl.program_id(0)
    e64 = tl.load(topk_ids_ptr + pair).to(tl.int64)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    nmask = rn < N
    w_e = w_ptr + e64 * 2 * N * (K // 8)
    sf_e = sf_ptr + e64 * 2 * N * (K // 64)
    xp = a_ptr + (pair // TOPK) * stride_a
    acc = tl.zeros((BN, BK // 8), dtype=tl.float32)
    acc_up = tl.zeros((BN, BK // 8), dtype=tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES):
        x = _x_pairs(xp, k0, BK)
        words, sw = _load_words(w_e, sf_e, rn, nmask, k0, K, BK)
        acc = _word_dots(acc, words, _scale_bytes(sw, BN, BK), x, ASM)
        words, sw = _load_words(w_e, sf_e, rn + N, nmask, k0, K, BK)
        acc_up = _word_dots(acc_up, words, _scale_bytes(sw, BN, BK), x, ASM)
    alpha = tl.load(scalars_ptr + e64 * 4 + ALPHA_IDX) * 256.0
    y = _epilogue(tl.sum(acc, 1), tl.sum(acc_up, 1), alpha, limit, True, HAS_LIMIT)
    if AQ_OUT:
        y = tl.reshape(_nvfp4_values(tl.reshape(y, (1, BN // 16, 16)), tl.load(down_scalars_ptr + 2), ASM), (BN,))
    tl.store(h_ptr + pair * N + rn, y.to(h_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _moe_row_down_kernel(
    h_ptr, w_ptr, sf_ptr, scalars_ptr, out_ptr, topk_ids_ptr, topk_w_ptr, N, K, TOPK, ALPHA_IDX,
    ASM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr, P: tl.constexpr,
):  # fmt: skip
    """Decode, one program per token and BN output columns: the down projections of all the token's TOPK pairs at
    once ([P, BN, BK/8] word tiles, P = TOPK rounded up to a power of two), each pair's sum times alpha and its
    routing weight, added over the pairs in a fixed order."""
    t = tl.program_id(0)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    nmask = rn < N
    pj = tl.arange(0, P)
    pvalid = pj < TOPK
    pair = t * TOPK + tl.minimum(pj, TOPK - 1)
    e64 = tl.load(topk_ids_ptr + pair).to(tl.int64)
    coef = tl.where(pvalid, tl.load(scalars_ptr + e64 * 4 + ALPHA_IDX) * 256.0 * tl.load(topk_w_ptr + pair), 0.0)
    wrow = ((e64 * N)[:, None] + rn[None, :])[:, :, None]  # [P, BN, 1]: the rows of the stacked experts
    mask = (pvalid[:, None] & nmask[None, :])[:, :, None]
    xrow = h_ptr.to(tl.pointer_type(tl.int32)) + (pair * (K // 2))[:, None]
    total = tl.zeros((P, BN, BK // 8), dtype=tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES):
        words = tl.load(w_ptr + wrow * (K // 8) + (k0 // 8 + tl.arange(0, BK // 8))[None, None, :], mask=mask, other=0)
        sw = tl.load(sf_ptr + wrow * (K // 64) + (k0 // 64 + tl.arange(0, BK // 64))[None, None, :], mask=mask, other=0)
        x = tl.load(xrow + k0 // 2 + tl.arange(0, BK // 2)[None, :])
        total = _word_dots(total, words, _scale_bytes(sw, BN, BK, P), x, ASM, ROWS3=True)
    y = tl.sum(tl.sum(total, 2) * coef[:, None], 0)
    tl.store(out_ptr + t * N + rn, y.to(out_ptr.dtype.element_ty), mask=nmask)


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


def fused_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up: Experts,
              down: Experts, mode: str, limit: float | None = None, config: tuple[int, ...] | None = None,
              out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:  # fmt: skip
    """Routed experts of one MoE layer: `sum_j w_j * down_e(SwiGLU(gate_up_e(x)))` for each token's
    top-k experts `e = topk_ids[t, j]` with weights `topk_weights[t, j]`; `limit` is the Step clamp.
    gate_up's rows are the gate then the up projection; x [T, H] -> [T, H] (fp32 keeps the combine's
    sum unrounded, for checking). `config` = (BM, BN, BK, warps[, stages[, down BN]]) overrides the tiling;
    BM = 1 (NVFP4, decode) skips the routing: one-row kernels per pair, then per token with the combine."""
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
    cfg = tuple(config) if config else _moe_blocks(T * topk, nvfp4)
    bm, bn, bk, warps = cfg[:4]
    stages = cfg[4] if len(cfg) > 4 else 4
    if bm == 1 and not nvfp4:
        raise ValueError("the one-pair-per-block tiling (BM = 1) is for NVFP4 experts")
    a = x.to(torch.bfloat16).contiguous()
    weights = topk_weights.float().reshape(-1).contiguous()
    h = torch.empty(T * topk, inter, dtype=torch.bfloat16, device=x.device)
    limit_ = float(limit or 0.0)
    # w4a4: the activations rounded to their NVFP4 values (one input scale per layer, so any expert's scalars
    # serve), then the w4a16 kernels with alpha = input_scale x weight scale
    if nvfp4 and aq1:
        a = nvfp4_fake_quantize(a, gate_up.scalars[0, 1:])
    if bm == 1:  # decode: one program per pair (gate_up) and per token (down, which also combines)
        flat_ids = topk_ids.reshape(-1).contiguous()  # int64 or int32: read as they are (no conversion launch)
        common = dict(ASM=not interpreting(), STAGES=stages, num_warps=warps)
        h_blocks = aq2 and bn % 16 == 0  # gate_up's programs hold whole 16-blocks of h: they round them
        _moe_row_gate_up_kernel[(T * topk, triton.cdiv(inter, bn))](
            a, gate_up.weight.view(torch.int32), gate_up.weight_scale.view(torch.int32), gate_up.scalars, down.scalars,
            h, flat_ids, inter, H, a.stride(0), topk, limit_, aq1,
            HAS_LIMIT=limit is not None, AQ_OUT=h_blocks, BN=bn, BK=_fit(bk, H), **common,
        )  # fmt: skip
        if aq2 and not h_blocks:
            h = nvfp4_fake_quantize(h, down.scalars[0, 1:])
        dbn, dbk, dwarps, dstages = _down_blocks(T)
        dbn = cfg[5] if len(cfg) > 5 else dbn
        out = torch.empty(T, H, dtype=out_dtype, device=x.device)
        _moe_row_down_kernel[(T, triton.cdiv(H, dbn))](
            h, down.weight.view(torch.int32), down.weight_scale.view(torch.int32), down.scalars, out, flat_ids, weights,
            H, inter, topk, aq2, ASM=not interpreting(), BN=dbn, BK=_fit(dbk, inter), STAGES=dstages,
            P=triton.next_power_of_2(topk), num_warps=dwarps,
        )  # fmt: skip
        return out
    ids, block_expert = route(topk_ids, E, bm)
    y = torch.empty(T * topk, H, dtype=torch.float32, device=x.device)
    if nvfp4:
        common = dict(ASM=not interpreting(), BM=bm, BN=bn, num_warps=warps)
        _moe_nvfp4_kernel[(block_expert.numel(), triton.cdiv(inter, bn))](
            a, gate_up.weight.view(torch.int32), gate_up.weight_scale.view(torch.int32), gate_up.scalars, h, ids,
            block_expert, weights, inter, H, a.stride(0), topk, limit_, aq1,
            GATHER=True, GLU=True, HAS_LIMIT=limit is not None, WEIGHTED=False, BK=_fit(bk, H), **common,
        )  # fmt: skip
        if aq2:
            h = nvfp4_fake_quantize(h, down.scalars[0, 1:])
        _moe_nvfp4_kernel[(block_expert.numel(), triton.cdiv(H, bn))](
            h, down.weight.view(torch.int32), down.weight_scale.view(torch.int32), down.scalars, y, ids,
            block_expert, weights, H, inter, h.stride(0), topk, 0.0, aq2,
            GATHER=False, GLU=False, HAS_LIMIT=False, WEIGHTED=True, BK=_fit(bk, inter), **common,
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


def _down_blocks(tokens: int) -> tuple[int, int, int, int]:
    """(BN, BK, warps, stages) of the one-row down kernel, which reads all of a token's pairs at once: 16 columns and
    8 warps a program for 1-2 tokens, 8 columns and 4 warps beyond (H100 sweep, BENCHMARKS.md, thirteenth session)."""
    if interpreting():
        return 16, 64, 4, 1
    return (16, 128, 8, 3) if tokens <= 2 else (8, 128, 4, 2)


def _moe_blocks(pairs: int, nvfp4: bool) -> tuple[int, int, int, int, int]:
    """(BM, BN, BK, warps, stages) by the number of routed (token, expert) pairs (the best of sweeps on an
    H100, BENCHMARKS.md). NVFP4 experts: BN counts weight rows (the MMA's M side), BK a multiple of 64;
    up to MOE_ROW_MAX_PAIRS pairs the one-row kernels run (BM = 1)."""
    if interpreting():
        return (16, 16, 64, 4, 1) if nvfp4 else (16, 16, 32, 4, 1)
    if nvfp4:
        if pairs <= MOE_ROW_MAX_PAIRS:
            return 1, 16, 256, 2, 4
        return (16, 64, 128, 4, 1) if pairs <= 2048 else (64, 128, 64, 4, 1)
    if pairs <= 2048:
        return 16, 32, 128, 4, 1
    return 64, 128, 64, 8, 1


MOE_ROW_MAX_PAIRS = 128  # 16 tokens at top-8


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
