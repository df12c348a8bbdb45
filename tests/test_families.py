import pytest

from stepquant.families import FAMILIES, config_num_experts, detect_family, detect_moe_layout
from stepquant.stfile import TensorInfo


@pytest.mark.parametrize(
    "config, name",
    [
        ({"architectures": ["Step3p7ForConditionalGeneration"], "model_type": "step3p7"}, "step3p7"),
        ({"model_type": "step3p5"}, "step3p5"),
        ({"architectures": ["Qwen3MoeForCausalLM"]}, "qwen3_moe"),
        ({"architectures": ["MixtralForCausalLM"]}, "mixtral"),
        ({"architectures": ["DeepseekV3ForCausalLM"]}, "deepseek_v3"),
        ({"architectures": ["LlamaForCausalLM"]}, "llama"),
        ({"architectures": ["GPT2LMHeadModel"]}, None),
        ({}, None),
    ],
)
def test_detect_family(config, name):
    fam = detect_family(config)
    assert (fam.name if fam else None) == name


def _t(name, shape):
    return TensorInfo(name, None, "BF16", shape, 0, 0)


def test_layouts():
    stacked = [_t("model.layers.3.moe.gate_proj.weight", (288, 1280, 4096)), _t("model.layers.3.moe.gate.weight", (288, 4096))]
    per = [_t(f"model.layers.0.mlp.experts.{e}.up_proj.weight", (8, 16)) for e in range(8)]
    mixtral = [_t(f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight", (8, 16)) for e in range(4)]
    fused = [_t("model.layers.0.mlp.experts.gate_up_proj", (16, 256, 128)), _t("model.layers.0.mlp.experts.down_proj", (16, 128, 128))]
    assert detect_moe_layout(stacked) == ("stacked", 288)
    assert detect_moe_layout(per) == ("per-expert", 8)
    assert detect_moe_layout(mixtral) == ("per-expert", 4)
    assert detect_moe_layout(fused) == ("fused", 16)
    assert detect_moe_layout(stacked + per) == ("mixed", 288)
    assert detect_moe_layout([_t("model.layers.0.mlp.up_proj.weight", (8, 16))]) == ("none", 0)
    # a 2-D moe.*_proj is a Linear, not stacked experts
    assert detect_moe_layout([_t("model.layers.0.moe.up_proj.weight", (8, 16))]) == ("none", 0)


def test_config_num_experts():
    assert config_num_experts(FAMILIES["step3p7"], {"n_routed_experts": 288}) == 288
    assert config_num_experts(FAMILIES["qwen3_moe"], {"num_experts": 128}) == 128
    assert config_num_experts(FAMILIES["llama"], {}) is None
