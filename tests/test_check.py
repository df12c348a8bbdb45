"""`check` passes good checkpoints (ours and ModelOpt's) and flags each seeded defect."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from stepquant.check import check_checkpoint
from stepquant.convert import ConvertOptions, convert


@pytest.fixture(scope="module")
def step_nvfp4(demo_ckpt, tmp_path_factory):
    return convert(demo_ckpt, tmp_path_factory.mktemp("chk") / "nvfp4",
                   ConvertOptions(recipe="step3p7-nvfp4-moe-only-kvfp8", calib_samples=8, calib_seq_len=64))  # fmt: skip


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_modelopt_exports_pass(ref, fmt):
    rep = check_checkpoint(ref / fmt, ref=ref / "bf16")
    assert rep.defects == []


def test_ours_passes_both_engines(step_nvfp4, demo_ckpt):
    for engine in ("vllm", "sglang"):
        rep = check_checkpoint(step_nvfp4, (engine,), ref=demo_ckpt)
        assert rep.defects == []
        assert any("KV-cache scales" in w for w in rep.warnings)


def _seed(src, tmp_path, edit_tensors=None, edit_hqc=None):
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    if edit_tensors:
        t = load_file(bad / "model.safetensors")
        edit_tensors(t)
        save_file(t, bad / "model.safetensors")
    if edit_hqc:
        h = json.loads((bad / "hf_quant_config.json").read_text())
        edit_hqc(h["quantization"])
        (bad / "hf_quant_config.json").write_text(json.dumps(h))
    return bad


Q = "model.layers.0.self_attn."
E = "model.layers.1.mlp.experts.2."


def _set(name, value):
    return lambda t: t.__setitem__(name, torch.tensor(value, dtype=torch.float32))


def _swap_nibbles(t):
    w = t[E + "up_proj.weight"]
    t[E + "up_proj.weight"] = (w << 4) | (w >> 4)


SEEDED = {
    "unshared gate/up weight_scale_2": (dict(edit_tensors=lambda t: t[E + "up_proj.weight_scale_2"].mul_(2)), "weight_scale_2 differ"),
    "NaN input_scale": (dict(edit_tensors=_set(Q + "o_proj.input_scale", float("nan"))), "NaN"),
    "zero input_scale": (dict(edit_tensors=_set(Q + "o_proj.input_scale", 0.0)), "zero"),
    "expert missing its scales": (dict(edit_tensors=lambda t: [t.pop(E + "down_proj." + s) for s in ("weight_scale", "weight_scale_2")]), "missing weight_scale"),
    "lm_head excluded but carrying scales": (dict(edit_tensors=_set("lm_head.input_scale", 0.5)), "excluded but carries input_scale"),
    "missing k_scale": (dict(edit_tensors=lambda t: t.pop(Q + "k_proj.k_scale")), "k_scale is missing"),
    "missing group_size": (dict(edit_hqc=lambda q: q.pop("group_size")), "missing group_size"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(SEEDED))
def test_seeded_defects(ref, tmp_path, case):
    edits, message = SEEDED[case]
    rep = check_checkpoint(_seed(ref / "nvfp4", tmp_path, **edits))
    assert rep.exit_code == 1
    assert any(message in d for d in rep.defects), rep.defects


def test_swapped_nibbles_need_ref(ref, tmp_path):
    bad = _seed(ref / "nvfp4", tmp_path, edit_tensors=_swap_nibbles)
    assert check_checkpoint(bad).defects == []  # structurally fine...
    rep = check_checkpoint(bad, ref=ref / "bf16")  # ...but not the source's weights
    assert any("expert 2 up" in d and "off the reference" in d for d in rep.defects), rep.defects


def test_sglang_needs_stacked_experts(step_nvfp4, tmp_path):
    per = convert(step_nvfp4, tmp_path / "per", ConvertOptions(moe_layout="per-expert"))
    assert check_checkpoint(per, ("vllm",)).defects == []
    rep = check_checkpoint(per, ("sglang",))
    assert rep.defects and all("SGLang loads only the stacked layout" in d for d in rep.defects)


def test_cli_exit_codes(ref, tmp_path):
    from .conftest import run_cli

    assert run_cli("check", ref / "nvfp4").returncode == 0
    bad = _seed(ref / "nvfp4", tmp_path, edit_hqc=lambda q: q.pop("group_size"))
    proc = run_cli("check", bad)
    assert proc.returncode == 1 and "DEFECT" in proc.stdout
    assert run_cli("check", tmp_path / "nowhere").returncode == 2
