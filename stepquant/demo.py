"""The embedded demo: a tiny Step-3.7 checkpoint built with transformers' own model, and a tour of it.

`build_demo_checkpoint` is deterministic (fixed seed, fixed tokenizer corpus): the same bytes on every
machine with the same torch/transformers. `run_demo` runs what stepquant can do on it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from .check import check_checkpoint
from .checkpoint import open_checkpoint, tensor_differences
from .convert import ConvertOptions, convert
from .errors import StepquantError
from .inspect import format_report, inspect_checkpoint

SEED = 0
VOCAB = 512
SPECIAL_TOKENS = ["<unk>", "<pad>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>", "<im_patch>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Four decoder layers (dense, then MoE; full and sliding attention with different head counts; SwiGLU
# clamp on the last) plus one MTP layer, 8 experts top-2, and a 2-layer vision tower. Every Linear
# input dim is a multiple of 16 so NVFP4 applies everywhere.
TEXT = dict(
    vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
    num_attention_heads=4, num_sliding_attention_heads=6, num_key_value_heads=2, head_dim=32,
    sliding_window=16, max_position_embeddings=512, n_routed_experts=8, num_experts_per_tok=2,
    moe_intermediate_size=64, share_expert_dim=64, moe_router_scaling_factor=3.0,
    pad_token_id=1, bos_token_id=2, eos_token_id=3,
)  # fmt: skip
LAYER_TYPES = ["full_attention", "sliding_attention", "sliding_attention", "full_attention", "full_attention"]
MLP_TYPES = ["dense", "sparse", "sparse", "sparse", "sparse"]
SWIGLU_LIMITS = [0.0, 0.0, 0.0, 7.0, 0.0]
SWIGLU_LIMITS_SHARED = [0.0, 0.0, 0.0, 16.0, 0.0]
VISION = dict(width=64, layers=2, heads=2, image_size=56, patch_size=14, mlp_ratio=4.0)


def _config(num_layers: int, mtp: int):
    from transformers import Step3p7Config

    n = num_layers + mtp
    text = dict(
        TEXT,
        num_hidden_layers=num_layers,
        num_nextn_predict_layers=mtp,
        layer_types=LAYER_TYPES[:n],
        mlp_layer_types=MLP_TYPES[:n],
        swiglu_limits=SWIGLU_LIMITS[:n],
        swiglu_limits_shared=SWIGLU_LIMITS_SHARED[:n],
    )
    config = Step3p7Config(text_config=text, vision_config=dict(VISION), image_token_id=6)
    config.architectures = ["Step3p7ForConditionalGeneration"]
    return config


def _tokenizer():
    """A byte-level BPE trained on CPython's pydoc topics (PSF licence), with a chat template."""
    import pydoc_data.topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


CARD = """---
license: apache-2.0
library_name: transformers
pipeline_tag: image-text-to-text
tags:
- step3p7
- random-weights
---

# stepquant demo: a tiny Step-3.7

Randomly initialised, 4 decoder layers + 1 MTP layer, with the architecture of StepFun's Step-3.7-Flash
(`Step3p7ForConditionalGeneration`, built by transformers). Written by `stepquant demo` to exercise the
tools; it is not a trained model.
"""


def build_demo_checkpoint(out: str | Path) -> Path:
    """Write the demo Step-3.7 checkpoint (Step hub layout, BF16, with tokenizer) to the folder `out`."""
    from safetensors.torch import load_file, save_file
    from transformers import Step3p7ForConditionalGeneration

    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(SEED)
    # Build with the MTP layer as a fifth decoder layer, so its attention and MoE weights come from
    # transformers in the hub layout; the config then declares 4 layers + 1 MTP layer.
    model = Step3p7ForConditionalGeneration(_config(5, 0)).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for _, p in sorted(model.state_dict().items()):
            if p.is_floating_point() and p.numel() > 1 and float(p.float().std()) == 0.0:
                p.add_((torch.randn(p.shape, generator=gen) * 0.05).to(p.dtype))  # norms, biases, gains
    model.save_pretrained(tmp)
    weights = load_file(tmp / "model.safetensors")
    h = TEXT["hidden_size"]
    mtp = f"model.layers.{TEXT['num_hidden_layers']}."
    extra = {
        "enorm.weight": torch.randn(h, generator=gen) * 0.05,
        "hnorm.weight": torch.randn(h, generator=gen) * 0.05,
        "eh_proj.weight": torch.randn(h, 2 * h, generator=gen) * 0.02,
        "transformer.shared_head.norm.weight": torch.randn(h, generator=gen) * 0.05,
        "transformer.shared_head.output.weight": torch.randn(VOCAB, h, generator=gen) * 0.02,
    }
    weights.update({mtp + k: v.to(torch.bfloat16) for k, v in extra.items()})
    save_file(dict(sorted(weights.items())), tmp / "model.safetensors", metadata={"format": "pt"})
    _config(4, 1).save_pretrained(tmp)
    _tokenizer().save_pretrained(tmp)
    (tmp / "README.md").write_text(CARD)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def run_demo(out: str | Path, echo=print) -> dict:
    """Build the demo checkpoint under `out/bf16`, then inspect, a naming round trip, the NVFP4 release
    recipe, check, and verify (both NVFP4 modes, CPU)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    src = build_demo_checkpoint(out / "bf16")
    echo(f"built {src} in {time.time() - t0:.1f}s\n")
    report = inspect_checkpoint(src)
    echo(format_report(report) + "\n")
    steps = {"modelopt": out / "bf16-modelopt", "step-hub": out / "bf16-roundtrip"}
    prev = src
    for naming, dst in steps.items():
        convert(prev, dst, ConvertOptions(naming=naming, overwrite=True))
        echo(f"renamed {prev.name} -> {dst.name} (--naming {naming}): naming is now "
             f"{inspect_checkpoint(dst)['naming']}")  # fmt: skip
        prev = dst
    with open_checkpoint(src) as a, open_checkpoint(steps["step-hub"]) as b:
        diffs = tensor_differences(a, b)
    if diffs:
        raise StepquantError(f"naming round trip changed tensors: {diffs[0]}")
    echo(f"round trip step-hub -> modelopt -> step-hub: {report['tensors']} tensors byte-identical\n")
    recipe = "step3p7-nvfp4-moe-only-kvfp8"
    nvfp4 = convert(src, out / "nvfp4", ConvertOptions(recipe=recipe, calib_samples=16, calib_seq_len=128, overwrite=True))
    echo(f"converted with --recipe {recipe} -> {nvfp4}")
    echo(format_report(inspect_checkpoint(nvfp4)) + "\n")
    checks = {}
    for engine in ("vllm", "sglang"):
        rep = check_checkpoint(nvfp4, (engine,), ref=src)
        checks[engine] = {"defects": rep.defects, "warnings": rep.warnings}
        echo(f"check --engine {engine} --ref bf16: {len(rep.defects)} defect(s), {len(rep.warnings)} warning(s)")
        for line in rep.defects + rep.warnings:
            echo(f"  {line}")
    from .verify import VerifyOptions, format_table, verify

    verified = {}
    for mode in ("w4a4", "w4a16"):
        report_dir = str(out / "report") if mode == "w4a4" else None  # what `push --report` puts into the card
        rep = verify(nvfp4, VerifyOptions(ref=str(src), mode=mode, eval_samples=4, eval_seq_len=64, report=report_dir),
                     echo=lambda _: None)  # fmt: skip
        verified[mode] = {k: rep[k] for k in ("kl", "top1", "ppl", "tokens")}
        echo(f"\nverify --ref bf16 --mode {mode}:\n{format_table(rep)}")
    summary = {"checkpoint": str(src), "inspect": report, "roundtrip_identical": True, "nvfp4": str(nvfp4),
               "check": checks, "verify": verified, "seconds": round(time.time() - t0, 2)}  # fmt: skip
    (out / "demo-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    echo(f"demo finished in {summary['seconds']}s; summary in {out / 'demo-summary.json'}")
    return summary
