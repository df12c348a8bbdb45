"""The demo Step-3.7 with the public release recipe (issue 3, done-when 2 and 4)."""

import json

import pytest
import torch

from stepquant.check import check_checkpoint
from stepquant.checkpoint import open_checkpoint, tensor_differences
from stepquant.convert import ConvertOptions, convert
from stepquant.naming import builtin_map

RECIPE = "step3p7-nvfp4-moe-only-kvfp8"
FAST = dict(calib_samples=8, calib_seq_len=64)


@pytest.fixture(scope="module")
def built(demo_ckpt, tmp_path_factory):
    return convert(demo_ckpt, tmp_path_factory.mktemp("step") / "nvfp4", ConvertOptions(recipe=RECIPE, **FAST))


def test_release_layout(built, demo_ckpt):
    to_mo = builtin_map("step-hub", "modelopt")
    with open_checkpoint(demo_ckpt) as src, open_checkpoint(built) as out:
        for layer in (1, 2, 3):
            p = f"model.language_model.layers.{layer}.moe."
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert out.tensors[p + proj + ".weight"].dtype == "U8"
                assert out.tensors[p + proj + ".weight"].shape[0] == 8
                assert out.tensors[p + proj + ".weight_scale"].dtype == "F8_E4M3"
                for s in ("weight_scale_2", "input_scale"):
                    assert out.tensors[p + proj + "." + s].shape == (8,)
            assert torch.equal(out.read(p + "gate_proj.weight_scale_2"), out.read(p + "up_proj.weight_scale_2"))
            assert torch.equal(out.read(p + "gate_proj.input_scale"), out.read(p + "up_proj.input_scale"))
        for layer in range(4):
            a = f"model.language_model.layers.{layer}.self_attn."
            assert out.tensors[a + "k_proj.k_scale"].shape == () and out.tensors[a + "v_proj.v_scale"].shape == ()
        assert not any("layers.4." in n and "scale" in n for n in out.tensors)  # MTP layer stays BF16
        # every tensor that is not a routed expert of layers 1-3 is byte-identical under the naming map
        routed = [f"model.layers.{i}.moe.{p}_proj.weight" for i in (1, 2, 3) for p in ("gate", "up", "down")]
        same = 0
        for name in src.tensors:
            if name in routed:
                continue
            new = to_mo.apply(name)
            assert b"".join(src.iter_bytes(name)) == b"".join(out.iter_bytes(new)), name
            same += 1
        assert same == len(src.tensors) - 9
    cfg = json.loads((built / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "modelopt"  # top level of a multimodal config
    assert "quantization_config" not in cfg["text_config"]
    manifest = json.loads((built / "stepquant.json").read_text())
    assert manifest["recipe"]["name"] == RECIPE
    assert manifest["calibration"]["samples"] == 8
    assert set(manifest["calibration"]["expert_tokens"]) >= {f"model.layers.{i}" for i in (1, 2, 3)}


def test_stacked_per_expert_stacked_is_byte_identical(built, tmp_path):
    per = convert(built, tmp_path / "per", ConvertOptions(moe_layout="per-expert"))
    with open_checkpoint(per) as c:
        assert "model.language_model.layers.1.moe.experts.7.down_proj.weight_scale_2" in c.tensors
        assert c.tensors["model.language_model.layers.1.moe.experts.7.down_proj.weight_scale_2"].shape == ()
    back = convert(per, tmp_path / "back", ConvertOptions(moe_layout="stacked"))
    with open_checkpoint(built) as a, open_checkpoint(back) as b:
        assert tensor_differences(a, b) == []
    for name in ("config.json", "hf_quant_config.json"):
        assert (built / name).read_bytes() == (back / name).read_bytes()


def test_naming_sglang(demo_ckpt, tmp_path):
    out = convert(demo_ckpt, tmp_path / "sg", ConvertOptions(recipe=RECIPE, naming="sglang", **FAST))
    with open_checkpoint(out) as c:
        assert "language_model.model.layers.1.moe.gate_proj.weight" in c.tensors
        assert "language_model.lm_head.weight" in c.tensors
    excl = json.loads((out / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    assert "language_model.lm_head" in excl and "vision_model.*" in excl
    for engine in ("vllm", "sglang"):
        assert check_checkpoint(out, (engine,), ref=demo_ckpt).defects == []


@pytest.mark.parametrize("recipe", [RECIPE, "nvfp4-all-linear", "fp8-all-linear", "step3p7-fp8"])
def test_dry_run_predicts_size_within_1_percent(demo_ckpt, tmp_path, recipe):
    plan = convert(demo_ckpt, tmp_path / "dry", ConvertOptions(recipe=recipe, dry_run=True, **FAST))
    assert not (tmp_path / "dry").exists() and not (tmp_path / "dry.partial").exists()
    out = convert(demo_ckpt, tmp_path / "real", ConvertOptions(recipe=recipe, **FAST))
    actual = sum(p.stat().st_size for p in out.iterdir())
    assert abs(plan["predicted_bytes"] - actual) / actual < 0.01, (plan["predicted_bytes"], actual)
    with open_checkpoint(out) as c:
        assert {n: (t.dtype, list(t.shape)) for n, t in c.tensors.items()} == {
            n: (o["dtype"], o["shape"]) for n, o in plan["outputs"].items()
        }


def test_calib_all_experts_changes_only_expert_statistics(demo_ckpt, tmp_path, caplog):
    """Every token through every expert: each expert's gate/up input amax becomes the layer's, the
    down inputs are measured for experts no token was routed to, and nothing else changes."""
    base = dict(recipe="step3p7-nvfp4-moe-only-kvfp8", calib_samples=2, calib_seq_len=16, expert_input_scale="per-expert")
    with caplog.at_level("WARNING", logger="stepquant"):
        routed = convert(demo_ckpt, tmp_path / "routed", ConvertOptions(**base))
    idle = [r.getMessage() for r in caplog.records if "saw no calibration tokens" in r.getMessage()]
    assert idle and all("--calib-all-experts" in m for m in idle)
    caplog.clear()
    with caplog.at_level("WARNING", logger="stepquant"):
        every = convert(demo_ckpt, tmp_path / "every", ConvertOptions(**base, calib_all_experts=True))
    assert not [r for r in caplog.records if "saw no calibration tokens" in r.getMessage()]
    m_routed, m_every = (json.loads((p / "stepquant.json").read_text()) for p in (routed, every))
    assert m_routed["calibration"]["expert_tokens"] == m_every["calibration"]["expert_tokens"]  # routed counts
    # and what every expert's statistics saw: all the calibration tokens, in each layer
    seen = m_every["calibration"]["expert_statistics_tokens"]
    assert seen and all(n == m_every["calibration"]["tokens"] for v in seen.values() for n in v)
    assert "expert_statistics_tokens" not in m_routed["calibration"]
    with open_checkpoint(routed) as a, open_checkpoint(every) as b:
        changed = {n for n in a.tensors if not torch.equal(a.read(n), b.read(n))}
        assert changed and all(n.endswith(".input_scale") and ".moe." in n for n in changed)
        for layer in (1, 2, 3):
            up = b.read(f"model.language_model.layers.{layer}.moe.up_proj.input_scale")
            assert torch.equal(up, up.max().expand_as(up))  # every expert saw every token
            # all tokens include the routed ones: the down inputs' max can only grow (up to the rounding
            # of a matmul over more rows)
            down_every = b.read(f"model.language_model.layers.{layer}.moe.down_proj.input_scale")
            down_routed = a.read(f"model.language_model.layers.{layer}.moe.down_proj.input_scale")
            tokens = torch.tensor(m_routed["calibration"]["expert_tokens"][f"model.layers.{layer}"])
            assert (down_every[tokens > 0] >= down_routed[tokens > 0] * 0.99).all()
    png = (every / "expert_coverage.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
