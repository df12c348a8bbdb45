"""Conformance with NVIDIA ModelOpt 0.47's exports of the tiny Qwen3-MoE (../shared/reference)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from stepquant.convert import ConvertOptions, convert


def _load(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def compare_with_modelopt(ours_dir, ref_dir):
    """Same names, dtypes, shapes; bit-identical weights and weight scales; activation scales to 1e-6."""
    ours, ref = _load(ours_dir), _load(ref_dir)
    assert sorted(ours) == sorted(ref)
    for name, r in ref.items():
        o = ours[name]
        assert (o.dtype, o.shape) == (r.dtype, r.shape), name
        if name.endswith(("input_scale", "k_scale", "v_scale")):
            torch.testing.assert_close(o, r, rtol=1e-6, atol=0, msg=name)
        else:
            assert torch.equal(o.view(torch.uint8), r.view(torch.uint8)) if o.element_size() == 1 else torch.equal(o, r), name
    h_ours = json.loads((ours_dir / "hf_quant_config.json").read_text())
    h_ref = json.loads((ref_dir / "hf_quant_config.json").read_text())
    assert h_ours.pop("producer")["name"] == "stepquant"
    h_ref.pop("producer")
    assert h_ours == h_ref


@pytest.mark.parametrize("calib_mode", ["layers", "model"])
@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_matches_modelopt_reference(ref, tmp_path, fmt, calib_mode):
    """Layer-streamed calibration (the default) and the whole model in memory both match ModelOpt."""
    out = convert(
        ref / "bf16",
        tmp_path / fmt,
        ConvertOptions(to=fmt, scope="all-linear", kv_cache="fp8", moe_layout="per-expert", naming="keep",
                       expert_input_scale="shared", calib_data=str(ref / "calib_tokens.json"), calib_mode=calib_mode),
    )  # fmt: skip
    compare_with_modelopt(out, ref / fmt)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    ref_cfg = json.loads((ref / fmt / "config.json").read_text())["quantization_config"]
    for key in ("config_groups", "ignore", "quant_algo", "kv_cache_scheme", "quant_method"):
        assert cfg[key] == ref_cfg[key], key
    manifest = json.loads((out / "stepquant.json").read_text())
    assert manifest["calibration"]["samples"] == 8 and manifest["calibration"]["tokens"] == 256
    assert set(manifest["calibration"]["expert_tokens"]) == {"model.layers.0", "model.layers.1"}


def test_comparison_can_fail(ref, tmp_path):
    """The check above is real: a single flipped nibble is caught."""
    import shutil

    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    shutil.copytree(ref / "nvfp4", bad)
    tensors = load_file(bad / "model.safetensors")
    w = tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    w[0, 0] ^= 0x01
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(AssertionError):
        compare_with_modelopt(bad, ref / "nvfp4")
