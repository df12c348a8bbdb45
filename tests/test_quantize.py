"""Executing a plan: scale checks."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from stepquant.convert import ConvertOptions, convert
from stepquant.errors import StepquantError
from stepquant.quantize import _checked, _scale_flags


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0])
def test_scales_with_nan_inf_or_zero_are_refused(bad):
    fine = {"weight": torch.zeros(4, dtype=torch.uint8), "weight_scale": torch.tensor([1.0, 2.0]), "input_scale": torch.tensor(0.5)}
    assert _checked(fine, "m") is fine and _checked(fine, "m", _scale_flags(fine)) is fine
    broken = {**fine, "weight_scale": torch.tensor([1.0, bad])}
    for flags in (None, _scale_flags(broken)):
        with pytest.raises(StepquantError, match="m: weight_scale would be NaN, Inf or zero"):
            _checked(broken, "m", flags)


def test_an_expert_of_zeros_is_refused_by_name(demo_ckpt, tmp_path):
    """All-zero expert weights would give zero NVFP4 scales, which engines load silently: refused, naming
    the layer's experts and the scale, checked on the quantizing device batch by batch."""
    src = tmp_path / "src"
    shutil.copytree(demo_ckpt, src)
    shard = next(src.glob("*.safetensors"))
    tensors = load_file(shard)
    tensors["model.layers.1.moe.down_proj.weight"][3] = 0
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(StepquantError, match=r"model\.layers\.1 experts down: weight_scale would be NaN, Inf or zero"):
        convert(src, tmp_path / "out", ConvertOptions(recipe="step3p7-nvfp4-moe-only-kvfp8", calib_samples=2, calib_seq_len=16))
