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

from .layerwise import LayerLoader, _decoder, _release, layer_inputs, layer_output
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


class _Tally:
    """Running sums of the fidelity metrics over batches."""

    def __init__(self, layers) -> None:
        self.kl_values: list[torch.Tensor] = []
        self.top1, self.nll_r, self.nll_q, self.n = 0, 0.0, 0.0, 0
        self.signal = dict.fromkeys(layers, 0.0)
        self.noise = dict.fromkeys(layers, 0.0)

    def layer(self, name: str, ref: torch.Tensor, quant: torch.Tensor) -> None:
        self.signal[name] += float(ref.pow(2).sum())
        self.noise[name] += float((quant - ref).pow(2).sum())

    def logits(self, ref: torch.Tensor, q: torch.Tensor, ids: torch.Tensor) -> None:
        """`ref`/`q`: fp32 logits of every position but the last."""
        lr, lq = torch.log_softmax(ref, -1), torch.log_softmax(q, -1)
        self.kl_values.append((lr.exp() * (lr - lq)).sum(-1).flatten().cpu())
        self.top1 += int((ref.argmax(-1) == q.argmax(-1)).sum())
        tgt = ids[:, 1:, None]
        self.nll_r -= float(lr.gather(-1, tgt).sum())
        self.nll_q -= float(lq.gather(-1, tgt).sum())
        self.n += tgt.numel()

    def result(self) -> dict:
        kl, n = torch.cat(self.kl_values), self.n
        return {
            "tokens": n,
            "kl": float(kl.mean()),
            "top1": self.top1 / n,
            "ppl": {"ref": math.exp(self.nll_r / n), "quant": math.exp(self.nll_q / n)},
            "sqnr_db": {name: (10 * math.log10(self.signal[name] / self.noise[name]) if self.noise[name] > 0 else math.inf)
                        for name in self.signal},  # fmt: skip
            "kl_values": kl.tolist(),
        }


def _out(out) -> torch.Tensor:
    return layer_output(out).float()


@torch.no_grad()
def measure(qm: QuantizedModel, batches: list[torch.Tensor], mode: str, device: str) -> dict:
    """KL, top-1 agreement, perplexities, per-layer SQNR and the per-position KL values."""
    model = qm.model
    layers = _decoder_layers(model)
    captured: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: captured.__setitem__(n, _out(out))) for n, m in layers.items()]
    tally = _Tally(layers)
    try:
        for ids in batches:
            ids = ids.to(device)
            ref = model(input_ids=ids).logits.float()[:, :-1]
            ref_layers = dict(captured)
            with qm.quantized(mode):
                q = model(input_ids=ids).logits.float()[:, :-1]
            for name in layers:
                tally.layer(name, ref_layers[name], captured[name])
            tally.logits(ref, q, ids)
    finally:
        for h in hooks:
            h.remove()
    return tally.result()


@torch.no_grad()
def measure_layers(qm: QuantizedModel, reader, batches: list[torch.Tensor], mode: str, device: str) -> dict:
    """`measure`, one decoder layer in memory at a time (models that do not fit): `qm.model` is built on
    the meta device; each layer gets the reference's weights from `reader` (an Executor over the source)
    and the checkpoint's quantized weights, and both the reference's and the quantized hidden states go
    through it. The same numbers as `measure`."""
    model, dev = qm.model, torch.device(device)
    dec, _, layers = _decoder(model)
    loader = LayerLoader(model, reader, dev, next(model.parameters()).dtype)
    names = {m: n for n, m in _decoder_layers(model).items()}
    calls, h_ref = layer_inputs(model, loader, batches, dev)
    h_q = [h.clone() for h in h_ref]
    tally = _Tally(names.values())

    def with_units(module: torch.nn.Module) -> None:
        qm.linears, qm.experts, _ = qm.attacher.units(module.named_modules(prefix=loader.names[module]))

    for i, layer in enumerate(layers):
        loader.load(layer)
        with_units(layer)
        for b, ids in enumerate(batches):
            args, kwargs = calls[tuple(ids.shape)][i]
            ref = layer(h_ref[b], *args, **kwargs)
            with qm.quantized(mode):
                q = layer(h_q[b], *args, **kwargs)
            h_ref[b], h_q[b] = layer_output(ref), layer_output(q)
            tally.layer(names[layer], _out(ref), _out(q))
        qm.linears, qm.experts = {}, {}
        _release(layer)
    head = model.get_output_embeddings()
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False):  # lm_head is the embedding
        loader.load(dec.embed_tokens)
        head.weight = dec.embed_tokens.weight
    else:
        loader.load(head)
    loader.load(dec.norm)
    with_units(head)
    for b, ids in enumerate(batches):
        ref = head(dec.norm(h_ref[b])).float()[:, :-1]
        with qm.quantized(mode):
            q = head(dec.norm(h_q[b])).float()[:, :-1]
        tally.logits(ref, q, ids.to(dev))
    qm.linears, qm.experts = {}, {}
    for m in (dec.norm, head, dec.embed_tokens):
        _release(m)
    return tally.result()
