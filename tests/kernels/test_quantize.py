"""Weight-quantization kernels are bit-identical to the CPU formats."""

import pytest
import torch

from stepquant.formats import FORMATS
from stepquant.kernels.quantize import fp8_block_quantize, fp8_quantize, nvfp4_quantize

SHAPES = [(32, 64), (20, 48), (8, 272)]  # ragged rows, and columns not a multiple of the block


def _w(shape, seed, device):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1)[:: 97] *= 30  # outliers: some blocks saturate, others are tiny
    w.view(-1)[5:21] = 0  # a zero block
    return w.to(torch.bfloat16).to(device)


def _u8(t):
    return t.cpu().view(torch.uint8)


@pytest.mark.parametrize("shape", SHAPES)
def test_nvfp4_matches_cpu(device, shape):
    w = _w(shape, 0, device)
    amax = w.float().abs().amax().cpu()
    ref = FORMATS["nvfp4"].quantize(w.cpu(), amax)
    q, sf = nvfp4_quantize(w, ref["weight_scale_2"])
    assert torch.equal(q.cpu(), ref["weight"])
    assert torch.equal(_u8(sf), _u8(ref["weight_scale"]))


def test_nvfp4_stacked_with_per_expert_global_scales(device):
    w = torch.stack([_w((16, 64), e, device) * (e + 1) for e in range(3)])
    ws2 = torch.stack([w[e].float().abs().amax().cpu() / 2688.0 for e in range(3)])
    q, sf = nvfp4_quantize(w, ws2)
    for e in range(3):
        ref = FORMATS["nvfp4"].quantize(w[e].cpu(), ws2[e] * 2688.0)
        assert torch.equal(q[e].cpu(), ref["weight"]), e
        assert torch.equal(_u8(sf[e]), _u8(ref["weight_scale"])), e


@pytest.mark.parametrize("shape", SHAPES)
def test_fp8_matches_cpu(device, shape):
    w = _w(shape, 1, device)
    ref = FORMATS["fp8"].quantize(w.cpu(), w.float().abs().amax().cpu())
    assert torch.equal(_u8(fp8_quantize(w, ref["weight_scale"])), _u8(ref["weight"]))


def test_fp8_bf16_division_cases(device):
    # the bf16 values whose bf16 division rounds differently from an fp32 one (see tests/test_formats.py)
    w = torch.arange(0x3C00, 0x43C9, dtype=torch.int16).view(torch.bfloat16).reshape(1, -1).to(device)
    ref = FORMATS["fp8"].quantize(w.cpu(), torch.tensor(403.0))
    assert torch.equal(_u8(fp8_quantize(w, ref["weight_scale"])), _u8(ref["weight"]))


def test_fp8_block_matches_cpu(device):
    w = _w((200, 300), 2, device)
    ref = FORMATS["fp8-block"].quantize(w.cpu(), None)
    q, s = fp8_block_quantize(w, 128)
    assert torch.equal(_u8(q), _u8(ref["weight"]))
    assert torch.equal(s.cpu(), ref["weight_scale_inv"])


def test_e4m3_rounding_of_every_bf16_value(device):
    # every finite bf16 value with |x| <= 448: ties, carries into the next binade, subnormals, signs
    allbits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    x = allbits[torch.isfinite(allbits) & (allbits.float().abs() <= 448)].reshape(1, -1)
    ours = fp8_quantize(x.to(device), torch.tensor(1.0))
    ref = x.to(torch.float8_e4m3fn)
    same = _u8(ours) == _u8(ref)
    same |= (x.float() == 0).reshape(-1) & (ref.float() == 0)  # -0.0 and +0.0 both decode to 0
    assert same.all(), x.reshape(-1)[~same.reshape(-1)][:8]
