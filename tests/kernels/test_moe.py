"""Fused MoE against the expert-by-expert fp64 reference (interpreter on CPU, CUDA on GPU)."""

import pytest
import torch

from stepquant.formats import FORMATS
from stepquant.kernels import moe
from stepquant.kernels.moe import (MOE_MMA_SYNC_MAX_SHARING, MmaSync, Experts, _moe_blocks, fused_moe, fused_moe_reference,
                                   route, sharing)

E, H, INTER, T, TOPK = 5, 64, 64, 7, 2


def _rel(a, b):
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm())


def _stack(ws, fmt, act_amax):
    """Quantize each expert's [N, K] weight with `fmt` and stack them (one input scale for the layer)."""
    if fmt == "bf16":
        return Experts.bf16(torch.stack(ws))
    f = FORMATS[fmt]
    parts = [f.quantize(w, w.float().abs().amax()) for w in ws]
    isc = f.input_scale(torch.tensor(act_amax))
    if fmt == "nvfp4":
        return Experts.nvfp4(*(torch.stack([p[n] for p in parts]) for n in ("weight", "weight_scale", "weight_scale_2")), isc)
    return Experts.fp8(torch.stack([p["weight"] for p in parts]), torch.stack([p["weight_scale"] for p in parts]), isc)


def _layer(fmt, device, seed=0, hidden=H, inter=INTER, topk=TOPK, tokens=T):
    g = torch.Generator().manual_seed(seed)
    gate_up = [(torch.randn(2 * inter, hidden, generator=g) * 0.2).to(torch.bfloat16) for _ in range(E)]
    down = [(torch.randn(hidden, inter, generator=g) * 0.2).to(torch.bfloat16) for _ in range(E)]
    x = (torch.randn(tokens, hidden, generator=g) * 2).to(torch.bfloat16)
    x[1, :16] = 0  # an all-zero activation block
    logits = torch.randn(tokens, E, generator=g)
    weights, ids = torch.softmax(logits, -1).topk(topk, -1)
    ids[0, :2] = torch.tensor([3, 3 - 1])  # expert 4 may go unused; expert 3 always has a token
    gu, dn = _stack(gate_up, fmt, float(x.float().abs().amax())), _stack(down, fmt, 6.0)
    for ex in (gu, dn):
        for name in ("weight", "weight_scale", "scalars"):
            if getattr(ex, name) is not None:
                setattr(ex, name, getattr(ex, name).to(device))
    return x.to(device), ids.to(device), weights.to(device), gu, dn


def test_route_groups_pairs_by_expert_in_blocks():
    ids = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 1]])
    pairs, block_expert = route(ids, 4, 2)
    blocks = pairs.view(-1, 2)
    seen = []
    for b, e in enumerate(block_expert.tolist()):
        rows = [p for p in blocks[b].tolist() if p >= 0]
        if e < 0:
            assert rows == []
            continue
        assert rows and all(ids.view(-1)[p] == e for p in rows)
        seen += rows
    assert sorted(seen) == list(range(8))
    assert block_expert.tolist()[:4] == [0, 1, 2, 2]  # expert order, expert 2's three pairs in two blocks


@pytest.mark.parametrize("tokens, experts, bm", [(1, 288, 16), (7, 5, 16), (33, 40, 8), (64, 16, 16), (7, 5, 1), (1, 288, 1)])
def test_route_kernel_equals_torch(device, monkeypatch, tokens, experts, bm):
    g = torch.Generator().manual_seed(tokens)
    ids = torch.rand(tokens, experts, generator=g).topk(min(8, experts), -1).indices.to(device)
    kernel = route(ids, experts, bm)
    monkeypatch.setattr(moe, "ROUTE_KERNEL_MAX_PAIRS", 0)
    reference = route(ids, experts, bm)
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(kernel, reference))


@pytest.mark.parametrize("limit", [None, 0.5])
@pytest.mark.parametrize("fmt, mode, tol", [("nvfp4", "w4a16", 1e-2), ("nvfp4", "w4a4", 1e-2), ("fp8", "w8a8", 1e-2), ("bf16", "bf16", 1e-2)])
def test_fused_moe_matches_reference(device, fmt, mode, tol, limit):
    x, ids, w, gu, dn = _layer(fmt, device)
    out = fused_moe(x, ids, w, gu, dn, mode, limit=limit)
    ref = fused_moe_reference(x, ids, w, gu, dn, mode, limit=limit)
    assert out.shape == (T, H) and out.dtype == torch.bfloat16
    assert _rel(out, ref) < tol  # the BF16 output's rounding
    out32 = fused_moe(x, ids, w, gu, dn, mode, limit=limit, out_dtype=torch.float32)
    # fp32 output: only the summation order differs (on a GPU, rcp.approx or a BF16 rounding of the
    # SwiGLU output on the other side of a tie can move a rare re-quantized code)
    assert _rel(out32, ref) < (1e-5 if device == "cpu" else 1e-3)
    if limit is not None:  # the clamp is active: without it the result is different
        assert _rel(fused_moe_reference(x, ids, w, gu, dn, mode), ref) > 10 * tol


@pytest.mark.parametrize("limit", [None, 0.5])
@pytest.mark.parametrize("mode", ["w4a16", "w4a4"])
def test_mma_sync_kernels_match_reference(device, mode, limit):
    """Blocked experts through the mma.sync kernels: at decode (one program per pair, then per token with the combine;
    top-3: a down warp past the pairs) and routed (blocks of 8 pairs of one expert). On CUDA also against Triton's
    MMA kernel, with other warp counts and activations a step ahead."""
    x, ids, w, gu, dn = _layer("nvfp4", device, seed=2, hidden=128 if device == "cpu" else 512, inter=128, topk=3, tokens=3)
    assert gu.blocked and dn.blocked
    ref = fused_moe_reference(x, ids, w, gu, dn, mode, limit=limit)
    tol = 1e-5 if device == "cpu" else 1e-3
    out32 = fused_moe(x, ids, w, gu, dn, mode, limit=limit, config=MmaSync(), out_dtype=torch.float32)  # decode
    assert _rel(out32, ref) < tol
    assert _rel(fused_moe(x, ids, w, gu, dn, mode, limit=limit), ref) < 1e-2  # the rule's choice; the BF16 output's rounding
    # the pairs routed to their experts in blocks of 8, through the same kernel
    assert _rel(fused_moe(x, ids, w, gu, dn, mode, limit=limit, config=MmaSync(routed=True), out_dtype=torch.float32), ref) < tol
    if device == "cuda":
        assert _rel(fused_moe(x, ids, w, gu, dn, mode, limit=limit, config=(16, 16, 64, 4), out_dtype=torch.float32), out32) < tol
        for cfg in (MmaSync(warps=2, ahead=True, down_ahead=True), MmaSync(warps=1), MmaSync(warps=4, ahead=True),
                    MmaSync(4, True, True, True, 4), MmaSync(1, False, False, True, 1)):
            assert _rel(fused_moe(x, ids, w, gu, dn, mode, limit=limit, config=cfg, out_dtype=torch.float32), out32) < 1e-6


def test_decode_gives_way_to_routed_blocks_where_pairs_share_experts():
    """Decode reads an expert once a pair, the routed blocks once a block: with few experts (Mixtral's 8, top-2) the
    pairs share them from 3 tokens on (BENCHMARKS.md, eighteenth session)."""
    assert not MmaSync.rule(2, 2, 4096, 14336, 8).routed  # 4 pairs on 3.5 experts expected: decode was faster
    assert MmaSync.rule(3, 2, 4096, 14336, 8).routed  # 6 on 4.6: routed was
    assert not MmaSync.rule(4, 6, 2048, 1408, 64).routed  # DeepSeek-V2-Lite: 24 pairs on 20.8
    assert not MmaSync.rule(4, 8, 4096, 1280, 288).routed  # Step: 32 pairs, nearly all on distinct experts
    assert MmaSync.rule(5, 8, 4096, 1280, 288).routed  # past MOE_DECODE_MAX_PAIRS
    assert MmaSync.rule(1, 8, 4096, 1280, 288) == MmaSync(4, False, True)  # one token: down's activations ahead


def test_pairs_an_expert_pick_the_routed_kernel_and_its_blocks(monkeypatch):
    """`sharing`: the pairs expected per touched expert. The routed mma.sync blocks (8 pairs) serve up to 15 of them;
    beyond, Triton's MMA with 32, then 64 pairs a block (the GPU's tilings, not the interpreter's)."""
    assert abs(sharing(1, 8, 288) - 1) < 1e-9  # one token's experts are distinct
    assert abs(sharing(4096, 8, 288) - 4096 * 8 / 288) < 1e-6  # every expert touched
    assert sharing(512, 8, 288) <= MOE_MMA_SYNC_MAX_SHARING < sharing(64, 2, 8)  # Step at 512 tokens; Mixtral at 64
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _moe_blocks(128, True, sharing(64, 2, 8)) == (32, 64, 128, 4)  # 16 pairs an expert
    assert _moe_blocks(512, True, sharing(256, 2, 8)) == (64, 128, 64, 4)  # 64
    assert _moe_blocks(24, True, sharing(4, 6, 64))[0] == 16  # unblocked experts at decode


def test_experts_check_their_scales_shape():
    q, sf = torch.zeros(2, 16, 64, dtype=torch.uint8), torch.zeros(2, 16, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"weight_scale \[E, N, K/16\] = \(2, 16, 8\), not \(2, 16, 4\)"):
        Experts.nvfp4(q, sf, torch.ones(2))
    ex = Experts.nvfp4(q, torch.zeros(2, 16, 8, dtype=torch.uint8), torch.ones(2))
    assert ex.blocked and ex.shape == (2, 16, 128)


def test_routed_kernel_reads_each_projection_in_its_layout(device):
    """K 128 blocks gate_up, K 64 leaves down as the checkpoint has it: the routed kernel reads each as it is."""
    x, ids, w, gu, dn = _layer("nvfp4", device, seed=3, hidden=128, inter=64, tokens=3)
    assert gu.blocked and not dn.blocked
    ref = fused_moe_reference(x, ids, w, gu, dn, "w4a16")
    assert _rel(fused_moe(x, ids, w, gu, dn, "w4a16", out_dtype=torch.float32), ref) < (1e-5 if device == "cpu" else 1e-3)


def test_mma_sync_kernels_need_blocked_experts(device):
    x, ids, w, gu, dn = _layer("nvfp4", device)  # K = 64: not blocked
    assert not gu.blocked
    with pytest.raises(ValueError, match="blocked"):
        fused_moe(x, ids, w, gu, dn, "w4a16", config=MmaSync())


def test_w4a4_differs_from_w4a16(device):
    x, ids, w, gu, dn = _layer("nvfp4", device, seed=1)
    a = fused_moe(x, ids, w, gu, dn, "w4a4")
    b = fused_moe_reference(x, ids, w, gu, dn, "w4a16")
    assert _rel(a, b) > 1e-2  # activation quantization is really applied
    with pytest.raises(ValueError, match="w8a8"):
        fused_moe(x, ids, w, gu, dn, "w8a8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Step-3.7 shapes need CUDA")
@pytest.mark.parametrize("tokens", [1, 16, 64, 512, 4096])
def test_fused_moe_step_shapes(tokens):
    from stepquant.bench import moe_layer

    (gu, dn), _ = moe_layer(288, with_bf16=False)
    g = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, 4096, device="cuda", generator=g).to(torch.bfloat16)
    w, ids = torch.rand(tokens, 288, device="cuda", generator=g).topk(8, -1)
    for mode in ("w4a16", "w4a4"):
        for limit in (None, 1.0):
            ref = fused_moe_reference(x, ids, w, gu, dn, mode, limit=limit)
            assert _rel(fused_moe(x, ids, w, gu, dn, mode, limit=limit), ref) < 1e-2
            assert _rel(fused_moe(x, ids, w, gu, dn, mode, limit=limit, out_dtype=torch.float32), ref) < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real shapes need CUDA")
@pytest.mark.parametrize("hidden, inter, experts, topk", [
    (2048, 768, 16, 8),  # Qwen3-30B-A3B's sizes (128 experts)
    (4096, 14336, 4, 2),  # Mixtral 8x7B's (8 experts): two down warps, 112 steps a warp
    (2048, 1408, 16, 6),  # DeepSeek-V2-Lite's (64 experts): two of eight down warps past the pairs, 11 steps (odd)
])  # fmt: skip
def test_fused_moe_other_families_at_small_batches(hidden, inter, experts, topk):
    """The mma.sync kernels (decode up to 32 pairs, routed beyond) at other families' hidden and intermediate
    sizes and top-k (fewer experts, same kernels), and Triton's MMA kernel on the same blocked experts."""
    from stepquant.bench import moe_layer

    (gu, dn), _ = moe_layer(experts, hidden, inter, with_bf16=False)
    assert gu.blocked and dn.blocked
    for tokens in (1, 5, 16, 64):
        g = torch.Generator(device="cuda").manual_seed(tokens)
        x = torch.randn(tokens, hidden, device="cuda", generator=g).to(torch.bfloat16)
        w, ids = torch.rand(tokens, experts, device="cuda", generator=g).topk(topk, -1)
        for mode in ("w4a16", "w4a4"):
            ref = fused_moe_reference(x, ids, w, gu, dn, mode, limit=None)
            assert _rel(fused_moe(x, ids, w, gu, dn, mode, out_dtype=torch.float32), ref) < 1e-3
            routed = fused_moe(x, ids, w, gu, dn, mode, config=(16, 64, 128, 4), out_dtype=torch.float32)
            assert _rel(routed, ref) < 1e-3
