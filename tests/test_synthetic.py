"""The synthetic Step-3.7-shaped checkpoint: real names and shapes, loadable, convertible."""

import json
import random

from stepquant.check import check_checkpoint
from stepquant.checkpoint import open_checkpoint
from stepquant.convert import ConvertOptions, convert
from stepquant.inspect import inspect_checkpoint
from stepquant.synthetic import StepShape, generate, tensor_shapes

TINY = StepShape(layers=2, dense_layers=1, hidden=128, experts=8, topk=2, moe_inter=64, dense_inter=256,
                 heads_full=2, heads_sliding=3, kv_heads=1, head_dim=64, vocab=300)  # fmt: skip


def test_full_width_layer_has_the_step_shapes():
    s = tensor_shapes(StepShape(layers=2))
    assert s["model.layers.1.moe.gate_proj.weight"] == (288, 1280, 4096)
    assert s["model.layers.1.moe.down_proj.weight"] == (288, 4096, 1280)
    assert s["model.layers.0.self_attn.q_proj.weight"] == (64 * 128, 4096)  # full attention: 64 heads
    assert s["model.layers.1.self_attn.q_proj.weight"] == (96 * 128, 4096)  # sliding: 96 heads
    assert s["model.layers.1.self_attn.k_proj.weight"] == (1024, 4096)
    per_layer = sum(2 * torch_numel(v) for k, v in s.items() if ".layers.1." in k)
    assert 9.2e9 < per_layer < 9.5e9


def torch_numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def test_generated_checkpoint_converts_and_checks(tmp_path):
    src = generate(tmp_path / "src", TINY)
    rep = inspect_checkpoint(src)
    assert rep["family"].startswith("step3p7") and rep["moe_layout"] == "stacked"
    with open_checkpoint(src) as c:
        assert set(c.tensors) == set(tensor_shapes(TINY))
        w = c.read("model.layers.1.moe.up_proj.weight").float()
        assert 0.01 < float(w.std()) < 0.05 and float(w.abs().max()) > 5 * float(w.std())  # heavy tails
        assert not w[0].equal(w[1])  # experts differ
    assert generate(tmp_path / "again", TINY) and all(
        (tmp_path / "again" / p.name).read_bytes() == p.read_bytes() for p in src.glob("*.safetensors")
    )  # deterministic
    r = random.Random(0)
    calib = tmp_path / "tokens.json"
    calib.write_text(json.dumps({"batches": [[[r.randrange(TINY.vocab) for _ in range(16)] for _ in range(2)]]}))
    dst = convert(src, tmp_path / "nvfp4", ConvertOptions(recipe="step3p7-nvfp4-moe-only-kvfp8", calib_data=str(calib)))
    assert check_checkpoint(dst, ("vllm",), ref=src).defects == []
