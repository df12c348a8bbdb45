"""NVFP4 linear kernels against their plain-torch fp64 references (interpreter on CPU, CUDA on GPU)."""

import pytest
import torch

from stepquant.formats import FORMATS
from stepquant.kernels.linear import (
    NVFP4Weight,
    Tiling,
    _blocked_codes,
    _gemv_blocks,
    _mma_sync_step_ptx,
    _warp_sum_ptx,
    dequantize_nvfp4,
    nvfp4_dequantize,
    nvfp4_fake_quantize,
    nvfp4_linear,
    nvfp4_linear_reference,
    nvfp4_quantize_activations,
    quantize_activations_reference,
)


def _layer(n, k, seed, device):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
    parts = FORMATS["nvfp4"].quantize(w, w.float().abs().amax())
    x = (torch.randn(5, k, generator=g) * 1.5).to(torch.bfloat16)
    x[0, :16] = 0  # an all-zero activation block
    x_amax = x.float().abs().amax()
    return {k_: v.to(device) for k_, v in parts.items()}, x.to(device), FORMATS["nvfp4"].input_scale(x_amax)


def _rel(a, b):
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm())


@pytest.mark.parametrize("n, k", [(48, 64), (32, 96), (24, 80), (40, 256)])
def test_w4a16_matches_reference(device, n, k):
    p, x, _ = _layer(n, k, 0, device)
    w = NVFP4Weight.from_parts(p["weight"], p["weight_scale"], p["weight_scale_2"])
    out = nvfp4_linear(x, w, mode="w4a16")
    ref = nvfp4_linear_reference(x.cpu(), p["weight"].cpu(), p["weight_scale"].cpu(), p["weight_scale_2"])
    assert out.shape == (5, n) and out.dtype == torch.bfloat16
    assert _rel(out, ref) < 1e-2  # the bf16 output's rounding
    out32 = nvfp4_linear(x, w, mode="w4a16", out_dtype=torch.float32)
    assert _rel(out32, ref) < 1e-5


def test_activation_quantization_matches_recipe(device):
    _, x, isc = _layer(16, 64, 1, device)
    q, sf = nvfp4_quantize_activations(x, isc)
    rq, rsf = quantize_activations_reference(x.cpu(), float(isc))
    assert torch.equal(sf.cpu().view(torch.uint8), rsf.view(torch.uint8))
    if device == "cpu":
        assert torch.equal(q.cpu(), rq)  # exact reciprocals on both sides
    else:
        assert (q.cpu() != rq).float().mean() < 1e-3  # rcp.approx may move a rare boundary code


@pytest.mark.parametrize("n, k", [(48, 64), (32, 96)])
def test_w4a4_matches_fp64_reference(device, n, k):
    p, x, isc = _layer(n, k, 2, device)
    ref = nvfp4_linear_reference(x.cpu(), p["weight"].cpu(), p["weight_scale"].cpu(), p["weight_scale_2"], isc, mode="w4a4")
    w = NVFP4Weight.from_parts(p["weight"], p["weight_scale"], p["weight_scale_2"], isc)
    out32 = nvfp4_linear(x, w, mode="w4a4", out_dtype=torch.float32)
    assert _rel(out32, ref) < 1e-5  # exact products; only the fp32 summation order differs
    out = nvfp4_linear(x, w, mode="w4a4")
    assert out.dtype == torch.bfloat16 and _rel(out, ref) < 1e-2


@pytest.mark.parametrize("mode", ["w4a16", "w4a4"])
@pytest.mark.parametrize("n, k", [(48, 64), (40, 256)])
def test_one_row_fma_kernel_matches_reference(device, mode, n, k):
    """Decode's one-row GEMV (bf16 pairs decoded from the words, the scale once a block, fp32 FMAs)."""
    p, x, isc = _layer(n, k, 5, device)
    p["weight_scale"][0, 0] = torch.tensor(2.0**-9).to(torch.float8_e4m3fn)  # a subnormal E4M3 scale
    p["weight_scale"][1, -1] = torch.tensor(448.0).to(torch.float8_e4m3fn)  # the largest
    x = x[1:2]
    ref = nvfp4_linear_reference(x.cpu(), p["weight"].cpu(), p["weight_scale"].cpu(), p["weight_scale_2"], isc, mode=mode)
    w = NVFP4Weight.from_parts(p["weight"], p["weight_scale"], p["weight_scale_2"], isc)
    assert _gemv_blocks(1, n, k).kernel == "fma"
    assert _rel(nvfp4_linear(x, w, mode=mode, out_dtype=torch.float32), ref) < 1e-5
    split = nvfp4_linear(x, w, mode=mode, out_dtype=torch.float32, config=Tiling("fma", 1, 16, 64, 4, k // 64, 1))
    assert _rel(split, ref) < 1e-5
    with pytest.raises(ValueError, match="got 5 rows"):
        nvfp4_linear(torch.cat([x] * 5), w, config=Tiling("fma", 1, 16, 64, 4, 1, 1))
    if k % 512:
        with pytest.raises(ValueError, match="whole 512-column tiles"):
            nvfp4_linear(x, w, config=Tiling("fma", 1, 16, 512, 4, 1, 1))


@pytest.mark.parametrize("mode", ["w4a16", "w4a4"])
@pytest.mark.parametrize("m", [1, 2, 5, 12, 16])
def test_few_rows_mma_sync_kernel_matches_reference(device, mode, m):
    """1-16 rows: each lane's mma.sync operands decoded in PTX, 1 x 1 tiles a warp (up to 8 rows) and 2 x 2 (up to
    16; on CUDA; the interpreter runs the same tiles through tl.dot), K split across programs or across a program's
    warps or not, ranges of an odd number of 128-column steps, activations loaded a step ahead or not, N not a
    multiple of the program's rows. One row goes there only where K has 2048 columns or more."""
    p, _, _ = _layer(96, 512, 7, device)
    g = torch.Generator().manual_seed(m)
    x = (torch.randn(m, 512, generator=g) * 1.5).to(torch.bfloat16).to(device)
    isc = FORMATS["nvfp4"].input_scale(x.float().abs().amax())
    p["weight_scale"][0, 0] = torch.tensor(2.0**-9).to(torch.float8_e4m3fn)  # a subnormal E4M3 scale
    p["weight_scale"][95, -1] = torch.tensor(448.0).to(torch.float8_e4m3fn)  # the largest, in the last block
    ref = nvfp4_linear_reference(x.cpu(), p["weight"].cpu(), p["weight_scale"].cpu(), p["weight_scale_2"], isc, mode=mode)
    w = NVFP4Weight.from_parts(p["weight"], p["weight_scale"], p["weight_scale_2"], isc)
    assert _gemv_blocks(m, 96, 512).kernel == ("fma" if m == 1 else "mma.sync")  # 9-16 rows of a small matrix: 2 token groups
    if device == "cuda":  # the interpreter's rules mirror these at small tiles
        assert _gemv_blocks(1, 8192, 4096) == Tiling("mma.sync", 8, 16, 256, 4, 1, 1, kwarps=4, ahead=True)  # K shared by 4 warps
        assert _gemv_blocks(8, 4096, 11264) == Tiling("mma.sync", 8, 16, 128, 8, 1, 1, kwarps=8, ahead=True)  # 11 steps a warp
        assert _gemv_blocks(1, 11264, 4096).ahead is False  # 2816 warps: not all resident with the extra registers
        assert _gemv_blocks(1, 4096, 1280).kernel == "fma"
        assert _gemv_blocks(16, 8192, 4096) == Tiling("mma.sync", 16, 32, 256, 4, 1, 1, 4, True)  # 2 x 2 tiles
        assert _gemv_blocks(16, 4096, 11264) == Tiling("mma.sync", 16, 32, 128, 8, 1, 1, 8, True)  # 128 row groups: 8 warps
        assert _gemv_blocks(16, 11264, 4096).ahead is False  # 1408 warps: not all resident with two accumulator sets
        assert _gemv_blocks(16, 1280, 4096) == Tiling("mma.sync", 8, 16, 256, 8, 1, 1, 8, True)  # two token groups
    configs = [None] + [Tiling("mma.sync", 16, 32 * wp, 256, wp, sp) for wp, sp in ((1, 1), (2, 2), (4, 1))]
    configs += [Tiling("mma.sync", 16, 32, 256, 2, 1, kwarps=2), Tiling("mma.sync", 16, 64, 256, 4, 1, kwarps=2)]
    configs += [Tiling("mma.sync", 16, 32, 128, 4, 1, 1, 4, ahead=True), Tiling("mma.sync", 16, 32, 256, 2, 1, 1, 2, ahead=True)]
    configs += [Tiling("mma.sync", 16, 16, 256, 1, 2), Tiling("mma.sync", 16, 16, 128, 4, 1, 1, 4, ahead=True)]  # 1 x 2 tiles
    configs += [Tiling("mma.sync", 16, 32, 256, 1, 2, ahead=True)]  # 2 x 2, two accumulator sets, no warp sum, K split
    if m <= 8:
        configs += [Tiling("mma.sync", 8, 16 * wp, 256, wp, sp) for wp, sp in ((1, 1), (2, 2), (4, 1))]
        configs += [Tiling("mma.sync", 8, 32, 256, 4, 1, kwarps=2), Tiling("mma.sync", 8, 16, 128, 4, 1, 1, 4, ahead=True)]
        configs += [Tiling("mma.sync", 8, 32, 256, 2, 2, 1, 1, ahead=True)]
    for config in configs:
        out = nvfp4_linear(x, w, mode=mode, out_dtype=torch.float32, config=config)
        assert _rel(out, ref) < 1e-5, config
        assert torch.equal(nvfp4_linear(x, w, mode=mode, out_dtype=torch.float32, config=config), out)
    assert _rel(nvfp4_linear(x, w, mode=mode), ref) < 1e-2
    with pytest.raises(ValueError, match="more rows only without a K split"):
        nvfp4_linear(torch.cat([x] * 17), w, config=Tiling("mma.sync", 16, 32, 256, 1, 2))
    if m >= 12:  # more rows than a program's: each group of 8 (16) in its own programs, which read the same weights
        for config in (Tiling("mma.sync", 8, 16, 256, 2, 1, 1, 2), Tiling("mma.sync", 16, 32, 256, 1, 1)):
            x3 = torch.cat([x, x[:5]])
            out = nvfp4_linear(x3, w, mode=mode, out_dtype=torch.float32, config=config)
            assert _rel(out, torch.cat([ref, ref[:5]])) < 1e-5, config
    p3, _, _ = _layer(96, 768, 7, device)
    w3 = NVFP4Weight.from_parts(p3["weight"], p3["weight_scale"], p3["weight_scale_2"])
    x3 = (torch.randn(m, 768, generator=g) * 1.5).to(torch.bfloat16).to(device)
    with pytest.raises(ValueError, match="every range must be full"):  # 768 columns in ranges of 512
        nvfp4_linear(x3, w3, config=Tiling("mma.sync", 16, 32, 256, 2, 1, kwarps=2))
    ref3 = nvfp4_linear_reference(x3.cpu(), p3["weight"].cpu(), p3["weight_scale"].cpu(), p3["weight_scale_2"])
    for ahead in (False, True):  # three 128-column steps a warp
        out = nvfp4_linear(x3, w3, out_dtype=torch.float32, config=Tiling("mma.sync", 16, 32, 128, 2, 1, 1, 2, ahead))
        assert _rel(out, ref3) < 1e-5, ahead


@pytest.mark.parametrize("m", [5, 16])
def test_k_shared_by_eight_warps_and_two_row_groups(device, m):
    """The warp sum at its widest: 8 warps on one K range (2 x 1 or 2 x 2 tiles with 256-column steps, 1 x 1 or 1 x 2
    with two 128-column steps), and two row groups of 4 warps in one program, each group summing its own warps only."""
    p, _, _ = _layer(64, 2048, 11, device)
    w = NVFP4Weight.from_parts(p["weight"], p["weight_scale"], p["weight_scale_2"])
    x = (torch.randn(m, 2048, generator=torch.Generator().manual_seed(m)) * 1.5).to(torch.bfloat16).to(device)
    ref = nvfp4_linear_reference(x.cpu(), p["weight"].cpu(), p["weight_scale"].cpu(), p["weight_scale_2"])
    tn = 1 if m <= 8 else 2
    configs = [Tiling("mma.sync", 8 * tn, 32, 256, 8, 1, 1, 8), Tiling("mma.sync", 8 * tn, 32, 128, 8, 1, 1, 4)]
    configs += [Tiling("mma.sync", 8 * tn, 16, 128, 8, 1, 1, 8)]
    for config in configs:
        assert _rel(nvfp4_linear(x, w, out_dtype=torch.float32, config=config), ref) < 1e-5, config


def test_unchecked_step_leaves_only_the_element_check_out():
    """2 x 2 tiles with K shared leave the element check to the warp sum: the step without it differs from the step
    with it by exactly the check, and the warp sum still has it."""
    checked, unchecked = _mma_sync_step_ptx(2, 2, False, True).split("\n"), _mma_sync_step_ptx(2, 2, False, False).split("\n")
    dropped = [line for line in checked if line not in unchecked]
    assert len(dropped) == 17 and "setp.ne.u32 bad" in dropped[0] and all(d.startswith("@bad mov.b32") for d in dropped[1:])
    assert [line for line in checked if line not in dropped] == unchecked
    assert "setp.ne.u32 bad" in _warp_sum_ptx(16, 4, 4)


def test_few_rows_unaligned_operands_are_served(device):
    """The kernels' int32 and 16-byte loads: activations and weights at odd addresses are copied first."""
    p, _, _ = _layer(32, 256, 8, device)
    x = (torch.randn(3, 256) * 1.5).to(torch.bfloat16).to(device)
    ref = nvfp4_linear_reference(x.cpu(), p["weight"].cpu(), p["weight_scale"].cpu(), p["weight_scale_2"])
    odd_x = torch.empty(3 * 256 + 1, dtype=torch.bfloat16, device=device)[1:].view(3, 256)
    odd_x.copy_(x)
    odd_w = torch.empty(p["weight"].numel() + 1, dtype=torch.uint8, device=device)[1:].view(p["weight"].shape)
    odd_w.copy_(p["weight"])
    for xx, ww in ((odd_x, p["weight"]), (x, odd_w)):
        w = NVFP4Weight.from_parts(ww, p["weight_scale"], p["weight_scale_2"])
        assert _rel(nvfp4_linear(xx, w, out_dtype=torch.float32), ref) < 1e-5


@pytest.mark.parametrize("mode", ["w4a16", "w4a4"])
def test_blocked_weights_give_the_plain_layouts_results(device, mode):
    """NVFP4Weight's blocks of 16 rows x 128 columns: the bytes land where the layout says (their bits moved as
    _BLOCKED_MAG says), and every path (one row, the mma.sync rows, Triton's MMA rows, prefill's dequantized copy)
    computes what it computes from the plain layout."""
    p, _, isc = _layer(32, 512, 9, device)
    blocked = NVFP4Weight.from_parts(p["weight"], p["weight_scale"], p["weight_scale_2"], isc)
    plain = NVFP4Weight.from_parts(p["weight"], p["weight_scale"], p["weight_scale_2"], isc, blocked=False)
    assert blocked.blocked and not plain.blocked
    # row 16 + 8 + 3, columns 128 + 64 ...: block (band 1, column block 1), row 11 inside it, byte 32 of the row
    block = (1 * 4 + 1) * 1024 + 11 * 64 + 32
    moved = _blocked_codes(p["weight"][27:28, 96:112].cpu()).reshape(-1)  # each word's bits moved for the decode
    assert torch.equal(blocked.weight.reshape(-1)[block : block + 16].cpu(), moved)
    assert not torch.equal(moved, p["weight"][27, 96:112].cpu())
    sblock = (1 * 4 + 1) * 128 + 11 * 8 + 4
    assert torch.equal(blocked.weight_scale.reshape(-1)[sblock : sblock + 4].cpu(), p["weight_scale"].view(torch.uint8)[27, 12:16].cpu())
    assert torch.equal(nvfp4_dequantize(blocked), nvfp4_dequantize(plain))
    g = torch.Generator().manual_seed(1)
    for m in (1, 3, 12, 40, 70):
        x = (torch.randn(m, 512, generator=g) * 1.5).to(torch.bfloat16).to(device)
        ref = nvfp4_linear_reference(x.cpu(), p["weight"].cpu(), p["weight_scale"].cpu(), p["weight_scale_2"], isc, mode=mode)
        assert _gemv_blocks(m, 32, 512, blocked=False).kernel != "mma.sync"
        assert _gemv_blocks(m, 32, 512).kernel == ("fma" if m == 1 else "mma.sync" if m <= 64 else "dot")
        for w in (blocked, plain):
            assert _rel(nvfp4_linear(x, w, mode=mode, out_dtype=torch.float32), ref) < 1e-5, (m, w.blocked)
            if m == 40:  # Triton's MMA path (the rule sends these rows of a small matrix to mma.sync)
                for config in (Tiling("dot", 64, 32, 128, 4, 2, 3), Tiling("dot", 16, 16, 64, 4, 1, 3)):
                    out = nvfp4_linear(x, w, mode=mode, out_dtype=torch.float32, config=config)
                    assert _rel(out, ref) < 1e-5, (config, w.blocked)
    with pytest.raises(ValueError, match="a blocked weight"):
        nvfp4_linear(x[:3], plain, config=Tiling("mma.sync", 8, 16, 256, 1, 1))
    with pytest.raises(ValueError, match="N a multiple of 16 and K of 128, not 24 x 512"):
        NVFP4Weight.from_parts(p["weight"][:24], p["weight_scale"][:24], p["weight_scale_2"], blocked=True)


def test_split_k_is_deterministic_and_rearms(device):
    """The last program of a tile adds the K parts in a fixed order and resets its counter: repeated
    calls give the same bits."""
    p, x, _ = _layer(40, 128, 3, device)
    w = NVFP4Weight.from_parts(p["weight"], p["weight_scale"], p["weight_scale_2"])
    first = nvfp4_linear(x, w, out_dtype=torch.float32)
    for _ in range(3):
        assert torch.equal(nvfp4_linear(x, w, out_dtype=torch.float32), first)


@pytest.mark.parametrize("k", [128, 96])  # the kernel; plain torch where K is not a multiple of 64
def test_dequantize_gives_exact_values_over_256(device, k):
    p, _, _ = _layer(24, k, 4, device)
    p["weight_scale"][0, 0] = torch.tensor(2.0**-9).to(torch.float8_e4m3fn)  # a subnormal E4M3 scale
    w = NVFP4Weight.from_parts(p["weight"], p["weight_scale"], p["weight_scale_2"])
    ref = dequantize_nvfp4(p["weight"].cpu(), p["weight_scale"].cpu(), 1.0) / 256
    assert torch.equal(nvfp4_dequantize(w).cpu().double(), ref)


def test_fake_quantized_activations_are_the_recipes_values(device):
    _, x, isc = _layer(16, 64, 5, device)
    scalars = torch.tensor([float(isc), 1.0 / float(isc)], device=device)
    q, sf = nvfp4_quantize_activations(x, isc)
    assert torch.equal(nvfp4_fake_quantize(x, scalars).cpu().double(), dequantize_nvfp4(q.cpu(), sf.cpu(), 1.0))


@pytest.mark.parametrize("mode", ["w4a16", "w4a4"])
def test_many_rows_match_reference(device, mode):
    """Above GEMV_MAX_M rows the GPU dequantizes the weight and multiplies with cuBLAS."""
    g = torch.Generator().manual_seed(6)
    p, _, _ = _layer(48, 64, 6, device)
    x = (torch.randn(80, 64, generator=g) * 1.5).to(torch.bfloat16).to(device)
    isc = FORMATS["nvfp4"].input_scale(x.float().abs().amax())
    w = NVFP4Weight.from_parts(p["weight"], p["weight_scale"], p["weight_scale_2"], isc)
    ref = nvfp4_linear_reference(x.cpu(), p["weight"].cpu(), p["weight_scale"].cpu(), p["weight_scale_2"], isc, mode=mode)
    assert _rel(nvfp4_linear(x, w, mode=mode, out_dtype=torch.float32), ref) < 1e-5
    assert _rel(nvfp4_linear(x, w, mode=mode), ref) < 1e-2


def test_one_row_rule_splits_long_rows_of_few_tiles(monkeypatch):
    """The GPU's rule (not the interpreter's): DeepSeek-V2-Lite's dense down, unblocked (K 10944: 171 64-column steps,
    128 tiles), splits K four ways; short rows and many tiles stay whole (BENCHMARKS.md, eighteenth session)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _gemv_blocks(1, 2048, 10944, blocked=False) == Tiling("fma", 1, 16, 64, 2, 4, 5)
    assert _gemv_blocks(1, 2048, 1408).split == 1  # 11 steps a program
    assert _gemv_blocks(1, 10944, 2048, blocked=False).split == 1  # 684 tiles
