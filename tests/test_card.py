"""The model card: metadata that the Hub parses, and a body that says only what the files say."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard

from stepquant.card import base_model_of, card_inputs, render_card
from stepquant.convert import ConvertOptions, convert
from stepquant.errors import StepquantError
from stepquant.verify import VerifyOptions, verify


@pytest.fixture(scope="module")
def builds(demo_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    nvfp4 = convert(demo_ckpt, root / "nvfp4", ConvertOptions(recipe="step3p7-nvfp4-moe-only-kvfp8", calib_samples=4, calib_seq_len=32))
    fp8 = convert(demo_ckpt, root / "fp8", ConvertOptions(to="fp8", scope="all-linear", calib_samples=4, calib_seq_len=32))
    report = verify(nvfp4, VerifyOptions(ref=str(demo_ckpt), mode="w4a16", eval_samples=2, eval_seq_len=32,
                                         report=str(root / "report")), echo=lambda _: None)  # fmt: skip
    return nvfp4, fp8, report


def manifest(path):
    return json.loads((path / "stepquant.json").read_text())


def test_nvfp4_card_metadata_and_body(builds):
    nvfp4, _, report = builds
    text = render_card(card_inputs(nvfp4, "me/step-nvfp4", "me/step-bf16", manifest(nvfp4), report, ("verify/sqnr.png",)))
    card = ModelCard(text)
    assert card.data.base_model == "me/step-bf16" and card.data.base_model_relation == "quantized"
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "image-text-to-text"
    assert {"nvfp4", "modelopt", "stepquant", "step3p7"} <= set(card.data.tags) and "fp8" not in card.data.tags
    body = card.text
    assert f"{report['kl']:.5f}" in body and "`w4a16`" in body and "![sqnr](verify/sqnr.png)" in body
    roles = manifest(nvfp4)["modules"]["roles"]
    assert f"| routed experts | {roles['experts']['quantized']} | {roles['experts']['kept']} |" in body
    assert roles["attention"] == {"quantized": 0, "kept": 20}
    assert "--quantization modelopt_fp4 --kv-cache-dtype fp8_e4m3 --moe-runner-backend flashinfer_trtllm" in body
    assert "--moe-runner-backend marlin" in body and "vllm serve me/step-nvfp4" in body
    assert "--recipe step3p7-nvfp4-moe-only-kvfp8" in body


def test_fp8_card_and_no_report(builds):
    _, fp8, _ = builds
    card = ModelCard(render_card(card_inputs(fp8, "me/step-fp8", "me/step-bf16", manifest(fp8), None, ())))
    assert "fp8" in card.data.tags and "nvfp4" not in card.data.tags
    assert "--quantization modelopt_fp8" in card.text and "Not measured yet" in card.text
    assert manifest(fp8)["modules"]["roles"]["attention"]["quantized"] == 20


def test_copied_bytes_are_the_unquantized_source_tensors(builds, demo_ckpt):
    from stepquant.checkpoint import open_checkpoint

    nvfp4 = builds[0]
    mods = manifest(nvfp4)["modules"]
    with open_checkpoint(demo_ckpt) as src:
        experts = sum(t.nbytes for n, t in src.tensors.items()
                      if n.endswith(("moe.gate_proj.weight", "moe.up_proj.weight", "moe.down_proj.weight")) and "layers.4." not in n)
        assert mods["copied_bytes"] == src.total_bytes - experts


def test_base_model():
    assert base_model_of({"source": {"id": "stepfun-ai/Step-3.7-Flash"}}, None) == "stepfun-ai/Step-3.7-Flash"
    cache = "/home/u/.cache/huggingface/hub/models--stepfun-ai--Step-3.7-Flash/snapshots/abc123"
    assert base_model_of({"source": {"id": cache}}, None) == "stepfun-ai/Step-3.7-Flash"
    assert base_model_of({"source": {"id": "/data/bf16"}}, "org/name") == "org/name"
    with pytest.raises(StepquantError, match="--base-model"):
        base_model_of({"source": {"id": "/data/bf16"}}, None)
    with pytest.raises(StepquantError, match="not a Hub repo id"):
        base_model_of({}, "not a repo")
