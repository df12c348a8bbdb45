"""Synthetic Step-3.7-shaped checkpoints (text stack, Step hub layout, BF16) for benchmarks and tests.

Full width by default: hidden 4096, 288 experts x 1280 (stacked `[E, out, in]`), shared expert 1280,
64-head full-attention layers every 4th layer and 96-head sliding layers, 8 KV groups of 128. Weights
are heavy-tailed (a Gaussian with a log-normal scale per value, std ~0.02, rare outliers ~1), written in
constant memory: every tensor's bytes are windows of one random pool chosen by the tensor's name, so
generating many GB costs about a copy. `layers` sets the depth; `experts`/`hidden`/... shrink it for tests.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .shards import OutputDir, OutTensor

POOL_BYTES = 64 << 20
CHUNK = 16 << 20


@dataclass(frozen=True)
class StepShape:
    layers: int = 1
    dense_layers: int = 0  # the first layers have a dense MLP instead of experts (the real model: 3)
    hidden: int = 4096
    experts: int = 288
    topk: int = 8
    moe_inter: int = 1280
    dense_inter: int = 11264
    heads_full: int = 64
    heads_sliding: int = 96
    kv_heads: int = 8
    head_dim: int = 128
    vocab: int = 128896
    seed: int = 0


def tensor_shapes(s: StepShape) -> dict[str, tuple[int, ...]]:
    """Hub names and shapes of the text stack, layer by layer (the real model's names)."""
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (s.vocab, s.hidden)}
    for i in range(s.layers):
        p = f"model.layers.{i}."
        heads = s.heads_full if i % 4 == 0 else s.heads_sliding
        q = heads * s.head_dim
        kv = s.kv_heads * s.head_dim
        out |= {
            p + "input_layernorm.weight": (s.hidden,),
            p + "self_attn.q_proj.weight": (q, s.hidden),
            p + "self_attn.k_proj.weight": (kv, s.hidden),
            p + "self_attn.v_proj.weight": (kv, s.hidden),
            p + "self_attn.o_proj.weight": (s.hidden, q),
            p + "self_attn.g_proj.weight": (heads, s.hidden),
            p + "self_attn.q_norm.weight": (s.head_dim,),
            p + "self_attn.k_norm.weight": (s.head_dim,),
            p + "post_attention_layernorm.weight": (s.hidden,),
        }
        if i < s.dense_layers:
            for proj, shape in (("gate_proj", (s.dense_inter, s.hidden)), ("up_proj", (s.dense_inter, s.hidden)),
                                ("down_proj", (s.hidden, s.dense_inter))):  # fmt: skip
                out[p + f"mlp.{proj}.weight"] = shape
            continue
        out |= {
            p + "moe.gate.weight": (s.experts, s.hidden),
            p + "moe.router_bias": (s.experts,),
            p + "moe.gate_proj.weight": (s.experts, s.moe_inter, s.hidden),
            p + "moe.up_proj.weight": (s.experts, s.moe_inter, s.hidden),
            p + "moe.down_proj.weight": (s.experts, s.hidden, s.moe_inter),
            p + "share_expert.gate_proj.weight": (s.moe_inter, s.hidden),
            p + "share_expert.up_proj.weight": (s.moe_inter, s.hidden),
            p + "share_expert.down_proj.weight": (s.hidden, s.moe_inter),
        }
    out |= {"model.norm.weight": (s.hidden,), "lm_head.weight": (s.vocab, s.hidden)}
    return out


def config(s: StepShape) -> dict:
    """A `step3p7` config.json for the shape. The checkpoint has no vision weights; the config declares
    a minimal vision tower so that loading it for calibration stays cheap."""
    from transformers import Step3p7Config

    n = s.layers
    text = dict(
        vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.dense_inter, num_hidden_layers=n,
        num_attention_heads=s.heads_full, num_sliding_attention_heads=s.heads_sliding,
        num_key_value_heads=s.kv_heads, head_dim=s.head_dim, sliding_window=512, n_routed_experts=s.experts,
        num_experts_per_tok=s.topk, moe_intermediate_size=s.moe_inter, share_expert_dim=s.moe_inter,
        moe_router_scaling_factor=3.0, num_nextn_predict_layers=0,
        layer_types=["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(n)],
        mlp_layer_types=["dense" if i < s.dense_layers else "sparse" for i in range(n)],
        swiglu_limits=[0.0] * n, swiglu_limits_shared=[0.0] * n,
    )  # fmt: skip
    vision = dict(width=64, layers=1, heads=2, image_size=56, patch_size=14, mlp_ratio=2.0)
    cfg = Step3p7Config(text_config=text, vision_config=vision)
    cfg.architectures = ["Step3p7ForConditionalGeneration"]
    return cfg.to_dict()


def _pool(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    n = POOL_BYTES // 2
    w = torch.randn(n, generator=g) * torch.exp(0.6 * torch.randn(n, generator=g)) * 0.017
    return w.to(torch.bfloat16).view(torch.uint8).numpy().tobytes()


def _chunks(pool: bytes, name: str, nbytes: int, norm: bool):
    if norm:  # norms and biases: ones plus noise, small
        g = torch.Generator().manual_seed(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
        yield (1 + 0.05 * torch.randn(nbytes // 2, generator=g)).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()
        return
    h = int(hashlib.sha256(name.encode()).hexdigest()[:12], 16)
    for pos in range(0, nbytes, CHUNK):
        n = min(CHUNK, nbytes - pos)
        start = (h + pos * 7919) % (len(pool) - n) & ~1  # bf16-aligned windows
        yield pool[start : start + n]


def generate(dst: str | Path, shape: StepShape = StepShape(), max_shard_size: int = 5 * 10**9) -> Path:
    """Write the synthetic checkpoint to `dst` (atomic: DST.partial, then renamed); returns `dst`."""
    pool = _pool(shape.seed)
    tensors = []
    for name, shp in tensor_shapes(shape).items():
        nbytes = 2 * int(torch.Size(shp).numel())
        norm = len(shp) == 1
        tensors.append(OutTensor(name, "BF16", shp, nbytes, lambda n=name, b=nbytes, z=norm: _chunks(pool, n, b, z)))
    fingerprint = hashlib.sha256(json.dumps(asdict(shape), sort_keys=True).encode()).hexdigest()
    with OutputDir(dst, fingerprint, overwrite=True) as out:
        out.write_shards(tensors, max_shard_size, desc="synthetic")
        out.write_file("config.json", (json.dumps(config(shape), indent=2) + "\n").encode())
        out.write_file("synthetic.json", (json.dumps(asdict(shape), indent=2) + "\n").encode())
        return out.commit()
