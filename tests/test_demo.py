import hashlib
import json

import torch

from stepquant.demo import build_demo_checkpoint, run_demo
from stepquant.stfile import read_header


def test_demo_checkpoint_is_deterministic(demo_ckpt, tmp_path):
    again = build_demo_checkpoint(tmp_path / "again")
    for p in demo_ckpt.iterdir():
        assert hashlib.sha256(p.read_bytes()).digest() == hashlib.sha256((again / p.name).read_bytes()).digest(), p.name


def test_demo_has_the_step37_architecture(demo_ckpt):
    cfg = json.loads((demo_ckpt / "config.json").read_text())
    text = cfg["text_config"]
    assert cfg["architectures"] == ["Step3p7ForConditionalGeneration"]
    assert set(text["mlp_layer_types"]) == {"dense", "sparse"}
    assert set(text["layer_types"]) == {"full_attention", "sliding_attention"}
    assert text["swiglu_limits"][-1] and text["swiglu_limits_shared"][-1]
    assert text["n_routed_experts"] >= 8
    infos, _ = read_header(demo_ckpt / "model.safetensors")
    names = set(infos)
    assert any(n.startswith("vision_model.") for n in names) and "vit_large_projector.weight" in names
    assert "model.layers.4.eh_proj.weight" in names  # the MTP layer
    for t in infos.values():
        if t.name.endswith(".weight") and len(t.shape) >= 2 and "conv" not in t.name and "downsampler" not in t.name:
            assert t.shape[-1] % 16 == 0, t.name  # every Linear's input dim: NVFP4 groups of 16


def test_transformers_loads_the_demo_and_runs_it(demo_ckpt):
    from transformers import AutoTokenizer, Step3p7ForConditionalGeneration

    model, info = Step3p7ForConditionalGeneration.from_pretrained(demo_ckpt, output_loading_info=True)
    assert info["missing_keys"] == [] or info["missing_keys"] == set()
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    tok = AutoTokenizer.from_pretrained(demo_ckpt)
    ids = tok.apply_chat_template([{"role": "user", "content": "print(1 + 1)"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]  # fmt: skip
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 512)
    assert torch.isfinite(logits).all() and 0.05 < float(logits.float().std()) < 50


def test_run_demo(tmp_path):
    lines = []
    summary = run_demo(tmp_path, echo=lines.append)
    assert summary["roundtrip_identical"] is True
    assert summary["inspect"]["family"] == "step3p7"
    assert any("byte-identical" in line for line in lines)
    assert (tmp_path / "bf16-modelopt" / "stepquant.json").is_file()
    assert summary["check"]["vllm"]["defects"] == [] and summary["check"]["sglang"]["defects"] == []
    assert (tmp_path / "nvfp4" / "hf_quant_config.json").is_file()
    v = summary["verify"]
    assert 0 < v["w4a16"]["kl"] < 0.1 and 0 < v["w4a4"]["kl"] < 0.1 and v["w4a4"]["kl"] != v["w4a16"]["kl"]
    assert any("same top-1 token" in line for line in lines)
