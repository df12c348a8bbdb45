"""The kernels' E2M1 rounding on the bits equals the CPU format's threshold rounding everywhere it matters."""

import torch
import triton
import triton.language as tl

from stepquant.formats import e2m1
from stepquant.kernels.quantize import _e2m1


@triton.jit
def _e2m1_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, _e2m1(tl.load(x_ptr + offs, mask=offs < N)), mask=offs < N)


def test_e2m1_on_every_threshold_and_its_neighbours(device):
    grid = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 1e30])
    bits = grid.view(torch.int32)
    near = torch.cat([(bits + d).view(torch.float32) for d in (-2, -1, 0, 1, 2)])
    near = near[near >= 0]
    x = torch.cat([near, -near, torch.tensor([float("inf"), 1e-40, -1e-40]), torch.randn(4000) * 3])
    out = torch.empty(x.numel(), dtype=torch.int32, device=device)
    _e2m1_kernel[(triton.cdiv(x.numel(), 1024),)](x.to(device), out, x.numel(), BLOCK=1024)
    assert torch.equal(out.cpu(), e2m1(x).to(torch.int32))
