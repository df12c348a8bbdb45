"""Fidelity of the quantized model against its reference on a text corpus (SPEC §10's fidelity scale):
mean KL divergence of the next-token distributions (reference || quantized, every position, as
llama.cpp's KLD), the share of positions whose top-1 token agrees ("same top p"), perplexity of both,
and the SQNR of every decoder layer's output.

The default corpus is calibration-free: docstrings of Python standard-library modules, which the
calibration corpus (calibration/*.txt and pydoc topics) does not contain.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from pathlib import Path

import torch

from .qmodel import QuantizedModel

EVAL_MODULES = (
    "argparse", "asyncio", "calendar", "collections", "concurrent.futures", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email.message", "fractions", "functools", "heapq", "http.client", "ipaddress",
    "itertools", "json", "logging", "pathlib", "pickle", "re", "shutil", "sqlite3", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing", "unittest", "urllib.parse",
    "uuid", "zipfile",
)  # fmt: skip


def eval_text() -> str:
    """The embedded evaluation text: module and public-member docstrings of EVAL_MODULES, in order."""
    parts = []
    for name in EVAL_MODULES:
        mod = importlib.import_module(name)
        parts.append(inspect.getdoc(mod) or "")
        for attr in sorted(getattr(mod, "__all__", None) or [a for a in dir(mod) if not a.startswith("_")]):
            doc = inspect.getdoc(getattr(mod, attr, None))
            if doc and len(doc) > 200 and getattr(getattr(mod, attr), "__module__", name) == name:
                parts.append(doc)
    return "\n\n".join(p for p in parts if p)


def eval_batches(spec: str | None, root: Path, samples: int, seq_len: int) -> tuple[list[torch.Tensor], str]:
    """Token batches of the corpus: `None`/`embedded` (the text above), or any calibration data spec."""
    from .calibrate import load_batches, token_batches

    if spec in (None, "embedded"):
        paragraphs = [p for p in eval_text().split("\n\n") if p.strip()]
        return token_batches(paragraphs, root, samples, seq_len, "embedded stdlib docstrings")
    return load_batches(spec, root, samples, seq_len)


def _decoder_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if re.search(r"(^|\.)layers\.\d+$", n) and "vision" not in n}


@torch.no_grad()
def measure(qm: QuantizedModel, batches: list[torch.Tensor], mode: str, device: str) -> dict:
    """KL, top-1 agreement, perplexities, per-layer SQNR and the per-position KL values."""
    model = qm.model
    layers = _decoder_layers(model)
    captured: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: captured.__setitem__(n, (out[0] if isinstance(out, tuple) else out).float()))
             for n, m in layers.items()]  # fmt: skip
    kl_values, top1, nll_r, nll_q, n = [], 0, 0.0, 0.0, 0
    signal = dict.fromkeys(layers, 0.0)
    noise = dict.fromkeys(layers, 0.0)
    try:
        for ids in batches:
            ids = ids.to(device)
            ref = model(input_ids=ids).logits.float()[:, :-1]
            ref_layers = dict(captured)
            with qm.quantized(mode):
                q = model(input_ids=ids).logits.float()[:, :-1]
            for name in layers:
                signal[name] += float(ref_layers[name].pow(2).sum())
                noise[name] += float((captured[name] - ref_layers[name]).pow(2).sum())
            lr, lq = torch.log_softmax(ref, -1), torch.log_softmax(q, -1)
            kl_values.append((lr.exp() * (lr - lq)).sum(-1).flatten().cpu())
            top1 += int((ref.argmax(-1) == q.argmax(-1)).sum())
            tgt = ids[:, 1:, None]
            nll_r -= float(lr.gather(-1, tgt).sum())
            nll_q -= float(lq.gather(-1, tgt).sum())
            n += tgt.numel()
    finally:
        for h in hooks:
            h.remove()
    kl = torch.cat(kl_values)
    return {
        "tokens": n,
        "kl": float(kl.mean()),
        "top1": top1 / n,
        "ppl": {"ref": math.exp(nll_r / n), "quant": math.exp(nll_q / n)},
        "sqnr_db": {name: (10 * math.log10(signal[name] / noise[name]) if noise[name] > 0 else math.inf) for name in layers},
        "kl_values": kl.tolist(),
    }
