"""verify on the demo Step-3.7 model: the quantized weights really run, reports are honest."""

import json

import pytest

from stepquant.convert import ConvertOptions, convert
from stepquant.verify import VerifyOptions, verify

from .conftest import run_cli
from .test_gpqa import ROWS, write_csv


@pytest.fixture(scope="module")
def builds(demo_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("verify")
    nv = convert(demo_ckpt, out / "nvfp4", ConvertOptions(recipe="step3p7-nvfp4-moe-only-kvfp8", calib_samples=8, calib_seq_len=64))
    same = convert(demo_ckpt, out / "renamed", ConvertOptions(naming="modelopt"))
    return nv, same


def test_bf16_copy_has_zero_divergence(demo_ckpt, builds):
    r = verify(builds[1], VerifyOptions(ref=str(demo_ckpt), eval_samples=2, eval_seq_len=32))
    assert r["kl"] == 0.0 and r["top1"] == 1.0 and r["ppl"]["ref"] == r["ppl"]["quant"]


def test_nvfp4_runs_quantized_and_modes_differ(demo_ckpt, builds):
    a = verify(builds[0], VerifyOptions(ref=str(demo_ckpt), mode="w4a4", eval_samples=2, eval_seq_len=32))
    b = verify(builds[0], VerifyOptions(ref=str(demo_ckpt), mode="w4a16", eval_samples=2, eval_seq_len=32))
    assert 0 < b["kl"] and 0 < a["kl"] and a["kl"] != b["kl"]
    assert a["ppl"]["ref"] == b["ppl"]["ref"] and a["tokens"] == 62
    assert 30 < a["sqnr_db"]["model.language_model.layers.0"] < float("inf")  # dense layer 0: only its FP8 KV cache
    assert 5 < a["sqnr_db"]["model.language_model.layers.3"] < 60
    c = verify(builds[0], VerifyOptions(ref=str(demo_ckpt), mode="w4a4", kv_cache="none", eval_samples=2, eval_seq_len=32))
    assert c["sqnr_db"]["model.language_model.layers.0"] == float("inf")  # nothing quantized there at all


def test_fp8_kv_cache_is_emulated_with_the_checkpoints_scales(demo_ckpt, builds):
    a = verify(builds[0], VerifyOptions(ref=str(demo_ckpt), mode="w4a16", eval_samples=2, eval_seq_len=32))
    b = verify(builds[0], VerifyOptions(ref=str(demo_ckpt), mode="w4a16", kv_cache="none", eval_samples=2, eval_seq_len=32))
    assert a["kv_cache"]["dtype"] == "fp8" and a["kv_cache"]["layers"] == 4  # the demo's four attention layers
    assert b["kv_cache"] == {"dtype": "bf16", "layers": 0}
    assert a["kl"] != b["kl"] and a["ppl"]["ref"] == b["ppl"]["ref"]
    from stepquant.verify import format_table

    assert "FP8 KV cache (4 layers)" in format_table(a)


def test_fp8_kv_rounds_to_e4m3_and_saturates():
    import torch

    from stepquant.qmodel import fp8_kv

    t = torch.tensor([0.0, 1.0, 1.06, -3.3, 1000.0, -1000.0], dtype=torch.bfloat16)
    out = fp8_kv(t, 0.5)
    assert out.tolist() == [0.0, 1.0, 1.0, -3.25, 224.0, -224.0]  # /0.5 -> E4M3 (3 mantissa bits, max 448) -> x0.5


def test_gpqa_end_to_end_with_report_and_exit_code(demo_ckpt, builds, tmp_path):
    data = write_csv(tmp_path / "gpqa.csv")
    rep = tmp_path / "report"
    proc = run_cli("verify", str(builds[0]), "--ref", str(demo_ckpt), "--gpqa", str(data), "--repeats", "2",
                   "--max-new-tokens", "3", "--eval-samples", "1", "--eval-seq-len", "16", "--report", str(rep),
                   "--min-recovery", "0")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads((rep / "report.json").read_text())
    assert r["gpqa"]["n"] == 3 and r["gpqa"]["samples"] == 6 and r["verdict"] == "pass"
    for k in ("kl", "top1", "ppl"):
        assert k in r
    md = (rep / "report.md").read_text()
    assert "GPQA accuracy (3 questions x 2)" in md
    for png in ("sqnr.png", "kl.png"):  # real PNGs, linked from the report
        assert (rep / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in md
    h = r["kl_histogram"]
    assert h["zeros"] + sum(h["counts"]) == r["tokens"] and len(h["edges"]) == len(h["counts"]) + 1
    assert not list(rep.glob("*.partial"))
    for text in (proc.stdout, proc.stderr, md, json.dumps(r)):
        assert "Q0?" not in text and "right1" not in text  # questions and answers never in clear


def test_gpqa_loglik_picks_the_likeliest_continuation(demo_ckpt, builds, tmp_path):
    """lm-eval's variant: the letter whose " (X)" continuation the model finds likeliest, computed here
    by hand from the logits; and end to end through verify."""
    import torch
    from transformers import AutoTokenizer

    from stepquant import gpqa
    from stepquant.calibrate import load_model
    from stepquant.checkpoint import open_checkpoint

    with open_checkpoint(demo_ckpt) as ref:
        model = load_model(ref.root, ref.config)
    tok = AutoTokenizer.from_pretrained(demo_ckpt)
    exs = gpqa.examples(ROWS, 1)
    got = gpqa.run(exs, gpqa.loglik_chooser(model, tok, "cpu"), 2, make_prompt=gpqa.loglik_prompt)
    for ex, answer in zip(exs, got):
        ctx = gpqa.loglik_prompt(ex)
        n = len(tok(ctx)["input_ids"])
        scores = []
        for c in ("(A)", "(B)", "(C)", "(D)"):
            ids = tok(ctx + " " + c)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            scores.append(sum(float(logp[t - 1, ids[t]]) for t in range(n, len(ids))))
        assert answer == "Answer: " + "ABCD"[scores.index(max(scores))]
    r = verify(builds[0], VerifyOptions(ref=str(demo_ckpt), gpqa=str(write_csv(tmp_path / "g.csv")), gpqa_mode="loglik",
                                        repeats=2, eval_samples=1, eval_seq_len=16, min_recovery=0))  # fmt: skip
    assert r["gpqa"]["samples"] == 6 and r["options"]["gpqa_mode"] == "loglik"


def test_failing_recovery_exits_1(demo_ckpt, builds, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from stepquant import gpqa
    from stepquant.cli import main

    data = tmp_path / "gpqa.json"
    data.write_text(json.dumps(ROWS))
    scores = iter([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the reference, then the quantized model
    monkeypatch.setattr(gpqa, "score", lambda exs, responses: next(scores))
    args = ["verify", str(builds[0]), "--ref", str(demo_ckpt), "--gpqa", str(data), "--repeats", "1",
            "--max-new-tokens", "1", "--eval-samples", "1", "--eval-seq-len", "16"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "verdict: fail" in res.output and "recovery 0.667" in res.output
    scores = iter([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    res = CliRunner().invoke(main, [*args, "--min-recovery", "0.6"])
    assert res.exit_code == 0 and "verdict: pass" in res.output


def test_bad_input_exits_2(demo_ckpt, tmp_path):
    proc = run_cli("verify", str(tmp_path / "nope"), "--ref", str(demo_ckpt))
    assert proc.returncode == 2 and proc.stderr.startswith("error:")


@pytest.mark.parametrize("mode", ["w4a4", "w4a16"])
def test_layerwise_fidelity_equals_whole_model(demo_ckpt, builds, mode):
    """One decoder layer in memory at a time, the reference's and the quantized hidden states side by
    side: the same KL, top-1, perplexities and per-layer SQNR as with the whole model loaded."""
    common = dict(ref=str(demo_ckpt), mode=mode, eval_samples=2, eval_seq_len=32)
    whole = verify(builds[0], VerifyOptions(**common))
    layers = verify(builds[0], VerifyOptions(**common, layerwise=True))
    assert layers.pop("loading") == "layerwise" and whole.pop("loading") == "whole model"
    for key in ("kl", "top1", "ppl", "sqnr_db", "kl_quantiles", "tokens"):
        assert layers[key] == whole[key], key
    assert 0 < layers["kl"]


def test_layerwise_refuses_gpqa(demo_ckpt, builds, tmp_path):
    from stepquant.errors import StepquantError

    with pytest.raises(StepquantError, match="--layerwise"):
        verify(builds[0], VerifyOptions(ref=str(demo_ckpt), layerwise=True, gpqa=str(tmp_path / "x.csv")))
