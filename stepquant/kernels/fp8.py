"""FP8 linear layers: per-tensor FP8 through `torch._scaled_mm` on the GPU (static activation scale, as
ModelOpt's FP8 checkpoints declare), and block-scaled FP8 by dequantizing the weight. On the CPU both are
emulated exactly: the same quantized operands, multiplied in fp32.
"""

from __future__ import annotations

import torch

from ..formats import FORMATS, E4M3_MAX


def quantize_input_fp8(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor activation quantization: x / input_scale, saturated to E4M3's range."""
    return (x.float() / input_scale.float().to(x.device)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor,
               out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:  # fmt: skip
    """`x @ W.T` for a per-tensor FP8 weight and a static FP8 activation scale."""
    *lead, K = x.shape
    xq = quantize_input_fp8(x.reshape(-1, K), input_scale)
    sa = input_scale.float().reshape(()).to(x.device)
    sb = weight_scale.float().reshape(()).to(x.device)
    if x.is_cuda:
        out = torch._scaled_mm(xq, weight.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)
    else:
        out = ((xq.float() @ weight.float().t()) * (sa * sb)).to(out_dtype)
    return out.reshape(*lead, weight.shape[0])


def fp8_block_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                     out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:  # fmt: skip
    """`x @ W.T` for a 128x128 block-FP8 weight (dynamic activations): the weight is dequantized to BF16."""
    w = FORMATS["fp8-block"].dequantize({"weight": weight, "weight_scale_inv": weight_scale_inv})
    return (x.to(torch.bfloat16) @ w.to(x.device).t()).to(out_dtype)
