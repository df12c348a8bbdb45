"""Model families: a small registry of descriptors picked from `config.json`, and MoE layout detection.

A descriptor says what a family's checkpoints look like (architectures, model types, where the expert
count lives in the config). Later work hangs fusion groups and scopes on the same entries.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from .stfile import TensorInfo


# Routed-expert tensor names per MoE layout: {L} layer prefix, {e} expert, {p} projection.
STEP_EXPERTS = {
    "stacked": "{L}.moe.{p}",
    "per-expert": "{L}.moe.experts.{e}.{p}",
    "fused": "{L}.mlp.experts.{p}",
}
HF_EXPERTS = {
    "stacked": "{L}.mlp.experts.{p}",
    "per-expert": "{L}.mlp.experts.{e}.{p}",
    "fused": "{L}.mlp.experts.{p}",
}
MIXTRAL_EXPERTS = {
    "stacked": "{L}.block_sparse_moe.experts.{p}",
    "per-expert": "{L}.block_sparse_moe.experts.{e}.{p}",
    "fused": "{L}.mlp.experts.{p}",
}
GATE_UP_DOWN = ("gate_proj", "up_proj", "down_proj")

# transformers' in-memory module names -> this project's canonical (hub) module names, per family.
STEP_MEMORY_NAMES = (
    (r"^model\.language_model\.layers\.(\d+)\.mlp\.shared_experts\.", r"model.layers.\1.share_expert."),
    (r"^model\.language_model\.layers\.(\d+)\.mlp\.experts$", r"model.layers.\1.moe"),
    (r"^model\.language_model\.", "model."),
    (r"^model\.multi_modal_projector$", "vit_large_projector"),
    (r"^model\.vision_model\.", "vision_model."),
)
MIXTRAL_MEMORY_NAMES = ((r"^model\.layers\.(\d+)\.mlp\.experts$", r"model.layers.\1.block_sparse_moe.experts"),)


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    multimodal: bool = False
    num_experts_keys: tuple[str, ...] = ()
    num_layers_key: str = "num_hidden_layers"
    mtp_layers_key: str | None = None
    experts: dict = field(default_factory=lambda: HF_EXPERTS)
    projections: tuple[str, str, str] = GATE_UP_DOWN  # names of gate, up, down in per-expert/stacked layouts
    memory_names: tuple[tuple[str, str], ...] = ()


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "step3p7",
            ("Step3p7ForConditionalGeneration",),
            ("step3p7",),
            multimodal=True,
            num_experts_keys=("n_routed_experts", "moe_num_experts"),
            mtp_layers_key="num_nextn_predict_layers",
            experts=STEP_EXPERTS,
            memory_names=STEP_MEMORY_NAMES,
        ),
        Family(
            "step3p5",
            ("Step3p5ForCausalLM", "Step3p5ForConditionalGeneration"),
            ("step3p5",),
            num_experts_keys=("n_routed_experts", "moe_num_experts"),
            mtp_layers_key="num_nextn_predict_layers",
            experts=STEP_EXPERTS,
            memory_names=STEP_MEMORY_NAMES,
        ),
        Family("qwen3_moe", ("Qwen3MoeForCausalLM",), ("qwen3_moe",), num_experts_keys=("num_experts", "num_local_experts")),
        Family(
            "mixtral",
            ("MixtralForCausalLM",),
            ("mixtral",),
            num_experts_keys=("num_local_experts",),
            experts=MIXTRAL_EXPERTS,
            projections=("w1", "w3", "w2"),
            memory_names=MIXTRAL_MEMORY_NAMES,
        ),
        Family(
            "deepseek_v3",
            ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM"),
            ("deepseek_v3", "deepseek_v2"),
            num_experts_keys=("n_routed_experts",),
            mtp_layers_key="num_nextn_predict_layers",
        ),
        Family("llama", ("LlamaForCausalLM",), ("llama",)),
    )
}


GENERIC = Family("generic", (), ())


def detect_family(config: dict) -> Family | None:
    """The descriptor whose architectures (first) or model type matches the config, else None."""
    archs = config.get("architectures") or []
    for fam in FAMILIES.values():
        if any(a in fam.architectures for a in archs):
            return fam
    model_type = config.get("model_type")
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    return None


# MoE expert tensors in each layout, matched against weight names (any naming prefix).
LAYOUT_PATTERNS: dict[str, re.Pattern[str]] = {
    # Step hub: moe.{gate,up,down}_proj.weight with a leading expert dim
    "stacked": re.compile(r"\.moe\.(?:gate|up|down)_proj\.weight$"),
    # transformers 5 in-memory: experts.gate_up_proj [E, 2I, H] + experts.down_proj [E, H, I]
    "fused": re.compile(r"\.experts\.gate_up_proj(?:\.weight)?$"),
    # experts.{e}.{gate,up,down}_proj / Mixtral w1,w2,w3 / Step legacy moe.{e}.*
    "per-expert": re.compile(r"\.(?:experts|moe)\.(\d+)\.\w+\.weight$"),
}


def detect_moe_layout(tensors: Iterable[TensorInfo]) -> tuple[str, int]:
    """(`stacked` | `per-expert` | `fused` | `mixed` | `none`, number of experts seen in the names)."""
    found: dict[str, int] = {}
    for t in tensors:
        for layout, pat in LAYOUT_PATTERNS.items():
            m = pat.search(t.name)
            if not m:
                continue
            if layout == "per-expert":
                count = int(m.group(1)) + 1
            elif len(t.shape) == 3:
                count = t.shape[0]
            else:
                continue  # a 2-D moe.*_proj would be a plain Linear, not stacked experts
            found[layout] = max(found.get(layout, 0), count)
    if not found:
        return "none", 0
    if len(found) > 1:
        return "mixed", max(found.values())
    (layout, count), = found.items()
    return layout, count


def config_num_experts(family: Family | None, text_config: dict) -> int | None:
    """The expert count the config declares, when the family says where to look."""
    keys = family.num_experts_keys if family else ("num_experts", "num_local_experts", "n_routed_experts")
    for key in keys:
        value = text_config.get(key)
        if isinstance(value, int):
            return value
    return None
