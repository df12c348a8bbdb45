"""Layer-streamed calibration: the same statistics and the same bytes as the whole model in memory,
one decoder layer materialized at a time, and a resume from the between-layer saves."""

from __future__ import annotations

import json

import pytest
import torch

from stepquant.calibrate import STATS_FIELDS, CalibStats, calibrate, load_batches, load_model
from stepquant.checkpoint import open_checkpoint
from stepquant.convert import ConvertOptions, convert, prepare
from stepquant.convert import output_digest as digest
from stepquant.layerwise import LayerLoader, LayerState, build_meta_model, calibrate_layers
from stepquant.quantize import Executor



def _stats_equal(a: CalibStats, b: CalibStats) -> None:
    for f in STATS_FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert sorted(x) == sorted(y), f
        for k in x:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), f"{f} {k}"
    assert (a.batches, a.tokens) == (b.batches, b.tokens)


def _setup(root, calib="embedded", samples=6, seq_len=48):
    ckpt = open_checkpoint(root)
    prep = prepare(ckpt, ConvertOptions(to="nvfp4", scope="all-linear", kv_cache="fp8", calib_data=calib,
                                        calib_samples=samples, calib_seq_len=seq_len))  # fmt: skip
    batches, _ = load_batches(calib, ckpt.root, samples, seq_len)
    return ckpt, Executor(ckpt, prep.plan, None, "shared"), batches


@pytest.mark.parametrize("all_experts", [False, True])
def test_same_statistics_as_in_memory_step(demo_ckpt, all_experts):
    ckpt, reader, batches = _setup(demo_ckpt)
    with ckpt:
        whole = calibrate(load_model(ckpt.root, ckpt.config), batches, all_experts)
        streamed = calibrate_layers(build_meta_model(ckpt.root, ckpt.config), reader, batches, all_experts=all_experts)
    _stats_equal(whole, streamed)
    assert "lm_head" in streamed.linear and streamed.k and streamed.experts_mid
    if all_experts:
        assert all((v > 0).all() for v in streamed.experts_in.values())


def test_same_statistics_as_in_memory_qwen3moe(ref):
    ckpt, reader, batches = _setup(ref / "bf16", str(ref / "calib_tokens.json"))
    with ckpt:
        whole = calibrate(load_model(ckpt.root, ckpt.config), batches)
        streamed = calibrate_layers(build_meta_model(ckpt.root, ckpt.config), reader, batches)
    _stats_equal(whole, streamed)


def test_comparison_can_fail(demo_ckpt):
    """The equality above is real: other batches give other statistics."""
    ckpt, reader, batches = _setup(demo_ckpt)
    with ckpt:
        whole = calibrate(load_model(ckpt.root, ckpt.config), batches[:1])
        streamed = calibrate_layers(build_meta_model(ckpt.root, ckpt.config), reader, batches)
    with pytest.raises(AssertionError):
        _stats_equal(whole, streamed)


def test_one_layer_in_memory_at_a_time(demo_ckpt, monkeypatch):
    """When a decoder layer runs on the batches, it is the only one holding real weights (the recorders that
    stand in for the layers in the first pass run with none)."""
    ckpt, reader, batches = _setup(demo_ckpt)
    with ckpt:
        model = build_meta_model(ckpt.root, ckpt.config)
        layers = model.get_decoder().layers
        seen = []

        def check(module, args):
            real = [i for i, layer in enumerate(layers) if any(not p.is_meta for p in layer.parameters())]
            if real or seen:
                seen.append(real)

        for layer in layers:
            layer.register_forward_pre_hook(check)
        calibrate_layers(model, reader, batches)
    assert seen == [[i] for i in range(len(layers)) for _ in batches]
    assert all(p.is_meta for p in model.parameters())  # everything released at the end


def test_resume_skips_saved_layers(demo_ckpt, tmp_path, monkeypatch):
    """With a save after layer 1, a new run loads only the layers after it, to the same statistics."""
    ckpt, reader, batches = _setup(demo_ckpt)
    with ckpt:
        full = calibrate_layers(build_meta_model(ckpt.root, ckpt.config), reader, batches, state=tmp_path)
        saved = LayerState(tmp_path, "").folder
        assert not list(saved.iterdir())  # a calibration this short is not worth saving
        loaded = []
        monkeypatch.setenv("STEPQUANT_FAULT_KILL_AFTER_LAYER", "")
        model = build_meta_model(ckpt.root, ckpt.config)
        original = LayerLoader.load

        def stop_after_1(self, module):
            if module is model.get_decoder().layers[2]:
                raise KeyboardInterrupt
            original(self, module)

        monkeypatch.setattr(LayerLoader, "load", stop_after_1)
        monkeypatch.setattr("stepquant.layerwise.SAVE_RATIO", 0)  # save after every layer
        monkeypatch.setattr("stepquant.layerwise.SAVE_SECONDS", 0)
        with pytest.raises(KeyboardInterrupt):
            calibrate_layers(model, reader, batches, state=tmp_path)
        assert [p.name for p in sorted(saved.glob("*.json"))] == ["L1.json"]

        def counting(self, module):
            loaded.append(self.names[module])
            original(self, module)

        monkeypatch.setattr(LayerLoader, "load", counting)
        resumed = calibrate_layers(build_meta_model(ckpt.root, ckpt.config), reader, batches, state=tmp_path)
    _stats_equal(full, resumed)
    layer_loads = [n for n in loaded if ".layers." in n]
    assert layer_loads == [f"model.language_model.layers.{i}" for i in range(2, 4)]


def _both_modes(src, tmp_path, **args):
    a = convert(src, tmp_path / "layers", ConvertOptions(**args, calib_mode="layers"))
    b = convert(src, tmp_path / "model", ConvertOptions(**args, calib_mode="model"))
    da, db = digest(a), digest(b)
    ma, mb = (json.loads((p / "stepquant.json").read_text()) for p in (a, b))
    assert (ma["options"].pop("calib_mode"), mb["options"].pop("calib_mode")) == ("layers", "model")
    ma.pop("timings"), mb.pop("timings")
    assert ma == mb
    da.pop("stepquant.json"), db.pop("stepquant.json")
    assert da == db and not (a / ".stepquant-work").exists()


def test_convert_streamed_equals_in_memory_step(demo_ckpt, tmp_path):
    """The whole conversion, byte for byte (the manifest differs only in the option that says which)."""
    _both_modes(demo_ckpt, tmp_path, recipe="step3p7-nvfp4-moe-only-kvfp8", calib_samples=6, calib_seq_len=48)


def test_convert_streamed_equals_in_memory_qwen3moe(ref, tmp_path):
    _both_modes(ref / "bf16", tmp_path, to="nvfp4", scope="all-linear", kv_cache="fp8", moe_layout="per-expert",
                naming="keep", calib_data=str(ref / "calib_tokens.json"))  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_statistics_as_in_memory_on_cuda(demo_ckpt):
    ckpt, reader, batches = _setup(demo_ckpt)
    with ckpt:
        whole = calibrate(load_model(ckpt.root, ckpt.config, "cuda"), batches, True)
        streamed = calibrate_layers(build_meta_model(ckpt.root, ckpt.config), reader, batches, "cuda", all_experts=True)
    _stats_equal(whole, streamed)
