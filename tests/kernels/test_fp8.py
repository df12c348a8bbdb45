import torch

from stepquant.formats import FORMATS
from stepquant.kernels.fp8 import fp8_block_linear, fp8_linear, quantize_input_fp8


def _case(device, n=64, k=128, m=5):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
    x = (torch.randn(m, k, generator=g)).to(torch.bfloat16)
    return w, x


def test_fp8_linear_equals_its_definition(device):
    w, x = _case(device)
    p = FORMATS["fp8"].quantize(w, w.float().abs().amax())
    isc = FORMATS["fp8"].input_scale(x.float().abs().amax())
    out = fp8_linear(x.to(device), p["weight"].to(device), p["weight_scale"], isc, out_dtype=torch.float32)
    xq = quantize_input_fp8(x, isc).double() * float(isc)
    ref = xq @ (p["weight"].double() * float(p["weight_scale"])).T
    # Hopper's FP8 MMA accumulates with fewer than fp32's bits (measured 1.3e-4 on an H200 here)
    assert float((out.double().cpu() - ref).norm() / ref.norm()) < (5e-4 if device == "cuda" else 1e-5)
    # and it approximates the BF16 layer
    bf = x.double() @ w.double().T
    assert float((out.double().cpu() - bf).norm() / bf.norm()) < 0.08


def test_fp8_block_linear(device):
    w, x = _case(device, n=200, k=256)
    p = FORMATS["fp8-block"].quantize(w, None)
    out = fp8_block_linear(x.to(device), p["weight"].to(device), p["weight_scale_inv"].to(device), torch.float32)
    bf = x.double() @ w.double().T
    assert float((out.double().cpu() - bf).norm() / bf.norm()) < 0.05
