"""`inspect`: what a checkpoint is — family, naming, layers, MoE layout, dtypes, size, quantization."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from .checkpoint import open_checkpoint
from .families import config_num_experts, detect_family, detect_moe_layout
from .naming import detect_naming

LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def inspect_checkpoint(src: str | Path, revision: str | None = None, allow_pickle: bool = False) -> dict:
    """A JSON-ready summary of the checkpoint at `src` (folder or Hub repo id)."""
    with open_checkpoint(src, revision, allow_pickle) as ckpt:
        family = detect_family(ckpt.config)
        text = ckpt.text_config
        layout, experts_in_names = detect_moe_layout(ckpt.tensors.values())
        dtypes: dict[str, dict[str, int]] = {}
        for t in ckpt.tensors.values():
            d = dtypes.setdefault(t.dtype, {"tensors": 0, "bytes": 0})
            d["tensors"] += 1
            d["bytes"] += t.nbytes
        layer_ids = Counter(int(m.group(1)) for n in ckpt.tensors if (m := LAYER_INDEX.search(n)))
        num_layers = text.get("num_hidden_layers")
        mtp = text.get(family.mtp_layers_key) if family and family.mtp_layers_key else None
        quant = ckpt.quantization()
        return {
            "source": ckpt.source,
            "path": str(ckpt.root),
            "revision": ckpt.revision,
            "family": family.name if family else None,
            "architectures": ckpt.config.get("architectures"),
            "model_type": ckpt.config.get("model_type"),
            "naming": detect_naming(ckpt.tensors),
            "num_layers": num_layers,
            "mtp_layers": mtp or 0,
            "layers_in_weights": (max(layer_ids) + 1) if layer_ids else 0,
            "moe_layout": layout,
            "num_experts": experts_in_names or config_num_experts(family, text),
            "dtypes": dict(sorted(dtypes.items())),
            "total_bytes": ckpt.total_bytes,
            "tensors": len(ckpt.tensors),
            "shards": [p.name for p in ckpt.shards],
            **quant,
            "sidecars": ckpt.sidecars,
        }


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def format_report(r: dict) -> str:
    """The human-readable form of `inspect_checkpoint`'s summary."""
    excl = r["exclude_modules"]
    lines = [
        f"checkpoint   {r['path']}" + (f" @ {r['revision']}" if r["revision"] else ""),
        f"family       {r['family'] or 'unknown'} ({', '.join(r['architectures'] or []) or r['model_type'] or '-'})",
        f"naming       {r['naming'] or 'unknown'}",
        f"layers       {r['num_layers']} (+{r['mtp_layers']} MTP); weights hold {r['layers_in_weights']}",
        f"MoE          {r['moe_layout']}" + (f", {r['num_experts']} experts" if r["num_experts"] else ""),
        f"size         {_human(r['total_bytes'])} in {r['tensors']} tensors, {len(r['shards'])} shard(s)",
        "dtypes       " + ", ".join(f"{k} {v['tensors']} ({_human(v['bytes'])})" for k, v in r["dtypes"].items()),
        f"quantization {r['quant_algo'] or 'none'}"
        + (f", group {r['group_size']}" if r["group_size"] else "")
        + (f", KV cache {r['kv_cache_quant_algo']}" if r["kv_cache_quant_algo"] else ""),
    ]
    if excl:
        lines.append(f"excluded     {len(excl)} pattern(s): {', '.join(excl[:6])}{' ...' if len(excl) > 6 else ''}")
    lines.append(f"sidecars     {', '.join(r['sidecars']) or '-'}")
    return "\n".join(lines)
