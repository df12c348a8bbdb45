import itertools

import pytest

from stepquant.checkpoint import open_checkpoint
from stepquant.errors import StepquantError
from stepquant.naming import NAMINGS, builtin_map, detect_naming, load_user_map, rename_all, resolve_map

STEP_HUB = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.3.moe.gate_proj.weight",
    "model.norm.weight",
    "vision_model.transformer.resblocks.0.attn.in_proj_weight",
    "vit_large_projector.weight",
    "lm_head.weight",
]


def test_table_matches_spec():
    # SPEC §7, row by row
    assert builtin_map("step-hub", "modelopt").apply("model.layers.0.mlp.gate_proj.weight") == (
        "model.language_model.layers.0.mlp.gate_proj.weight"
    )
    assert builtin_map("step-hub", "sglang").apply("model.layers.5.x") == "language_model.model.layers.5.x"
    assert builtin_map("step-hub", "vllm").apply("lm_head.weight") == "language_model.lm_head.weight"
    assert builtin_map("step-hub", "modelopt").apply("vision_model.conv1.weight") == "model.vision_model.conv1.weight"
    assert builtin_map("step-hub", "modelopt").apply("vit_large_projector.weight") == "model.vit_large_projector.weight"
    assert builtin_map("modelopt", "sglang").apply("model.vision_model.x") == "vision_model.x"


@pytest.mark.parametrize("a, b", list(itertools.permutations(NAMINGS, 2)))
def test_every_pair_round_trips(a, b):
    names = list(rename_all(STEP_HUB, builtin_map("step-hub", a)).values())
    there = rename_all(names, builtin_map(a, b))
    back = rename_all(list(there.values()), builtin_map(b, a))
    assert list(back.values()) == names
    assert detect_naming(there.values()) == ("sglang" if b == "vllm" else b)


def test_patterns_are_renamed_and_wildcards_kept():
    m = builtin_map("step-hub", "modelopt")
    assert m.apply_pattern("lm_head") == "lm_head"
    assert m.apply_pattern("model.layers.0.mlp.gate") == "model.language_model.layers.0.mlp.gate"
    assert m.apply_pattern("model.layers.*.self_attn.g_proj") == "model.language_model.layers.*.self_attn.g_proj"
    assert m.apply_pattern("vision_model*") == "vision_model*"  # no module boundary: left alone
    assert m.apply_pattern("*experts*") == "*experts*"
    assert builtin_map("step-hub", "sglang").apply_pattern("lm_head") == "language_model.lm_head"


def test_unknown_name_is_refused_by_builtin_maps():
    with pytest.raises(StepquantError, match="'transformer.h.0.w' matches no prefix"):
        builtin_map("step-hub", "modelopt").apply("transformer.h.0.w")


def test_two_names_to_one_is_an_error(tmp_path):
    y = tmp_path / "m.yaml"
    y.write_text('rename:\n  "model.a.": "model.b."\n')
    with pytest.raises(StepquantError, match="sends both 'model.a.w' and 'model.b.w' to 'model.b.w'"):
        rename_all(["model.a.w", "model.b.w"], load_user_map(y))


def test_user_yaml_map(tmp_path):
    y = tmp_path / "m.yaml"
    y.write_text('rename:\n  "model.": "transformer."\n  "model.layers.0.": "transformer.first."\n')
    m = load_user_map(y)
    assert m.apply("model.layers.0.w") == "transformer.first.w"  # longest prefix wins
    assert m.apply("model.norm.weight") == "transformer.norm.weight"
    assert m.apply("lm_head.weight") == "lm_head.weight"  # unmatched names stay
    assert resolve_map(["x"], "keep", y) is not None


@pytest.mark.parametrize("text", ["[1, 2]", "rename: 3", "rename: {'': x}", "{{{"])
def test_bad_user_map(tmp_path, text):
    y = tmp_path / "bad.yaml"
    y.write_text(text)
    with pytest.raises(StepquantError, match="bad.yaml"):
        load_user_map(y)


def test_detect(demo_ckpt, ref):
    with open_checkpoint(demo_ckpt) as c:
        assert detect_naming(c.tensors) == "step-hub"
    assert detect_naming(["model.language_model.layers.0.w", "model.vision_model.x", "lm_head.weight"]) == "modelopt"
    assert detect_naming(["language_model.model.layers.0.w", "language_model.lm_head.weight"]) == "sglang"
    assert detect_naming(["transformer.h.0.w"]) is None
    with pytest.raises(StepquantError, match="cannot tell which naming"):
        resolve_map(["transformer.h.0.w"], "modelopt")
