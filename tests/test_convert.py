import json
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from stepquant.checkpoint import open_checkpoint, tensor_differences
from stepquant.convert import ConvertOptions, convert, output_digest
from stepquant.errors import StepquantError
from stepquant.inspect import inspect_checkpoint
from stepquant.quantize import Executor


def test_naming_round_trip_is_byte_identical(demo_ckpt, tmp_path):
    mo = convert(demo_ckpt, tmp_path / "mo", ConvertOptions(naming="modelopt"))
    assert inspect_checkpoint(mo)["naming"] == "modelopt"
    with open_checkpoint(mo) as c:
        assert "model.language_model.layers.1.moe.gate_proj.weight" in c.tensors
        assert "model.vision_model.conv1.weight" in c.tensors
        assert "model.vit_large_projector.weight" in c.tensors
    back = convert(mo, tmp_path / "back", ConvertOptions(naming="step-hub"))
    with open_checkpoint(demo_ckpt) as a, open_checkpoint(back) as b:
        assert tensor_differences(a, b) == []
    # sidecars carried, config unchanged
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (back / name).read_bytes() == (demo_ckpt / name).read_bytes()
    assert json.loads((back / "config.json").read_text()) == json.loads((demo_ckpt / "config.json").read_text())


def test_resharding_keeps_tensors(demo_ckpt, tmp_path):
    out = convert(demo_ckpt, tmp_path / "sh", ConvertOptions(max_shard_size="600KB"))
    r = inspect_checkpoint(out)
    assert len(r["shards"]) > 4
    with open_checkpoint(demo_ckpt) as a, open_checkpoint(out) as b:
        assert tensor_differences(a, b) == []
    manifest = json.loads((out / "stepquant.json").read_text())
    assert manifest["producer"]["name"] == "stepquant"
    assert manifest["source"]["naming"] == "step-hub"
    assert sorted(manifest["outputs"]) == sorted(r["shards"])
    assert all(len(v["sha256"]) == 64 for v in manifest["outputs"].values())


def test_exclude_lists_follow_the_names(ref, tmp_path):
    out = convert(ref / "nvfp4", tmp_path / "sg", ConvertOptions(naming="sglang"))
    hqc = json.loads((out / "hf_quant_config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert hqc["quantization"]["exclude_modules"] == [
        "language_model.lm_head",
        "language_model.model.embed_tokens",
        "language_model.model.layers.0.mlp.gate",
        "language_model.model.layers.1.mlp.gate",
    ]
    assert cfg["quantization_config"]["ignore"] == hqc["quantization"]["exclude_modules"]
    assert hqc["producer"] == {"name": "modelopt", "version": "0.47.0"}  # what made the weights
    with open_checkpoint(ref / "nvfp4") as a, open_checkpoint(out) as b:
        assert len(a.tensors) == len(b.tensors)
        assert b.read("language_model.model.layers.0.mlp.experts.3.up_proj.weight").equal(
            a.read("model.layers.0.mlp.experts.3.up_proj.weight")
        )


def test_nvfp4_source_dequantized_to_bf16(ref, tmp_path):
    out = convert(ref / "nvfp4", tmp_path / "x", ConvertOptions(to="bf16"))
    assert not (out / "hf_quant_config.json").exists()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    with open_checkpoint(out) as b, open_checkpoint(ref / "bf16") as a:
        assert set(b.tensors) == set(a.tensors)
        assert all(t.dtype == "BF16" for t in b.tensors.values())
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.experts.5.down_proj.weight"):
            w, deq = a.read(name).float(), b.read(name).float()
            rel = (w - deq).norm() / w.norm()
            assert 0 < rel < 0.15  # NVFP4's error on random weights, nothing worse


def test_to_bf16_of_bf16_source(ref, tmp_path):
    out = convert(ref / "bf16", tmp_path / "b", ConvertOptions(to="bf16"))
    with open_checkpoint(ref / "bf16") as a, open_checkpoint(out) as b:
        assert tensor_differences(a, b) == []


def test_collision_is_refused_before_writing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    save_file({"model.a.w": torch.zeros(2), "model.b.w": torch.ones(2)}, src / "model.safetensors")
    y = tmp_path / "m.yaml"
    y.write_text('rename:\n  "model.a.": "model.b."\n')
    with pytest.raises(StepquantError, match="sends both"):
        convert(src, tmp_path / "out", ConvertOptions(naming_map=str(y)))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_source_is_never_modified(demo_ckpt, tmp_path):
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in demo_ckpt.iterdir()}
    convert(demo_ckpt, tmp_path / "o", ConvertOptions(naming="sglang", max_shard_size="1MB"))
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in demo_ckpt.iterdir()}
    assert before == after


def test_weights_are_written_while_the_calibration_runs(demo_ckpt, tmp_path, monkeypatch):
    """The writer does not wait for the calibration: here the calibration starts only once every shard holds
    all but its late scales (it would wait forever for a writer that waited for it), and the result
    equals a run with the whole model in memory."""
    import stepquant.convert as conv

    real, seen = conv._calibrate, []

    def calibrate(ckpt, prep, opts, state=None, check=None):
        deadline = time.time() + 120
        while any(t.name == "stepquant-shards" for t in threading.enumerate()) and time.time() < deadline:
            time.sleep(0.02)
        late = sum(t.nbytes for t in Executor(ckpt, prep.plan, None, "max").outputs() if t.late)
        tmps = list((tmp_path / "a.partial").glob("*.tmp"))
        seen.append((sum(p.stat().st_size for p in tmps), sum(nb for _, _, nb in prep.outputs.values()) - late))
        return real(ckpt, prep, opts, state, check)

    monkeypatch.setattr(conv, "_calibrate", calibrate)
    opts = dict(recipe="step3p7-nvfp4-moe-only-kvfp8", calib_samples=4, calib_seq_len=32)
    a = convert(demo_ckpt, tmp_path / "a", ConvertOptions(**opts))
    written, early = seen[0]
    assert written > early > 0  # headers and every tensor but the late ones
    monkeypatch.setattr(conv, "_calibrate", real)
    b = convert(demo_ckpt, tmp_path / "b", ConvertOptions(calib_mode="model", **opts))
    da, db = output_digest(a), output_digest(b)
    assert da.pop("stepquant.json") != db.pop("stepquant.json")  # the options differ: calib_mode
    assert da == db


def test_a_writer_failure_stops_the_calibration_at_its_next_layer(demo_ckpt, tmp_path, monkeypatch):
    """The background writer fails (here: quantizing experts) while the calibration runs: its error stops
    the calibration after the layer it is in, instead of after the last, and reaches the caller."""
    import stepquant.layerwise as lw
    from stepquant.quantize import Executor as Ex

    failed, loaded = threading.Event(), []

    def broken(self, ex, key):
        failed.set()
        raise StepquantError(f"experts of {ex.layer}: disk on fire")

    real_load = lw.LayerLoader.load

    def load(self, module):
        name = self.names[module]
        if ".layers." in name:
            loaded.append(name)
            if len(loaded) == 2:  # the writer has failed before the second layer runs, at the latest
                assert failed.wait(60)
        return real_load(self, module)

    monkeypatch.setattr(Ex, "quantize_experts", broken)
    monkeypatch.setattr(lw.LayerLoader, "load", load)
    with pytest.raises(StepquantError, match="disk on fire"):
        convert(demo_ckpt, tmp_path / "o", ConvertOptions(recipe="step3p7-nvfp4-moe-only-kvfp8", calib_samples=2, calib_seq_len=16))
    assert len(loaded) <= 2  # of the demo's 4: stopped after the layer in which the writer failed
    assert not (tmp_path / "o").exists()
