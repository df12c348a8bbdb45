"""ModelOpt run live on other model shapes (a Llama and a Mixtral), compared as in the reference test."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stepquant.convert import ConvertOptions, convert

from .test_conformance import compare_with_modelopt

pytest.importorskip("modelopt")

MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(hidden_size=256, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                vocab_size=1000, max_position_embeddings=256)),
}  # fmt: skip


def _build(kind: str, root: Path) -> tuple[Path, Path]:
    import transformers

    cfg_cls, model_cls, kw = MODELS[kind]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kw)).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.05)
    src = root / f"{kind}-bf16"
    model.save_pretrained(src)
    gen = torch.Generator().manual_seed(1)
    tokens = root / "calib_tokens.json"
    tokens.write_text(json.dumps({"batches": [torch.randint(0, 1000, (2, 32), generator=gen).tolist() for _ in range(4)]}))
    return src, tokens


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_against_live_modelopt(tmp_path, kind, fmt):
    src, tokens = _build(kind, tmp_path)
    oracle = tmp_path / "modelopt"
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("modelopt_oracle.py")), str(src), str(oracle),
                           fmt, str(tokens)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    layout = "per-expert" if kind == "mixtral" else "keep"
    ours = convert(src, tmp_path / "ours", ConvertOptions(to=fmt, scope="all-linear", kv_cache="fp8", moe_layout=layout,
                                                          calib_data=str(tokens)))  # fmt: skip
    compare_with_modelopt(ours, oracle)
