"""`convert --device cuda` writes the same bytes as `--device cpu` (CUDA only)."""

import pytest
import torch

from stepquant.convert import ConvertOptions, convert

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "stepquant.json"}


@pytest.mark.parametrize("recipe", ["nvfp4-all-linear", "fp8-all-linear", "step3p7-fp8", "step3p7-nvfp4-moe-only-kvfp8"])
def test_cuda_conversion_is_byte_identical(demo_ckpt, tmp_path, recipe):
    common = dict(recipe=recipe, calib_samples=8, calib_seq_len=64, calib_device="cpu")
    cpu = convert(demo_ckpt, tmp_path / "cpu", ConvertOptions(device="cpu", **common))
    gpu = convert(demo_ckpt, tmp_path / "gpu", ConvertOptions(device="cuda", **common))
    a, b = _files(cpu), _files(gpu)
    assert a.keys() == b.keys()
    assert [n for n in a if a[n] != b[n]] == []
