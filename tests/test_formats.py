import pytest
import torch

import stepquant.formats as formats
from stepquant.formats import FORMATS, detect_format, e2m1, pack_nibbles, unpack_nibbles


def test_e2m1_rounds_half_to_even_and_saturates():
    x = torch.tensor([0.0, 0.25, 0.26, 0.75, 1.25, 1.3, 1.75, 2.5, 2.6, 3.5, 5.0, 5.1, 100.0])
    assert e2m1(x).tolist() == [0, 0, 1, 2, 2, 3, 4, 4, 5, 6, 6, 7, 7]
    assert e2m1(-x).tolist()[1:] == [8, 9, 10, 10, 11, 12, 12, 13, 14, 14, 15, 15]  # sign bit 3, also for -0.25 -> 0x8
    assert e2m1(torch.tensor([-0.1])).tolist() == [8]


def test_pack_low_nibble_first():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [[0x21, 0x0F]]
    assert torch.equal(unpack_nibbles(packed), codes)


def test_nvfp4_dequantizes_close_and_scales_follow_spec():
    torch.manual_seed(0)
    w = (torch.randn(64, 128) * 0.05).to(torch.bfloat16)
    amax = w.float().abs().amax()
    parts = FORMATS["nvfp4"].quantize(w, amax)
    assert parts["weight"].shape == (64, 64) and parts["weight_scale"].shape == (64, 8)
    assert parts["weight_scale_2"].item() == pytest.approx(amax.item() / 2688.0, rel=1e-7)
    back = FORMATS["nvfp4"].dequantize(parts).float()
    assert ((back - w.float()).norm() / w.float().norm()) < 0.12
    # the largest element is representable exactly (6 * 448 * ws2 == amax)
    i = w.float().abs().argmax()
    assert back.reshape(-1)[i].abs().item() == pytest.approx(amax.item(), rel=1e-2)


def test_nvfp4_row_chunks_are_exact(monkeypatch):
    torch.manual_seed(1)
    w = (torch.randn(48, 256) * 0.02).to(torch.bfloat16)
    amax = w.float().abs().amax()
    whole = FORMATS["nvfp4"].quantize(w, amax)
    monkeypatch.setattr(formats, "ROWS_ELEMENTS", 256 * 5)  # odd-sized steps
    chunked = FORMATS["nvfp4"].quantize(w, amax)
    assert torch.equal(whole["weight"], chunked["weight"])
    assert torch.equal(whole["weight_scale"].view(torch.uint8), chunked["weight_scale"].view(torch.uint8))


def test_zero_block_gets_scale_one():
    w = torch.zeros(2, 32, dtype=torch.bfloat16)
    w[1, 16:] = 1.0
    parts = FORMATS["nvfp4"].quantize(w, torch.tensor(1.0))
    assert parts["weight_scale"].float()[0].tolist() == [1.0, 1.0]


def test_nvfp4_cannot_hold_indivisible_dims():
    assert "not a multiple of the group size 16" in FORMATS["nvfp4"].cannot_hold((8, 40))
    assert FORMATS["nvfp4"].cannot_hold((8, 48)) is None and FORMATS["fp8"].cannot_hold((8, 40)) is None


def test_fp8_divides_in_bf16():
    # every positive bf16 value below the amax: double rounding (bf16, then e4m3) differs from a direct
    # fp32 -> e4m3 rounding for some of them; ModelOpt divides in bf16, and so must we
    w = torch.arange(0x3C00, 0x43C9, dtype=torch.int16).view(torch.bfloat16).reshape(1, -1)
    amax = torch.tensor(403.0)
    scale = (amax / 448.0).reshape(())
    ours = FORMATS["fp8"].quantize(w, amax)["weight"].view(torch.uint8)
    fp32_way = (w.float() / scale).to(torch.float8_e4m3fn).view(torch.uint8)
    bf16_way = (w / scale).to(torch.float8_e4m3fn).view(torch.uint8)
    assert (fp32_way != bf16_way).any()
    assert torch.equal(ours, bf16_way)


def test_fp8_block_round_trip_ragged():
    torch.manual_seed(3)
    w = (torch.randn(200, 300) * 0.02).to(torch.bfloat16)
    parts = FORMATS["fp8-block"].quantize(w, w.float().abs().amax())
    assert parts["weight_scale_inv"].shape == (2, 3)
    back = FORMATS["fp8-block"].dequantize(parts).float()
    assert ((back - w.float()).norm() / w.float().norm()) < 0.05


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_specs_match_quantize(fmt):
    w = (torch.randn(32, 64) * 0.02).to(torch.bfloat16)
    handler = FORMATS[fmt]
    parts = handler.quantize(w, w.float().abs().amax())
    from stepquant.stfile import TORCH_TO_ST

    assert {s: (TORCH_TO_ST[t.dtype], tuple(t.shape)) for s, t in parts.items()} == handler.specs((32, 64))
    assert detect_format({s: TORCH_TO_ST[t.dtype] for s, t in parts.items()}).name in (fmt, "nvfp4")
