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

import functools

import torch
import triton
import triton.language as tl

from dataclasses import dataclass
from typing import NamedTuple

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
def _nvfp4_values(x3, gs, APPROX: tl.constexpr):
    """Activations [A, B, 16] (fp32, blocks of 16 on the last axis) -> the `code x block scale` values
    Blackwell's recipe rounds them to (exact in bf16; the input scale not applied), gs = 1 / input_scale."""
    sf_bits, sf, out_scale = _act_scales(tl.max(tl.abs(x3), axis=2), gs, _rcp(gs, APPROX), APPROX)
    return _fp4_bits_to_f32(_e2m1(x3 * out_scale[:, :, None])) * (sf * 16384.0)[:, :, None]


@triton.jit
def _fp4_bits_to_f32(code):
    """E2M1 code (sign bit 3) -> its value / 2^14, decoded on the bits: the magnitude goes into an fp16's
    exponent/mantissa fields (0.5 lands on the fp16 subnormal 2^-15), the caller multiplies by 2^14."""
    c = code.to(tl.uint16)
    half = ((c & 7) << 9) | ((c & 8) << 12)
    return half.to(tl.float16, bitcast=True).to(tl.float32)


# Eight E2M1 codes (one int32 word of the packed weight: element i in nibble i) and an E4M3 block-scale
# byte -> four bf16 pairs, each value exactly `code x scale x 2^-8` (the 2^-8 goes into alpha). A code's
# sign and magnitude bits are moved into a bf16's sign and lowest exponent/mantissa bits, which makes
# the value x 2^-126 (0.5 lands on the bf16 subnormal 2^-127); elements j and j + 4 move by the same
# shifts, so pair j holds elements (j, j + 4). Then one bf16x2 multiply by the scale x 2^118 (its E4M3
# bits as an fp16, subnormals included, widened and x 2^126 in fp32): every product has at most 6
# significant bits, so it is exact. About 3 instructions per weight element, no tables.
def _scale_ptx(byte: str, ss: str) -> str:
    """PTX: the E4M3 scale in the low byte of `byte` (higher bits ignored) -> `ss` = scale x 2^118, a bf16 pair."""
    return (f"shl.b32 m, {byte}, 7; and.b32 m, m, 0x3F80; mov.b32 {{h16, l16}}, m; cvt.f32.f16 f, h16; "
            f"mul.f32 f, f, 0f7E800000; mov.b32 m, f; prmt.b32 {ss}, m, m, 0x3232;\n")


# A blocked weight's words (NVFP4Weight.blocked) hold the same 8 codes with their bits moved to where the decode
# wants them: element e's three magnitude bits start at bit _BLOCKED_MAG[e], its sign at _BLOCKED_SIGN[e]. Element 0
# (and 4) are in place (one AND), 1 (and 5) one shift away with their sign (two instructions), 2, 3 (6, 7) need
# separate shifts for sign and magnitude (four): 11 instructions a word instead of 15 (BENCHMARKS.md, fourteenth
# session).
_BLOCKED_MAG = tl.constexpr((6, 0, 3, 11, 22, 16, 19, 27))
_BLOCKED_SIGN = tl.constexpr((15, 9, 10, 14, 31, 25, 26, 30))


def _pairs_ptx(word: str, p: list[str], ss: str | None, blocked: bool = False) -> str:
    """PTX: the 8 codes of `word` (blocked: bits as _BLOCKED_MAG/_SIGN place them) -> bf16 pairs p[j] = elements
    (j, j + 4) (x the scale pair `ss`, if given)."""
    mul = "".join(f"mul.rn.bf16x2 {r}, {r}, {ss}; " for r in p) + "\n" if ss else ""
    if blocked:
        return f"""and.b32 {p[0]}, {word}, 0x81C081C0;
shl.b32 m, {word}, 6; and.b32 {p[1]}, m, 0x81C081C0;
shl.b32 m, {word}, 3; shl.b32 s, {word}, 5; and.b32 m, m, 0x01C001C0; lop3.b32 {p[2]}, m, s, 0x80008000, 0xF8;
shr.b32 m, {word}, 5; shl.b32 s, {word}, 1; and.b32 m, m, 0x01C001C0; lop3.b32 {p[3]}, m, s, 0x80008000, 0xF8;
{mul}"""
    return f"""shl.b32 m, {word}, 6; shl.b32 s, {word}, 12; and.b32 m, m, 0x01C001C0; lop3.b32 {p[0]}, m, s, 0x80008000, 0xF8;
shl.b32 m, {word}, 2; shl.b32 s, {word}, 8; and.b32 m, m, 0x01C001C0; lop3.b32 {p[1]}, m, s, 0x80008000, 0xF8;
shr.b32 m, {word}, 2; shl.b32 s, {word}, 4; and.b32 m, m, 0x01C001C0; lop3.b32 {p[2]}, m, s, 0x80008000, 0xF8;
shr.b32 m, {word}, 6; and.b32 m, m, 0x01C001C0; lop3.b32 {p[3]}, m, {word}, 0x80008000, 0xF8;
{mul}"""


_REGS = ".reg .b32 m, s, t, u, f, ss;\n.reg .b16 h16, l16;\n"


def _decode_ptx(adjacent: bool, blocked: bool) -> tl.constexpr:
    """PTX: word $4 and scale byte $5 -> pairs $0..$3; adjacent: re-paired with prmt into elements (0, 1), (2, 3),
    (4, 5), (6, 7), how the MMA's operand registers hold them."""
    if not adjacent:
        return tl.constexpr("{" + _REGS + _scale_ptx("$5", "ss") + _pairs_ptx("$4", ["$0", "$1", "$2", "$3"], "ss", blocked) + "}")
    return tl.constexpr("{" + _REGS + _scale_ptx("$5", "ss") + _pairs_ptx("$4", ["$0", "$1", "$2", "$3"], None, blocked) + """
mul.rn.bf16x2 m, $0, ss; mul.rn.bf16x2 s, $1, ss; mul.rn.bf16x2 t, $2, ss; mul.rn.bf16x2 u, $3, ss;
prmt.b32 $0, m, s, 0x5410; prmt.b32 $1, t, u, 0x5410; prmt.b32 $2, m, s, 0x7632; prmt.b32 $3, t, u, 0x7632;
}""")


_DECODE_PTX, _DECODE_ADJACENT_PTX = _decode_ptx(False, False), _decode_ptx(True, False)
_DECODE_BLOCKED_PTX, _DECODE_ADJACENT_BLOCKED_PTX = _decode_ptx(False, True), _decode_ptx(True, True)


@triton.jit
def _bf16_pair(r):
    """int32 holding two bf16 (element 0 in the low half) -> [..., 2] bf16."""
    lo = r.to(tl.int16).to(tl.bfloat16, bitcast=True)
    hi = (r >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return tl.join(lo, hi)


@triton.jit
def _weight_pairs(words, sfb, ASM: tl.constexpr, ADJACENT: tl.constexpr = False, BLOCKED: tl.constexpr = False):
    """int32 words of packed E2M1 codes (BLOCKED: a blocked weight's, bits moved) and their E4M3 scale bytes (int32,
    same shape) -> four int32 holding bf16 pairs `code x scale x 2^-8`: elements (j, j + 4) of each word in pair j,
    or with ADJACENT (2j, 2j + 1). Through PTX on the GPU; under the interpreter the same bits from fp32 values."""
    if ASM:
        if BLOCKED:
            ptx: tl.constexpr = _DECODE_ADJACENT_BLOCKED_PTX if ADJACENT else _DECODE_BLOCKED_PTX
        else:
            ptx: tl.constexpr = _DECODE_ADJACENT_PTX if ADJACENT else _DECODE_PTX
        r0, r1, r2, r3 = tl.inline_asm_elementwise(ptx, "=&r,=&r,=&r,=&r,r,r", [words, sfb], dtype=(tl.int32,) * 4,
                                                   is_pure=True, pack=1)  # fmt: skip
    else:
        sf = _e4m3_value(sfb) * (16384.0 / 256.0)
        step: tl.constexpr = 2 if ADJACENT else 1  # pair j: elements (step j, step j + high)
        high: tl.constexpr = 1 if ADJACENT else 4
        r0 = _bf16_bits(words, 0, sf, BLOCKED) | (_bf16_bits(words, high, sf, BLOCKED) << 16)
        r1 = _bf16_bits(words, step, sf, BLOCKED) | (_bf16_bits(words, step + high, sf, BLOCKED) << 16)
        r2 = _bf16_bits(words, 2 * step, sf, BLOCKED) | (_bf16_bits(words, 2 * step + high, sf, BLOCKED) << 16)
        r3 = _bf16_bits(words, 3 * step, sf, BLOCKED) | (_bf16_bits(words, 3 * step + high, sf, BLOCKED) << 16)
    return r0, r1, r2, r3


@triton.jit
def _bf16_bits(words, j: tl.constexpr, sf, BLOCKED: tl.constexpr = False):
    """bf16 bits (int32) of element j of each word (BLOCKED: bits moved, see _BLOCKED_MAG) x sf (exact in bf16)."""
    if BLOCKED:
        code = ((words >> _BLOCKED_MAG[j]) & 7) | (((words >> _BLOCKED_SIGN[j]) & 1) << 3)
    else:
        code = (words >> (4 * j)) & 15
    v = _fp4_bits_to_f32(code) * sf
    return (v.to(tl.int32, bitcast=True) >> 16) & 0xFFFF


@triton.jit
def _lo(r):
    return (r << 16).to(tl.float32, bitcast=True)


@triton.jit
def _hi(r):
    return (r & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _decode_words(words, sfb, ASM: tl.constexpr, BLOCKED: tl.constexpr = False):
    """int32 words [A, B, C] of packed E2M1 codes (BLOCKED: bits moved) and their E4M3 scale bytes (int32, same
    shape) -> [A, B, C, 8] bf16 weight values `code x scale x 2^-8` in K order (pairs through PTX on the GPU, the
    same bits from fp32 values under the interpreter)."""
    r0, r1, r2, r3 = _weight_pairs(words, sfb, ASM, ADJACENT=True, BLOCKED=BLOCKED)
    v = tl.join(tl.join(_bf16_pair(r0), _bf16_pair(r1)), tl.join(_bf16_pair(r2), _bf16_pair(r3)))
    v = tl.permute(v, (0, 1, 2, 5, 4, 3))  # [.., half, pair bit 0, pair bit 1] -> element order
    return tl.reshape(v, (words.shape[0], words.shape[1], words.shape[2], 8))


@triton.jit
def _nvfp4_tile(w_ptr, sf_ptr, rows, rmask, k0, K, ASM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                BLOCKED: tl.constexpr = False):  # fmt: skip
    """Rows `rows` x columns [k0, k0 + BK) of an NVFP4 weight (int32 words [N, K/8], scales as int32
    words of four [N, K/64]; BLOCKED: in NVFP4Weight's blocks) -> [BN, BK] values `code x scale x 2^-8`
    (K, k0 multiples of 64)."""
    NB: tl.constexpr = BK // 16
    words, sw = _load_words(w_ptr, sf_ptr, rows, rmask, k0, K, BK, BLOCKED)
    sfb = _scale_bytes(sw, BN, BK)
    w = _decode_words(tl.reshape(words, (BN, NB, 2)), tl.reshape(sfb, (BN, NB, 2)), ASM, BLOCKED)
    return tl.reshape(w, (BN, BK))


@triton.jit
def _load_words(w_ptr, sf_ptr, rows, rmask, k0, K, BK: tl.constexpr, BLOCKED: tl.constexpr = False):
    """Rows `rows` x columns [k0, k0 + BK) of an NVFP4 weight, the loads alone: int32 words of 8 codes
    [BN, BK/8] and the scales read four blocks to an int32 [BN, BK/64]. BLOCKED: the weight is stored in
    NVFP4Weight's [16 rows, 128 columns] blocks (256 words, 32 scale words each)."""
    kw = tl.multiple_of(k0, 64) // 8 + tl.arange(0, BK // 8)
    ks = k0 // 64 + tl.arange(0, BK // 64)
    if BLOCKED:
        band = (rows // 16 * (K // 128))[:, None]  # the first block of the rows' 16-row band
        if BK >= 128:  # k0 a multiple of 128 (whole blocks): one scalar term moves with k0
            j, i = tl.arange(0, BK // 8), tl.arange(0, BK // 64)
            band = band + k0 // 128
            wofs = band * 256 + (j // 16 * 256 + j % 16)[None, :] + (rows % 16 * 16)[:, None]
            sofs = band * 32 + (i // 2 * 32 + i % 2)[None, :] + (rows % 16 * 2)[:, None]
        else:
            wofs = (band + kw[None, :] // 16) * 256 + (rows % 16 * 16)[:, None] + kw[None, :] % 16
            sofs = (band + ks[None, :] // 2) * 32 + (rows % 16 * 2)[:, None] + ks[None, :] % 2
    else:
        wofs = rows[:, None] * tl.multiple_of(K // 8, 8) + kw[None, :]
        sofs = rows[:, None] * (K // 64) + ks[None, :]
    words = tl.load(w_ptr + wofs, mask=rmask[:, None], other=0)
    sw = tl.load(sf_ptr + sofs, mask=rmask[:, None], other=0)
    return words, sw


@triton.jit
def _scale_bytes(sw, BN: tl.constexpr, BK: tl.constexpr):
    """Scale words [BN, BK/64] -> each weight word's scale byte [BN, BK/8] (block j: byte j % 4)."""
    NB: tl.constexpr = BK // 16
    sfb = tl.reshape((sw[:, :, None] >> (tl.arange(0, 4) * 8)[None, None, :]) & 0xFF, (BN, NB))
    return tl.reshape(tl.broadcast_to(sfb[:, :, None], (BN, NB, 2)), (BN, 2 * NB))


@triton.jit
def _x_pairs(row_ptr, k0, BK: tl.constexpr):
    """Activations [k0, k0 + BK) of one bf16 row, read as int32 words of two (element 2i in the low half)."""
    return tl.load(row_ptr.to(tl.pointer_type(tl.int32)) + k0 // 2 + tl.arange(0, BK // 2))


@triton.jit
def _word_dots(acc, words, sf, xw, ASM: tl.constexpr, BLOCKED: tl.constexpr = False):
    """acc [BN, BK/8] + weight words [BN, BK/8] (their scale operands alike; BLOCKED: a blocked weight's) times one
    row of activations (`_x_pairs`, [BK/2]): each word's 8 products (scale included) added in fp32, one FMA each."""
    q02, q13 = tl.split(tl.reshape(xw, (1, xw.shape[0] // 4, 2, 2)))  # pair q of a word: elements 2q, 2q + 1
    q0, q2 = tl.split(q02)
    q1, q3 = tl.split(q13)
    r0, r1, r2, r3 = _weight_pairs(words, sf, ASM, BLOCKED=BLOCKED)  # pair j: elements (j, j + 4)
    acc += _lo(r0) * _lo(q0)
    acc += _lo(r1) * _hi(q0)
    acc += _lo(r2) * _lo(q1)
    acc += _lo(r3) * _hi(q1)
    acc += _hi(r0) * _lo(q2)
    acc += _hi(r1) * _hi(q2)
    acc += _hi(r2) * _lo(q3)
    acc += _hi(r3) * _hi(q3)
    return acc


@triton.jit
def _mma_t(acc, w, a, ASM: tl.constexpr):
    """acc [BN, BM] + w [BN, BK] @ a[BM, BK].T (fp32 operands under the interpreter, whose BF16 dot is wrong)."""
    if ASM:
        acc = tl.dot(w, tl.trans(a), acc)
    else:
        acc = tl.dot(w.to(tl.float32), tl.trans(a.to(tl.float32)), acc, input_precision="ieee")
    return acc


@triton.jit
def _nvfp4_gemv_kernel(
    a_ptr, w_ptr, sf_ptr, out_ptr, part_ptr, count_ptr, scalars_ptr,
    M, N, K, K_PER_SPLIT, stride_am, stride_om, SPLIT,
    ALPHA_IDX: tl.constexpr, ASM: tl.constexpr, EVEN_N: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, FMA: tl.constexpr = False,
    STAGES: tl.constexpr = 1, BLOCKED: tl.constexpr = False,
):  # fmt: skip
    """out[M, N] = alpha * a[M, K] @ W.T for few rows of `a` (decode), K a multiple of BK (itself a
    multiple of 64). The weight is the MMA's first operand (its rows on the MMA's M side, tokens on N),
    decoded from whole int32 words straight into the operand's registers; the scales are read four
    blocks to an int32. With SPLIT > 1 each program sums one K range into part_ptr; the last program
    of a tile to finish (a counter per tile) adds the parts up in a fixed order: deterministic, one
    launch. Weight values carry 2^-8 (see _DECODE_PTX), taken back out with alpha."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    nmask = (rn < N) | EVEN_N  # EVEN_N: no row falls outside
    if FMA:  # one row of activations (BM == 1): fp32 products of the decoded words, no MMA
        acc2 = tl.zeros((BN, BK // 8), dtype=tl.float32)
        k_end = tl.minimum((pid_k + 1) * K_PER_SPLIT, K)
        # Triton's pipeliner keeps STAGES tiles of weights, scales and activations in flight (cp.async)
        for k0 in tl.range(pid_k * K_PER_SPLIT, k_end, BK, num_stages=STAGES):
            words, sw = _load_words(w_ptr, sf_ptr, rn, nmask, k0, K, BK, BLOCKED)
            acc2 = _word_dots(acc2, words, _scale_bytes(sw, BN, BK), _x_pairs(a_ptr, k0, BK), ASM, BLOCKED=BLOCKED)
        acc = tl.reshape(tl.sum(acc2, axis=1), (BN, BM))
    else:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
        for k0 in range(pid_k * K_PER_SPLIT, tl.minimum((pid_k + 1) * K_PER_SPLIT, K), BK):
            w = _nvfp4_tile(w_ptr, sf_ptr, rn, nmask, k0, K, ASM, BN, BK, BLOCKED)
            a = tl.load(a_ptr + rm[:, None] * stride_am + k0 + tl.arange(0, BK)[None, :], mask=rm[:, None] < M, other=0.0)
            acc = _mma_t(acc, w, a, ASM)
    alpha = tl.load(scalars_ptr + ALPHA_IDX) * 256.0
    _store_tile(acc, out_ptr, part_ptr, pid_k, rn, rm, M, N, stride_om, alpha, SPLIT)
    if SPLIT > 1:
        _add_parts(part_ptr, out_ptr, count_ptr + pid_m * tl.num_programs(0) + pid_n, rn, rm, M, N, stride_om, alpha, SPLIT)


@triton.jit
def _store_tile(acc, out_ptr, part_ptr, pid_k, rn, rm, M, N, stride_om, alpha, SPLIT):
    """acc [rows rn, tokens rm] -> out (x alpha, in out's dtype), or with SPLIT > 1 this program's part of
    the fp32 sums [SPLIT, M, N]."""
    omask = (rn[:, None] < N) & (rm[None, :] < M)
    if SPLIT == 1:
        tl.store(out_ptr + rm[None, :] * stride_om + rn[:, None], (acc * alpha).to(out_ptr.dtype.element_ty), mask=omask)
    else:
        tl.store(part_ptr + pid_k * M * N + rm[None, :] * N + rn[:, None], acc, mask=omask)


@triton.jit
def _add_parts(part_ptr, out_ptr, tile, rn, rm, M, N, stride_om, alpha, SPLIT):
    """One-launch split-K: after this program's part [SPLIT, M, N] is written, the last program of the tile
    (rows rn x tokens rm) to arrive (its counter) adds the parts up in a fixed order -- deterministic -- and
    resets the counter for the next call."""
    tl.debug_barrier()  # every thread's part is written before the counter moves
    if tl.atomic_add(tile, 1, sem="acq_rel") == SPLIT - 1:
        omask = (rn[:, None] < N) & (rm[None, :] < M)
        pptrs = part_ptr + rm[None, :] * N + rn[:, None]
        total = tl.zeros((rn.shape[0], rm.shape[0]), dtype=tl.float32)
        for s in range(SPLIT):
            total += tl.load(pptrs + s * M * N, mask=omask, other=0.0, cache_modifier=".cg")
        tl.store(out_ptr + rm[None, :] * stride_om + rn[:, None], (total * alpha).to(out_ptr.dtype.element_ty), mask=omask)
        tl.atomic_xchg(tile, 0)


# -- a few rows (2-16 tokens, up to 64 of a small matrix, or one of a long matrix): mma.sync, operands filled by PTX --
# The one-row kernel's FMAs cost 8 tokens 8x the work; Triton's own MMA route moves each decoded tile through shared
# memory. Here each warp owns TR x TN tiles of `mma.sync.m16n8k16` (TR blocks of 16 weight rows on the MMA's M side, TN
# groups of 8 tokens on N: 1 x 1 for 8 tokens a program, 2 x 2 for 16; more tokens in groups of programs, see _shared_k)
# and puts the decoded weights straight into the MMA's registers. A warp's step is TR blocks of a blocked weight
# (NVFP4Weight: 16 rows x 128 columns, 1 KB read whole; the next step's block follows it). Lane (g, t) = (lane / 4, lane
# % 4) reads 16 bytes of rows g and g + 8 of each block: columns [32 t, 32 t + 32) of the step, four words. A K sum does
# not care in which order its terms come, so the MMA's k index need not be the column: word w's pairs (j, j + 4) (what
# the decode gives) go to k = (2 t, 2 t + 1) and (2 t + 8, 2 t + 9) of two MMAs, and the same lane hands the MMA the
# activations of those same columns (tokens g and g + 8, two prmt a word); with 2 x 2 tiles each decoded block and each
# token group serve two MMAs, which halves the activation reads a weight byte costs. The next step's words are loaded
# into a second register set while this step computes (the loop runs two steps a turn).
# Triton does not know which thread holds which element of the [32 W] tensors these values live in; the
# PTX checks that element e sits on thread e and otherwise returns NaN, never a wrong number.
def _mma_sync_loads_ptx(TR: int, words: list[str], scales: list[str], wa: str, sa: str, tw: str, pred: str = "") -> str:
    """PTX: a lane's part of a step's TR blocks, streamed past L1: four words of rows g and g + 8 (16 bytes each,
    512 bytes apart) and their two scale bytes (64 bytes apart); block r at wa + r tw and sa + r tw / 8 (bytes)."""
    out = ["{", ".reg .b64 pw, ps, d;", f"mov.b64 pw, {wa}; mov.b64 ps, {sa};"]
    for r in range(TR):
        if r:
            out.append(f"cvt.s64.s32 d, {tw}; add.s64 pw, pw, d; shr.s64 d, d, 3; add.s64 ps, ps, d;")
        w = words[8 * r : 8 * r + 8]
        out += [f"{pred}ld.global.nc.L1::no_allocate.v4.u32 {{{', '.join(w[:4])}}}, [pw];",
                f"{pred}ld.global.nc.L1::no_allocate.v4.u32 {{{', '.join(w[4:])}}}, [pw+512];",
                f"{pred}ld.global.nc.L1::no_allocate.u16 {scales[2 * r]}, [ps];",
                f"{pred}ld.global.nc.L1::no_allocate.u16 {scales[2 * r + 1]}, [ps+64];"]
    return "\n".join(out + ["}"])


def _x_loads_ptx(TN: int, x: list[str], xa: list[str], pred: str = "") -> list[str]:
    """PTX: a lane's activations of a step, 64 bytes of token g (+ 8) a token group: x[16 n ... 16 n + 15] from xa[n]."""
    return [f"{pred}ld.global.nc.v4.u32 {{{', '.join(x[16 * n + 4 * v : 16 * n + 4 * v + 4])}}}, [{xa[n]}+{16 * v}];"
            for n in range(TN) for v in range(4)]  # fmt: skip


def _mma_sync_step_ptx(TR: int, TN: int, px: bool = False, check: bool = True, sets: int = 1) -> str:
    """One 128-column step of a warp's TR x TN tiles (TR blocks of 16 weight rows, TN groups of 8 tokens). Operands:
    (out) the 4 TR TN accumulators, the next step's 8 TR words and 2 TR scale pairs (px: and 16 TN activation words);
    (in) the accumulators, this step's words (block r: rows g 8r..8r+3, g + 8 8r+4..8r+7) and scale pairs (two bytes:
    blocks 2t, 2t + 1) (px: and activations), the next step's addresses (words, scales), the activation addresses of
    tokens g (+ 8) (px: the next step's, else this step's), the byte stride between the blocks' words, the steps left
    after this one and the element index. Accumulators of block r and token group n: 4 (r TN + n) ... + 3; with two
    `sets`, 4 (2 (r TN + n) + k % 2) ... + 3 for word k: two chains of MMAs a tile, half as long, added after the loop.
    Without `check` the step does not check the element index (only for kernels whose warp sum checks it)."""
    ops = iter(f"${i}" for i in range(1000))
    take = lambda n: [next(ops) for _ in range(n)]  # noqa: E731
    n_c, n_x = 4 * sets * TR * TN, 16 * TN if px else 0
    c, nw, ns, nx = take(n_c), take(8 * TR), take(2 * TR), take(n_x)
    c_in, w, s, x = take(n_c), take(8 * TR), take(2 * TR), take(n_x)
    (wa, sa), xa, (tw, left, elem) = take(2), take(TN), take(3)
    out = ["{", _REGS, f".reg .b32 q<{32 * TR}>, x<{16 * TN}>, b<{2 * TN}>, ss<{4 * TR}>, tx;", ".reg .pred pn, bad;",
           f"setp.gt.s32 pn, {left}, 0;", _mma_sync_loads_ptx(TR, nw, ns, wa, sa, tw, "@pn ")]
    if px:  # the next step's activations, a step ahead like the weights
        out += _x_loads_ptx(TN, nx, xa, "@pn ")
    else:
        x = [f"x{i}" for i in range(16 * TN)]
        out += _x_loads_ptx(TN, x, xa)
    for r in range(TR):
        for h in range(2):  # rows g, g + 8: ss<4r + 2h>, ss<4r + 2h + 1> are their two blocks' scales
            sr = s[2 * r + h]
            out.append(_scale_ptx(sr, f"ss{4 * r + 2 * h}") + f"shr.b32 t, {sr}, 8; " + _scale_ptx("t", f"ss{4 * r + 2 * h + 1}"))
            out += [_pairs_ptx(w[8 * r + 4 * h + k], [f"q{32 * r + 16 * h + 4 * k + j}" for j in range(4)], f"ss{4 * r + 2 * h + k // 2}", True)
                    for k in range(4)]  # fmt: skip
    for k in range(4):  # word k of the lane's four
        for h in range(2):  # pairs (2h, 2h + 4) and (2h + 1, 2h + 5): activation words 4k + h and 4k + h + 2
            for n in range(TN):
                x0, x2 = x[16 * n + 4 * k + h], x[16 * n + 4 * k + h + 2]
                out.append(f"prmt.b32 b{2 * n}, {x0}, {x2}, 0x5410; prmt.b32 b{2 * n + 1}, {x0}, {x2}, 0x7632;")
            for r in range(TR):
                q = [f"q{32 * r + 4 * k + 2 * h}", f"q{32 * r + 16 + 4 * k + 2 * h}", f"q{32 * r + 4 * k + 2 * h + 1}", f"q{32 * r + 16 + 4 * k + 2 * h + 1}"]
                for n in range(TN):
                    a = sets * (r * TN + n) + k % sets  # this MMA's accumulator set
                    acc = c[4 * a : 4 * a + 4]
                    acc_in = c_in[4 * a : 4 * a + 4] if h == 0 and k < sets else acc
                    out.append(f"mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {{{', '.join(acc)}}}, {{{', '.join(q)}}}, "
                               f"{{b{2 * n}, b{2 * n + 1}}}, {{{', '.join(acc_in)}}};")  # fmt: skip
    if check:
        out.append(f"mov.u32 tx, %tid.x; setp.ne.u32 bad, tx, {elem};")
        out += [f"@bad mov.b32 {r}, 0x7FC00000;" for r in c]
    return "\n".join(out + ["}"])


def _mma_sync_load_ptx(TR: int, TN: int, px: bool = False) -> str:
    """PTX: the first step's words and scales (operands as in the step: out words, scales (px: activations); in
    addresses, stride (px: activation addresses))."""
    nx = 16 * TN if px else 0
    regs = [f"${i}" for i in range(10 * TR + nx + 3 + (TN if px else 0))]
    out = _mma_sync_loads_ptx(TR, regs[: 8 * TR], regs[8 * TR : 10 * TR], *regs[10 * TR + nx : 10 * TR + nx + 3])
    if px:
        out = "{\n" + out + "\n" + "\n".join(_x_loads_ptx(TN, regs[10 * TR : 10 * TR + nx], regs[10 * TR + nx + 3 :])) + "\n}"
    return out


def _sets(tr: int, px: bool) -> int:
    """Accumulator sets of the mma.sync step: two for 2 x 2 tiles with activations ahead, whose MMA chains were the
    longest wait (BENCHMARKS.md, fifteenth session: either change alone was slower, both together faster)."""
    return 2 if tr == 2 and px else 1


@functools.cache
def _sets_sum_ptx(nc: int) -> str:
    """PTX: nc accumulators from their two sets (operands: out nc sums; in the 2 nc accumulators, set by set a tile)."""
    return "\n".join(f"add.f32 ${4 * i + j}, ${nc + 8 * i + j}, ${nc + 8 * i + 4 + j};" for i in range(nc // 4) for j in range(4))


def _step_checks(tr: int, tn: int, kw: int) -> bool:
    """Whether the mma.sync step checks the element index itself. 2 x 2 tiles whose warps share K leave it to the warp
    sum (_warp_sum_ptx): 2-5% at 16 rows (BENCHMARKS.md, fifteenth session); the smaller tiles keep it in the step,
    where dropping it was slower."""
    return not (tr == 2 and tn == 2 and kw > 1)


# (TR, TN, activations ahead, the step checks the element index) -> the step's and the first load's PTX; 2 x 2 tiles
# with activations ahead keep two accumulator sets (_sets)
_MMA_SYNC_PTX = {(tr, tn, px, check): (_mma_sync_step_ptx(tr, tn, px, check, _sets(tr, px)), _mma_sync_load_ptx(tr, tn, px))
                 for tr in (1, 2) for tn in (1, 2) for px in (False, True) for check in (False, True)}  # fmt: skip


@functools.cache
def _warp_sum_ptx(nc: int, warps: int, kw: int, spread: bool = True) -> str:
    """PTX: a thread's nc accumulators summed over the kw warps of its row group (warps kw g ... kw g + kw - 1)
    through a static shared buffer, one barrier (Triton's reduction of [32 W] tensors took four a value). The
    buffer holds accumulators 4q ... 4q + 3 of thread x at 16 (32 warps q + x): conflict-free 16-byte accesses.
    Warp j of a group adds only the fragments it stores (q = j mod kw, as _mma_sync_store's `keep`; without
    `spread`, warp 0 all of them), the others are zero: 3-4% at 9-16 rows with 8 warps (BENCHMARKS.md, fifteenth
    session). Operands: out the nc sums; in the accumulators, the element index."""
    lanes = 32 * warps
    acc, out, elem = [f"${nc + i}" for i in range(nc)], [f"${i}" for i in range(nc)], f"${2 * nc}"
    ptx = ["{", f".shared .align 16 .b8 wsum[{16 * lanes * (nc // 4)}];", ".reg .b32 a, b, tx, wj;", ".reg .f32 v<4>;",
           ".reg .pred bad, other;", "mov.u32 tx, %tid.x; mov.u32 a, wsum; shl.b32 b, tx, 4; add.u32 b, a, b;"]
    ptx += [f"st.shared.v4.f32 [b+{16 * lanes * q}], {{{', '.join(acc[4 * q : 4 * q + 4])}}};" for q in range(nc // 4)]
    ptx += ["bar.sync 0;", f"and.b32 b, tx, {-32 * kw}; and.b32 tx, tx, 31; add.u32 b, b, tx; shl.b32 b, b, 4; add.u32 b, a, b;",
            f"mov.u32 wj, %tid.x; shr.u32 wj, wj, 5; rem.u32 wj, wj, {kw};"]  # the warp's place in its group
    for q in range(nc // 4):
        o = out[4 * q : 4 * q + 4]
        ptx += [f"mov.f32 {r}, 0f00000000;" for r in o] + [f"setp.ne.u32 other, wj, {q % kw if spread else 0}; @other bra SKIP{q};"]
        ptx.append(f"ld.shared.v4.f32 {{{', '.join(o)}}}, [b+{16 * lanes * q}];")
        for k in range(1, kw):
            ptx.append(f"ld.shared.v4.f32 {{v0, v1, v2, v3}}, [b+{16 * lanes * q + 512 * k}];")
            ptx += [f"add.f32 {o[j]}, {o[j]}, v{j};" for j in range(4)]
        ptx.append(f"SKIP{q}:")
    ptx.append(f"mov.u32 tx, %tid.x; setp.ne.u32 bad, tx, {elem};")
    ptx += [f"@bad mov.b32 {r}, 0x7FC00000;" for r in out]
    return "\n".join(ptx + ["}"])


@triton.jit
def _i64(p):
    return p.to(tl.int64, bitcast=True)


@triton.jit
def _mma_sync_step(c, w, wp, sp, xp, d, left, elem, tw, TR: tl.constexpr, TN: tl.constexpr, STEP: tl.constexpr,
                   PX: tl.constexpr = False, SETS: tl.constexpr = 1):  # fmt: skip
    """The step at column offset d (relative to the split's start): accumulators c and this step's words w (tuples;
    PX: its activations too) -> the accumulators and the next step's words (TR blocks on: 256 TR words and 128 TR scale
    bytes; PX: and activations)."""
    e = d + 128
    n_c: tl.constexpr = 4 * SETS * TR * TN
    n_w: tl.constexpr = 10 * TR + 16 * TN if PX else 10 * TR
    xd = e if PX else d  # PX: the next step's activations are loaded, else this step's
    xa = (_i64(xp[0] + xd),) if TN == 1 else (_i64(xp[0] + xd), _i64(xp[1] + xd))
    r = tl.inline_asm_elementwise(
        STEP, "=&r," * (n_c + n_w) + "r," * (n_c + n_w) + "l," * (2 + TN) + "r,r,r",
        c + w + (_i64(wp + 2 * e), _i64(sp + e)) + xa + (tw, left, elem),
        dtype=(tl.float32,) * n_c + (tl.int32,) * n_w, is_pure=False, pack=1)  # fmt: skip
    return r[:n_c], r[n_c:]


@triton.jit
def _mma_sync_range(wp, sp, xp, span, elem, tw, W: tl.constexpr, TR: tl.constexpr, TN: tl.constexpr, STEP: tl.constexpr,
                    LOAD: tl.constexpr, PX: tl.constexpr, ODD: tl.constexpr, SETS: tl.constexpr, SETS_SUM: tl.constexpr):
    """A warp's accumulators (4 TR TN) over its `span` columns from wp / sp / xp (ODD: span may be an odd number of
    128-column steps): the first step's loads, then two steps a turn."""
    if PX:
        w = tl.inline_asm_elementwise(LOAD, "=&r," * (10 * TR + 16 * TN) + "l,l,r" + ",l" * TN, [_i64(wp), _i64(sp), tw] + [_i64(p) for p in xp],
                                      dtype=(tl.int32,) * (10 * TR + 16 * TN), is_pure=False, pack=1)  # fmt: skip
    else:
        w = tl.inline_asm_elementwise(LOAD, "=&r," * (10 * TR) + "l,l,r", [_i64(wp), _i64(sp), tw],
                                      dtype=(tl.int32,) * (10 * TR), is_pure=False, pack=1)  # fmt: skip
    c = (tl.zeros((32 * W,), dtype=tl.float32),) * (4 * SETS * TR * TN)
    for d in range(0, span, 256):  # two steps a turn: two register sets, so a load is first used a step later
        c, v = _mma_sync_step(c, w, wp, sp, xp, d, (span - d) // 128 - 1, elem, tw, TR, TN, STEP, PX, SETS)
        if ODD:  # an odd number of steps: the last turn has one
            if d + 128 < span:
                c, w = _mma_sync_step(c, v, wp, sp, xp, d + 128, (span - d) // 128 - 2, elem, tw, TR, TN, STEP, PX, SETS)
        else:
            c, w = _mma_sync_step(c, v, wp, sp, xp, d + 128, (span - d) // 128 - 2, elem, tw, TR, TN, STEP, PX, SETS)
    if SETS == 2:
        c = tl.inline_asm_elementwise(SETS_SUM, "=f," * (4 * TR * TN) + "f," * (8 * TR * TN - 1) + "f", c,
                                      dtype=(tl.float32,) * (4 * TR * TN), is_pure=True, pack=1)  # fmt: skip
    return c


@triton.jit
def _mma_sync_store(ptr, f, row, tok, M, N, stride, alpha, keep):
    """Accumulator fragment f -> [tokens, rows] where keep: f[0], f[1] are row g's tokens 2t, 2t + 1; f[2], f[3] row
    g + 8's."""
    c0, c1, c2, c3 = f
    ty = ptr.dtype.element_ty
    p = ptr + tok * stride + row
    tl.store(p, (c0 * alpha).to(ty), mask=keep & (tok < M) & (row < N))
    tl.store(p + stride, (c1 * alpha).to(ty), mask=keep & (tok + 1 < M) & (row < N))
    tl.store(p + 8, (c2 * alpha).to(ty), mask=keep & (tok < M) & (row + 8 < N))
    tl.store(p + stride + 8, (c3 * alpha).to(ty), mask=keep & (tok + 1 < M) & (row + 8 < N))


@triton.jit
def _nvfp4_mma_sync_kernel(
    a_ptr, w_ptr, sf_ptr, out_ptr, part_ptr, count_ptr, scalars_ptr, M, N, K, K_PER_SPLIT, stride_am, stride_om, SPLIT,
    ALPHA_IDX: tl.constexpr, ASM: tl.constexpr, W: tl.constexpr, TR: tl.constexpr, TN: tl.constexpr, STEP: tl.constexpr,
    LOAD: tl.constexpr, KW: tl.constexpr = 1, PX: tl.constexpr = False, ODD: tl.constexpr = False, SUM: tl.constexpr = "",
    SETS: tl.constexpr = 1, SETS_SUM: tl.constexpr = "",
):  # fmt: skip
    """out[M, N] = alpha * a[M, K] @ W.T (8 TN rows a program, more in groups along the grid's third axis), W blocked, N
    a multiple of 16 TR, K_PER_SPLIT of 256 KW (ODD: of 128 KW, a warp's range may be an odd number of steps): W
    warps, W / KW groups of 16 TR weight rows, through mma.sync (see above). KW > 1: the KW warps of a group each take
    an equal part of the program's K range, their sums added in shared memory at the end by SUM (_warp_sum_ptx, one
    barrier; no global parts, no second pass); then every K range must be full. PX: each step loads the next step's
    activations too (more registers, no wait on them). SETS: accumulator sets (_sets), added by SETS_SUM after the
    loop. Under the interpreter the same tiles through tl.dot."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    tok0 = tl.program_id(2) * (8 * TN)  # more tokens than a program's 8 TN: each group of them in its own programs
    a_ptr += tok0 * stride_am
    out_ptr += tok0 * stride_om
    M -= tok0
    ks = pid_k * K_PER_SPLIT
    ke = tl.minimum(ks + K_PER_SPLIT, K)
    alpha = tl.load(scalars_ptr + ALPHA_IDX) * 256.0
    G: tl.constexpr = W // KW  # row groups
    R: tl.constexpr = 16 * TR * G  # rows a program
    rn = pid_n * R + tl.arange(0, R)
    rm = tl.arange(0, 8 * TN)
    if ASM:
        elem = tl.arange(0, 32 * W)  # the thread this element must be on
        g = elem % 32 // 4
        t = elem % 4
        row = pid_n * R + elem // 32 // KW * (16 * TR) + g
        span = (ke - ks) // KW  # each warp's columns
        kw = ks + elem // 32 % KW * span  # and where they start
        block = tl.minimum(row // 16, N // 16 - TR).to(tl.int64) * (K // 128) + kw // 128  # the warp's first block
        wp = w_ptr + block * 256 + elem % 32 * 4  # row g: word 16 g + 4 t of the block
        sp = sf_ptr.to(tl.pointer_type(tl.uint8)) + block * 128 + elem % 32 * 2
        tw = K // 128 * 1024  # bytes from a block's words to the next 16 rows' (their scales: an eighth of that)
        x0 = a_ptr + tl.minimum(g, M - 1).to(tl.int64) * stride_am + kw + 32 * t
        xp = (x0,) if TN == 1 else (x0, a_ptr + tl.minimum(g + 8, M - 1).to(tl.int64) * stride_am + kw + 32 * t)
        c = _mma_sync_range(wp, sp, xp, span, elem, tw, W, TR, TN, STEP, LOAD, PX, ODD, SETS, SETS_SUM)
        if KW > 1:  # the group's warps' sums, added in shared memory; warp j of a group stores the fragments j, j + KW..
            c = tl.inline_asm_elementwise(SUM, "=&f," * (4 * TR * TN) + "f," * (4 * TR * TN) + "r", c + (elem,),
                                          dtype=(tl.float32,) * (4 * TR * TN), is_pure=False, pack=1)  # fmt: skip
        for r in tl.static_range(TR):  # block r's rows, token group n: accumulators 4 (r TN + n) ... + 3
            for n in tl.static_range(TN):
                f = c[4 * (r * TN + n)], c[4 * (r * TN + n) + 1], c[4 * (r * TN + n) + 2], c[4 * (r * TN + n) + 3]
                keep = elem // 32 % KW == (r * TN + n) % KW
                if SPLIT == 1:
                    _mma_sync_store(out_ptr, f, row + 16 * r, 8 * n + 2 * t, M, N, stride_om, alpha, keep)
                else:
                    _mma_sync_store(part_ptr + pid_k * M * N, f, row + 16 * r, 8 * n + 2 * t, M, N, N, 1.0, keep)
    else:
        acc = tl.zeros((R, 8 * TN), dtype=tl.float32)
        for k0 in range(ks, ke, 128):
            wt = _nvfp4_tile(w_ptr, sf_ptr, rn, rn < N, k0, K, False, R, 128, BLOCKED=True)
            a = tl.load(a_ptr + rm[:, None] * stride_am + k0 + tl.arange(0, 128)[None, :], mask=rm[:, None] < M, other=0.0)
            acc = _mma_t(acc, wt, a, False)
        _store_tile(acc, out_ptr, part_ptr, pid_k, rn, rm, M, N, stride_om, alpha, SPLIT)
    if SPLIT > 1:
        _add_parts(part_ptr, out_ptr, count_ptr + pid_n, rn, rm, M, N, stride_om, alpha, SPLIT)


@triton.jit
def _nvfp4_dequant_kernel(w_ptr, sf_ptr, out_ptr, N, K, ASM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                          BLOCKED: tl.constexpr):  # fmt: skip
    """W[N, K] as bf16 `code x scale x 2^-8` values (exact), for the prefill path's BF16 GEMM."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1) * BK
    w = _nvfp4_tile(w_ptr, sf_ptr, rn, rn < N, k0, K, ASM, BN, BK, BLOCKED)
    kk = k0 + tl.arange(0, BK)
    tl.store(out_ptr + rn[:, None] * K + kk[None, :], w.to(tl.bfloat16), mask=(rn < N)[:, None])


@dataclass
class NVFP4Weight:
    """An NVFP4 Linear's tensors on the GPU, with its fp32 scalars precomputed on the same device
    (alpha for each mode and 1/input_scale) and on the host (the alphas, for cuBLAS), so a call needs
    no host synchronization.

    `blocked`: the weight and its scales are stored in blocks of 16 rows x 128 columns (1 KB of codes, 128
    bytes of scales), each block row-major, the blocks of a 16-row band one after another, band after band. A
    warp's step of a decode GEMV then reads one contiguous kilobyte instead of 64 bytes from each of 16 rows 2 KB
    or more apart, which HBM serves measurably faster (BENCHMARKS.md, eleventh session). The bits of each int32
    word of codes are moved as well (_BLOCKED_MAG), for a shorter decode."""

    weight: torch.Tensor  # uint8 [N, K/2] (blocked: the same bytes in blocks)
    weight_scale: torch.Tensor  # E4M3 bits, uint8 [N, K/16] (blocked: likewise)
    scalars: torch.Tensor  # fp32 [4]: ws2, input_scale * ws2, 1 / input_scale, 1
    alphas: tuple[float, float] = (float("nan"), float("nan"))  # ws2, input_scale * ws2 (fp32 values)
    blocked: bool = False

    @classmethod
    def from_parts(cls, weight, weight_scale, weight_scale_2, input_scale=None, blocked: bool | None = None) -> NVFP4Weight:
        """The kernels' form of a checkpoint's NVFP4 tensors; blocked (None: wherever N is a multiple of 16
        and K of 128) costs one copy of the weight."""
        ws2 = weight_scale_2.detach().float().reshape(()).cpu()
        isc = (input_scale.detach().float().reshape(()).cpu() if input_scale is not None
               else torch.tensor(float("nan")))  # fmt: skip
        one = torch.tensor(1.0)
        scalars = torch.stack([ws2, isc * ws2, one / isc, one])  # divided on the CPU: exactly rounded
        n, k = weight.shape[0], weight.shape[1] * 2
        if blocked is None:
            blocked = n % 16 == 0 and k % 128 == 0
        elif blocked and (n % 16 or k % 128):
            raise ValueError(f"a blocked NVFP4 weight needs N a multiple of 16 and K of 128, not {n} x {k}")
        weight_scale = weight_scale.view(torch.uint8)
        if blocked:
            weight, weight_scale = _blocked_codes(_to_blocks(weight, 64)), _to_blocks(weight_scale, 8)
        return cls(_aligned(weight), _aligned(weight_scale), scalars.to(weight.device),
                   (float(scalars[0]), float(scalars[1])), blocked)  # fmt: skip

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape[0], self.weight.shape[1] * 2


def _to_blocks(t: torch.Tensor, width: int) -> torch.Tensor:
    """Bytes [N, C] -> the same shape holding blocks of 16 rows x `width` bytes, row-major inside, in
    row-band order (NVFP4Weight.blocked)."""
    n, c = t.shape
    return t.reshape(n // 16, 16, c // width, width).transpose(1, 2).reshape(n, c)


def _blocked_codes(t: torch.Tensor) -> torch.Tensor:
    """Packed codes (uint8 [N, C], C a multiple of 4; element e of an int32 word in nibble e: sign bit 4e + 3) with
    each word's bits moved to _BLOCKED_MAG / _BLOCKED_SIGN."""
    w = t.contiguous().view(torch.int32)
    out = torch.zeros_like(w)
    for e, (mag, sign) in enumerate(zip(_BLOCKED_MAG.value, _BLOCKED_SIGN.value)):
        out |= ((w >> (4 * e)) & 7) << mag
        out |= ((w >> (4 * e + 3)) & 1) << sign
    return out.view(torch.uint8)


def _from_blocks(t: torch.Tensor, width: int) -> torch.Tensor:
    """The inverse of _to_blocks: rows of `width`-byte blocks back to row-major bytes."""
    n, c = t.shape
    return t.reshape(n // 16, c // width, 16, width).transpose(1, 2).reshape(n, c)


def _unblocked_codes(t: torch.Tensor) -> torch.Tensor:
    """The inverse of _blocked_codes: each word's bits back in the checkpoint's nibbles."""
    w = t.contiguous().view(torch.int32)
    out = torch.zeros_like(w)
    for e, (mag, sign) in enumerate(zip(_BLOCKED_MAG.value, _BLOCKED_SIGN.value)):
        out |= ((w >> mag) & 7) << (4 * e)
        out |= ((w >> sign) & 1) << (4 * e + 3)
    return out.view(torch.uint8)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` contiguous at a 16-byte aligned address (the kernels read int32 words and 16-byte vectors)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


# Up to this many rows of activations (and K a multiple of 64) the GEMV kernel runs; otherwise the weight
# is dequantized to a transient BF16 copy and cuBLAS multiplies (BENCHMARKS.md, "NVFP4 linear, third
# version").
GEMV_MAX_M = 64

_COUNTERS: dict[tuple, torch.Tensor] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Per-tile arrival counters for the one-launch split-K (zero between calls: the last program of a
    tile resets its counter), one buffer per device and stream."""
    key = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = _COUNTERS[key] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return buf


class Tiling(NamedTuple):
    """Which GEMV kernel runs a decode-sized product, and its tiling. `kernel`: "fma" (one row: fp32 FMAs),
    "mma.sync" (a blocked weight, TR x TN tiles a warp: BM = 8 TN tokens a program, more rows in groups of BM, each
    group in its own programs; BN = 16 TR x warps / kwarps rows, BK 256 = two 128-column steps a turn, or 128 where a
    warp's range may be an odd number of steps; stages unused) or "dot" (Triton's MMA: BM tokens, a cp.async pipeline
    of `stages`)."""

    kernel: str
    bm: int
    bn: int
    bk: int
    warps: int
    split: int  # K splits, added in one launch (deterministic)
    stages: int = 1
    kwarps: int = 1  # "mma.sync": warps that share a program's K range (BN = 16 TR x warps / kwarps rows)
    ahead: bool = False  # "mma.sync": activations loaded a step ahead, like the weights (more registers)

    @property
    def tr(self) -> int:
        """"mma.sync": blocks of 16 weight rows a warp (TR; TN = BM / 8)."""
        return self.bn * self.kwarps // (16 * self.warps)


def _gemv_blocks(m: int, n: int, k: int, blocked: bool = True) -> Tiling:
    """The GEMV kernel and tiling for [m, k] @ [n, k].T, from sweeps on an H100 and H200 (BENCHMARKS.md)."""
    mma_sync = blocked and k % 256 == 0 and (m <= 8 or (m <= 16 and n % 32 == 0 and k >= 2048))
    shared = _shared_k(m, n, k) if blocked and k % 256 == 0 and m <= GEMV_MAX_M else None
    if interpreting():
        if shared or (m >= 2 and mma_sync):
            tn = shared.bm // 8 if shared else 1 if m <= 8 else 2
            tr = shared.tr if shared else tn
            return Tiling("mma.sync", 8 * tn, 16 * tr, 256, 1, (2 if k >= 512 and m <= 8 * tn else 1))
        return Tiling("fma" if m == 1 else "dot", (1 if m == 1 else 16), 16, 64, 4, (2 if k >= 128 else 1))
    if shared:
        return shared
    if m == 1:  # small tiles, a deep cp.async pipeline, K split only when there are few programs or long rows
        bn, bk, warps = (8 if n * k < 1 << 23 else 16), _fit(256, k), 2
        if k % 512 == 0 and (bn == 8 or k >= 8192):  # small matrices, long rows: twice the columns, twice the warps
            bk, warps = 512, 4
        tiles, split = triton.cdiv(n, bn), 1
        # long rows of narrow tiles (DeepSeek-V2-Lite's dense down, K 10944 in 171 64-column steps): split to 512
        # programs while a split keeps 32 steps, 35.7 -> 13.6 us (BENCHMARKS.md, eighteenth session)
        while ((tiles * split < 128 and k // (split * 2) >= 2 * bk)
               or (tiles * split < 512 and k // (split * 2 * bk) >= 32)):  # fmt: skip
            split *= 2
        return Tiling("fma", 1, bn, bk, warps, split, 5)
    if mma_sync:  # 64 rows a program (1 x 1 tiles a warp, 4 warps; 2 x 2, 2 warps), K split until >= 512 programs
        tiles, split = triton.cdiv(n, 64), 1
        while split < 16 and tiles * split < 512 and k // (split * 2) >= 256:
            split *= 2
        return Tiling("mma.sync", 8, 64, 256, 4, split) if m <= 8 else Tiling("mma.sync", 16, 64, 256, 2, split)
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    bn, warps = (64, 4) if n * k >= 1 << 24 else (32, 2)
    bk = _fit(128, k)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = 1
    while tiles * split < 264 and k // (split * 2) >= 2 * bk:  # 132 SMs
        split *= 2
    return Tiling("dot", bm, bn, bk, warps, split, 3)


def _shared_k(m: int, n: int, k: int) -> Tiling | None:
    """The mma.sync tiling with one row group a program and its K range shared by all its warps (summed in shared
    memory, no second pass), where that gives enough warps; else None. Rows beyond a program's 8 (16) tokens go in
    groups, each in its own programs on the same weights (the later groups' reads mostly hit L2). From H100 sweeps
    (BENCHMARKS.md, twelfth to fourteenth sessions):
    - matrices of 2^24 weights and more: 9-16 rows in 2 x 2 tiles (32 rows a program), 4 warps where that makes 1024
      warps, else 8, activations ahead (and two accumulator sets) where all 1024 or fewer are resident at once; more
      rows: None (Triton's MMA kernel);
    - else 1 x 1 tiles (16 rows a program) in groups of 8 tokens, warps doubled until there are 2048 or a warp's range
      would fall under four 128-column steps (at most 16 warps); activations are loaded a step ahead where all the
      groups' warps are resident at once (2048 or fewer), and beyond 16 rows, where they are not, 2 x 2 tiles with 8
      warps in groups of 16 tokens take over wherever K splits into 8 whole 128-column ranges;
    - one row too, where K has 2048 columns or more: it beats the one-row kernel there although 7 of its 8 token
      columns are padding.
    A warp's range must be whole 128-column steps."""
    if m == 1 and k < 2048:
        return None
    if n * k >= 1 << 24 and m > 8:
        if m > 16 or n % 32:
            return None
        tr, warps = 2, (4 if triton.cdiv(n, 32) * 4 >= 1024 else 8)  # 2 x 2 tiles
        ahead = triton.cdiv(n, 32) * warps <= 1024  # with two accumulator sets: 217 registers, all resident at once
    else:
        programs, tr, warps = triton.cdiv(n, 16), 1, 1
        while warps < 16 and programs * warps < 2048 and k // (2 * warps) >= 512:
            warps *= 2
        ahead = triton.cdiv(m, 8) * programs * warps <= 2048
        if m > 16 and not ahead and n % 32 == 0 and k % 1024 == 0:
            tr, warps = 2, 8
    if k % (128 * warps):
        return None
    bk = 256 if k % (256 * warps) == 0 else 128
    return Tiling("mma.sync", 16 if tr == 2 else 8, 16 * tr, bk, warps, 1, 1, warps, ahead)


def _fit(bk: int, k: int) -> int:
    """The largest of bk, bk/2, ... (at least 64) that divides k: NVFP4 tiles read whole BK columns."""
    while bk > 64 and k % bk:
        bk //= 2
    return bk


def nvfp4_dequantize(w: NVFP4Weight) -> torch.Tensor:
    """The weight as bf16 `code x block scale x 2^-8` values [N, K] (exact; alpha and 2^8 not applied)."""
    n, k = w.shape
    if k % 64:  # the kernel reads whole 64-column tiles; the plain-torch values are the same
        return (dequantize_nvfp4(w.weight, w.weight_scale.view(torch.float8_e4m3fn), 1.0, torch.float32) / 256).to(torch.bfloat16)
    out = torch.empty(n, k, dtype=torch.bfloat16, device=w.weight.device)
    bn, bk = (16, 64) if interpreting() else (64, 128)
    bk = _fit(bk, k)
    _nvfp4_dequant_kernel[(triton.cdiv(n, bn), k // bk)](
        w.weight.view(torch.int32), w.weight_scale.view(torch.int32), out, n, k, ASM=not interpreting(), BN=bn, BK=bk,
        BLOCKED=w.blocked)  # fmt: skip
    return out


def nvfp4_linear(x: torch.Tensor, w: NVFP4Weight, mode: str = "w4a16", out_dtype: torch.dtype = torch.bfloat16,
                 config: Tiling | None = None) -> torch.Tensor:  # fmt: skip
    """`x @ W.T` for an NVFP4 weight. `w4a4` first rounds the activations to NVFP4 with Blackwell's
    recipe (exact bf16 `code x scale` values), then both modes multiply the same way: up to GEMV_MAX_M
    rows with the GEMV kernel, else with a transient BF16 copy of the weight and cuBLAS (fp32
    accumulation, alpha in fp32). `out_dtype=torch.float32` keeps the fp32 accumulator (for checking
    against fp64); `config` (a Tiling) forces the GEMV kernel and its tiling (see `_gemv_blocks`)."""
    if mode not in ("w4a16", "w4a4"):
        raise ValueError(f"mode must be w4a16 or w4a4, not {mode!r}")
    *lead, K = x.shape
    N = w.weight.shape[0]
    if K % 16 or w.shape[1] != K:
        raise ValueError(f"activations have {K} columns; the NVFP4 weight needs {w.shape[1]} (a multiple of 16)")
    a = x.reshape(-1, K)
    if a.dtype != torch.bfloat16 or not a.is_contiguous():
        a = a.to(torch.bfloat16).contiguous()
    if mode == "w4a4":
        a = nvfp4_fake_quantize(a, w.scalars[1:])
    M = a.shape[0]
    idx = 0 if mode == "w4a16" else 1
    if config is None and (M > GEMV_MAX_M or K % 64):
        return _dequant_matmul(a, w, idx, out_dtype).reshape(*lead, N)
    a = _aligned(a)  # the GEMV kernels read int32 pairs and (mma.sync) 16-byte vectors of it
    tiling = config or _gemv_blocks(M, N, K, w.blocked)
    kernel, bm, bn, bk, warps, split, stages, kw, ahead = tiling
    if K % bk:
        raise ValueError(f"the GEMV kernel reads whole {bk}-column tiles; K = {K} is not a multiple")
    if kernel == "fma" and M != 1:
        raise ValueError(f"the one-row GEMV got {M} rows")
    tr = tiling.tr
    if kernel == "mma.sync" and (bm not in (8, 16) or (M > bm and split > 1) or not w.blocked or bk not in (128, 256) or warps % kw
                                 or tr not in (1, 2) or bn * kw != 16 * tr * warps or N % (16 * tr)):  # fmt: skip
        raise ValueError(f"the mma.sync kernel takes BM = 8 or 16 rows a program (more rows only without a K split), a "
                         f"blocked weight, BK 128 or 256 and BN 16 or 32 x warps / kwarps, N a multiple of 16 or 32 (BN's); "
                         f"got M = {M}, N = {N}, blocked = {w.blocked}, {config}")  # fmt: skip
    per_split = triton.cdiv(triton.cdiv(K, split), bk * kw) * bk * kw
    if K % per_split and kw > 1:
        raise ValueError(f"with {kw} warps on a K range every range must be full: K = {K}, {split} splits, {config}")
    split = triton.cdiv(K, per_split)
    out = torch.empty(M, N, dtype=out_dtype, device=x.device)
    grid = (triton.cdiv(N, bn), triton.cdiv(M, bm), split)
    parts = torch.empty(split, M, N, dtype=torch.float32, device=x.device) if split > 1 else out
    counters = _counters(x.device, grid[0] * grid[1]) if split > 1 else out
    args = (a, w.weight.view(torch.int32), w.weight_scale.view(torch.int32), out, parts, counters, w.scalars,
            M, N, K, per_split, a.stride(0), out.stride(0), split)  # fmt: skip
    if kernel == "mma.sync":
        step, load = _MMA_SYNC_PTX[tr, bm // 8, ahead, _step_checks(tr, bm // 8, kw)]
        summed = _warp_sum_ptx(4 * tr * bm // 8, warps, kw) if kw > 1 else ""
        sets = _sets(tr, ahead)
        _nvfp4_mma_sync_kernel[grid[0], grid[2], grid[1]](  # programs: rows, K splits, token groups
            *args, ALPHA_IDX=idx, ASM=not interpreting(), W=warps, TR=tr, TN=bm // 8, STEP=step, LOAD=load, KW=kw,
            PX=ahead, ODD=bk == 128, SUM=summed, SETS=sets, SETS_SUM=_sets_sum_ptx(4 * tr * bm // 8) if sets > 1 else "",
            num_warps=warps, num_stages=1)  # fmt: skip
    else:
        _nvfp4_gemv_kernel[grid](*args, ALPHA_IDX=idx, ASM=not interpreting(), EVEN_N=N % bn == 0, BM=bm, BN=bn, BK=bk,
                                 FMA=kernel == "fma", STAGES=stages, BLOCKED=w.blocked, num_warps=warps, num_stages=stages)  # fmt: skip
    return out.reshape(*lead, N)


def _dequant_matmul(a: torch.Tensor, w: NVFP4Weight, idx: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Prefill (and K not a multiple of 64): the dequantized weight through cuBLAS, fp32 accumulation
    and alpha (x 2^8) in fp32; on the CPU (the interpreter) an fp32 matmul of the same values."""
    wd = nvfp4_dequantize(w)
    alpha = w.alphas[idx] * 256.0
    if not a.is_cuda:
        return (a.float() @ wd.float().T * alpha).to(out_dtype)
    flags = torch.backends.cuda.matmul
    keep = flags.allow_bf16_reduced_precision_reduction
    flags.allow_bf16_reduced_precision_reduction = False  # fp32 sums only
    try:
        if out_dtype == torch.float32:
            return torch.mm(a, wd.T, out_dtype=torch.float32).mul_(alpha)
        out = torch.empty(a.shape[0], wd.shape[0], dtype=out_dtype, device=a.device)
        return torch.addmm(out, a, wd.T, beta=0.0, alpha=alpha, out=out)
    finally:
        flags.allow_bf16_reduced_precision_reduction = keep


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, sf_ptr, scalars_ptr, M, K, FAKE: tl.constexpr, APPROX: tl.constexpr,
                      BM: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    """Blackwell's NVFP4 activation quantization of a [BM, BK] tile: packed codes and E4M3 scale bits,
    or (FAKE) the exact bf16 `code x scale` values the MMA is fed."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    mask = (rm[:, None] < M) & (rk[None, :] < K)
    x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=mask, other=0.0).to(tl.float32)
    gs = tl.load(scalars_ptr + 1)
    x3 = tl.reshape(x, (BM, BK // 16, 16))
    if FAKE:
        values = _nvfp4_values(x3, gs, APPROX)
        tl.store(q_ptr + rm[:, None] * K + rk[None, :], tl.reshape(values, (BM, BK)).to(tl.bfloat16), mask=mask)
    else:
        sf_bits, sf, out_scale = _act_scales(tl.max(tl.abs(x3), axis=2), gs, _rcp(gs, APPROX), APPROX)
        codes = _e2m1(x3 * out_scale[:, :, None])
        lo, hi = tl.split(tl.reshape(codes, (BM, BK // 2, 2)))
        rkh = tl.program_id(1) * (BK // 2) + tl.arange(0, BK // 2)
        tl.store(q_ptr + rm[:, None] * (K // 2) + rkh[None, :], lo | (hi << 4), mask=(rm[:, None] < M) & (rkh[None, :] < K // 2))
        rks = tl.program_id(1) * (BK // 16) + tl.arange(0, BK // 16)
        tl.store(sf_ptr + rm[:, None] * (K // 16) + rks[None, :], sf_bits, mask=(rm[:, None] < M) & (rks[None, :] < K // 16))


def _act_quant(a: torch.Tensor, scalars: torch.Tensor, fake: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    M, K = a.shape
    bm, bk = (4, 32) if interpreting() else (16, 256)
    if fake:
        q, sf = torch.empty(M, K, dtype=torch.bfloat16, device=a.device), None
    else:
        q = torch.empty(M, K // 2, dtype=torch.uint8, device=a.device)
        sf = torch.empty(M, K // 16, dtype=torch.uint8, device=a.device)
    _act_quant_kernel[(triton.cdiv(M, bm), triton.cdiv(K, bk))](a, q, q if sf is None else sf, scalars, M, K, FAKE=fake,
                                                                APPROX=not interpreting(), BM=bm, BK=bk)  # fmt: skip
    return q, sf


def nvfp4_fake_quantize(a: torch.Tensor, scalars: torch.Tensor) -> torch.Tensor:
    """bf16 activations [M, K] -> the exact bf16 `code x block scale` values Blackwell's recipe gives
    them (the input scale not applied); `scalars[1]` is 1 / input_scale."""
    return _act_quant(a, scalars, fake=True)[0]


def nvfp4_quantize_activations(x: torch.Tensor, input_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blackwell's NVFP4 activation quantization as the w4a4 linear does it: packed codes, E4M3 scales."""
    K = x.shape[-1]
    a = x.reshape(-1, K).to(torch.bfloat16).contiguous()
    isc = input_scale.detach().float().reshape(()).cpu()
    scalars = torch.stack([isc, torch.tensor(1.0) / isc]).to(x.device)
    q, sf = _act_quant(a, scalars, fake=False)
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
