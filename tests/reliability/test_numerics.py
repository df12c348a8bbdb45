"""Non-finite weights and shapes a format cannot hold: refused by name, or kept in BF16, excluded and
warned about — never silently padded or quantized."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file, save_file

from stepquant.checkpoint import open_checkpoint

from ..conftest import run_cli
from .record import record

RECIPE = ("--recipe", "step3p7-nvfp4-moe-only-kvfp8", "--calib-samples", "4", "--calib-seq-len", "32")


def _poisoned(demo_ckpt, tmp_path, name: str, index: tuple, value: float):
    src = shutil.copytree(demo_ckpt, tmp_path / "src")
    weights = load_file(src / "model.safetensors")
    weights[name][index] = value
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    return src


def test_nan_in_an_expert_is_refused_by_name_or_kept_with_the_flag(demo_ckpt, tmp_path):
    src = _poisoned(demo_ckpt, tmp_path, "model.layers.2.moe.up_proj.weight", (3, 0, 0), float("nan"))
    proc = run_cli("convert", src, tmp_path / "dst", *RECIPE)
    assert proc.returncode == 2 and "model.layers.2" in proc.stderr and "--allow-nonfinite" in proc.stderr
    assert not (tmp_path / "dst").exists()
    proc = run_cli("convert", src, tmp_path / "kept", *RECIPE, "--allow-nonfinite")
    assert proc.returncode == 0, proc.stderr
    assert "warning: model.layers.2 experts: kept in BF16 and excluded: NaN or Inf in expert 3 up" in proc.stderr
    out = tmp_path / "kept"
    quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert "model.language_model.layers.2.*experts*" in quant["exclude_modules"]
    assert "model.language_model.layers.1.*experts*" not in quant["exclude_modules"]
    with open_checkpoint(out) as ck:
        assert ck.tensors["model.language_model.layers.2.moe.up_proj.weight"].dtype == "BF16"
        assert ck.tensors["model.language_model.layers.1.moe.up_proj.weight"].dtype == "U8"
    assert json.loads((out / "stepquant.json").read_text())["warnings"]
    assert run_cli("check", out, "--ref", src).returncode == 0
    record("numerics", "NaN in a source expert weight", refused=True, kept_with_flag=True)


def test_inf_in_attention_keeps_its_whole_fusion_group(demo_ckpt, tmp_path):
    src = _poisoned(demo_ckpt, tmp_path, "model.layers.1.self_attn.k_proj.weight", (0, 5), float("inf"))
    proc = run_cli("convert", src, tmp_path / "dst", "--to", "nvfp4", "--scope", "all-linear", "--allow-nonfinite",
                   "--calib-samples", "4", "--calib-seq-len", "32")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with open_checkpoint(tmp_path / "dst") as ck:
        for p in ("q", "k", "v"):
            assert ck.tensors[f"model.layers.1.self_attn.{p}_proj.weight"].dtype == "BF16", p
        assert ck.tensors["model.layers.1.self_attn.o_proj.weight"].dtype == "U8"
        assert ck.tensors["model.layers.2.self_attn.k_proj.weight"].dtype == "U8"
    assert proc.stderr.count("kept in BF16") == 3
    record("numerics", "Inf in an attention weight (fusion group kept whole)", refused=False, kept_with_flag=True)


def test_a_dimension_nvfp4_cannot_hold_stays_bf16_unpadded(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    torch.manual_seed(0)
    tensors = {"model.layers.0.mlp.down_proj.weight": torch.randn(64, 40, dtype=torch.bfloat16),  # in 40: not % 16
               "model.layers.0.mlp.gate_proj.weight": torch.randn(40, 64, dtype=torch.bfloat16),
               "model.layers.0.mlp.up_proj.weight": torch.randn(40, 64, dtype=torch.bfloat16),
               "model.layers.0.self_attn.o_proj.weight": torch.randn(64, 64, dtype=torch.bfloat16)}  # fmt: skip
    save_file(tensors, src / "model.safetensors")
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1}))
    proc = run_cli("convert", src, tmp_path / "dst", "--to", "w4a16-nvfp4", "--scope", "all-linear")
    assert proc.returncode == 0, proc.stderr
    assert "model.layers.0.mlp.down_proj: kept in BF16 and excluded: input dim 40 is not a multiple of the group size 16" in proc.stderr
    with open_checkpoint(tmp_path / "dst") as ck:
        down = ck.tensors["model.layers.0.mlp.down_proj.weight"]
        assert down.dtype == "BF16" and down.shape == (64, 40)  # never padded
        assert ck.tensors["model.layers.0.mlp.gate_proj.weight"].dtype == "U8"
        assert ck.quantization()["exclude_modules"] == ["model.layers.0.mlp.down_proj"]
    record("numerics", "input dim not a multiple of 16", kept_bf16=True, padded=False)
