"""`verify`: what a quantized checkpoint costs in accuracy, measured the way Blackwell runs it.

The reference (the source checkpoint) is loaded by transformers; the checkpoint under test runs inside
the same model with its quantized weights (`qmodel`): fidelity on a corpus (`fidelity`) and, with a GPQA
file, GPQA on the same permutations for both (`gpqa`). The report goes to `report.json` and `report.md`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import __version__, gpqa
from .checkpoint import open_checkpoint
from .errors import StepquantError
from .families import GENERIC, detect_family


@dataclass
class VerifyOptions:
    ref: str
    mode: str = "w4a4"  # NVFP4 execution: w4a4 (Blackwell) or w4a16 (Hopper engines)
    device: str = "cpu"
    kv_cache: str = "auto"  # auto: FP8 KV cache emulated where the checkpoint has k/v scales; none: BF16 cache
    compute_dtype: str = "bfloat16"  # of the reference model; quantized Linears take BF16 inputs either way
    layerwise: bool = False  # fidelity with one decoder layer in memory at a time (models that do not fit)
    eval_data: str | None = None  # None: the embedded calibration-free text
    eval_samples: int = 8
    eval_seq_len: int = 256
    gpqa: str | None = None
    repeats: int = 8
    gpqa_mode: str = "generate"  # simple-evals generation, or "loglik" (lm-eval's zeroshot variant)
    gpqa_limit: int | None = None
    max_new_tokens: int = 2048
    temperature: float = 0.0
    top_p: float = 1.0
    batch: int = 8
    min_recovery: float = 0.99
    report: str | None = None
    trust_remote_code: bool = False
    endpoint: str | None = None  # GPQA of the quantized model served at this OpenAI-compatible API base
    model: str | None = None  # its name on that server
    ref_endpoint: str | None = None  # the reference served too; otherwise it runs here from `ref`
    ref_model: str | None = None
    concurrency: int = 8
    gpqa_cache: str | None = None  # endpoint answers, for resuming; default REPORT/gpqa-answers.jsonl


def verify(dst: str | Path, opts: VerifyOptions, echo=print) -> dict:
    """Measure `dst` against `opts.ref`; returns the report (with `verdict`: pass, fail or none)."""
    if opts.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise StepquantError("--device cuda: no CUDA device is visible to torch")
    started = time.time()
    report = _verify_endpoint(dst, opts, echo) if opts.endpoint else _verify_here(dst, opts, echo)
    acc = report["gpqa"]["accuracy"] if "gpqa" in report else None
    report["verdict"] = "none" if acc is None else "pass" if acc["quant"] >= opts.min_recovery * acc["ref"] else "fail"
    report["min_recovery"] = opts.min_recovery
    report["options"] = {k: v for k, v in asdict(opts).items() if k != "report"}
    report["seconds"] = round(time.time() - started, 2)
    if opts.report:
        write_report(report, Path(opts.report))
    return report


def _verify_here(dst, opts: VerifyOptions, echo) -> dict:
    """The checkpoint's quantized weights inside the reference model on this machine: fidelity, and
    GPQA when asked."""
    from .calibrate import load_model
    from .fidelity import eval_batches, measure, measure_layers
    from .qmodel import attach

    if opts.layerwise and opts.gpqa:
        raise StepquantError("--layerwise measures fidelity only: GPQA generation needs the whole model (or --endpoint)")
    with open_checkpoint(dst) as ckpt, open_checkpoint(opts.ref) as ref:
        family = detect_family(ref.config) or GENERIC
        if opts.layerwise:
            from .check import _lint_plan
            from .layerwise import build_meta_model
            from .quantize import Executor

            model = build_meta_model(ref.root, ref.config, opts.compute_dtype, opts.trust_remote_code)
            reader = Executor(ref, _lint_plan(ref)[0], None, "shared")
        else:
            model = load_model(ref.root, ref.config, opts.device, opts.trust_remote_code, opts.compute_dtype)
        qm = attach(model, ckpt, ref, family.memory_names, opts.device, weights=not opts.layerwise)
        if opts.kv_cache == "none":
            qm.kv = {}
        kv = f"FP8 KV cache in {len(qm.kv)} layer(s)" if qm.kv else "BF16 KV cache"
        echo(f"{ckpt.root.name}: {qm.units} quantized module(s) run as {opts.mode} on {opts.device}, {kv}")
        batches, corpus = eval_batches(opts.eval_data, ref.root, opts.eval_samples, opts.eval_seq_len)
        if opts.layerwise:
            fid = measure_layers(qm, reader, batches, opts.mode, opts.device)
        else:
            fid = measure(qm, batches, opts.mode, opts.device)
        report = {
            "producer": {"name": "stepquant", "version": __version__},
            "checkpoint": str(ckpt.root), "reference": str(ref.root), "mode": opts.mode, "device": opts.device,
            "loading": "layerwise" if opts.layerwise else "whole model",
            "kv_cache": {"dtype": "fp8" if qm.kv else "bf16", "layers": len(qm.kv)},
            "corpus": corpus, "tokens": fid["tokens"], "kl": fid["kl"], "top1": fid["top1"], "ppl": fid["ppl"],
            "sqnr_db": fid["sqnr_db"], "kl_quantiles": _quantiles(fid["kl_values"]),
            "kl_histogram": _kl_histogram(fid["kl_values"]),
        }  # fmt: skip
        echo(f"KL {fid['kl']:.5f}, top-1 {100 * fid['top1']:.2f}%, PPL {fid['ppl']['ref']:.3f} -> {fid['ppl']['quant']:.3f}"
             f" over {fid['tokens']} tokens")  # fmt: skip
        if opts.gpqa:
            exs = _gpqa_examples(opts, echo, "reference then quantized")
            answer, make_prompt = _local_answerer(qm.model, ref.root, opts)
            ref_scores = gpqa.score(exs, gpqa.run(exs, answer, opts.batch, make_prompt=make_prompt))
            with qm.quantized(opts.mode):
                q_scores = gpqa.score(exs, gpqa.run(exs, answer, opts.batch, make_prompt=make_prompt))
            report["gpqa"] = _gpqa_result(exs, ref_scores, q_scores, echo)
    return report


def _verify_endpoint(dst, opts: VerifyOptions, echo) -> dict:
    """GPQA only (a chat endpoint gives no logits): the served quantized model against the reference,
    served too or run here; paired on the same permutations."""
    from .endpoint import Endpoint, answerer

    if not opts.gpqa:
        raise StepquantError("--endpoint measures GPQA only: give --gpqa (a chat endpoint has no logits for KL or perplexity)")
    if opts.gpqa_mode != "generate":
        raise StepquantError("--endpoint runs --gpqa-mode generate only (a chat endpoint gives no log-likelihoods)")
    if not opts.model:
        raise StepquantError("--endpoint needs --model, the name the server gives the checkpoint")
    cache = Path(opts.gpqa_cache) if opts.gpqa_cache else (Path(opts.report) / "gpqa-answers.jsonl" if opts.report else None)
    exs = _gpqa_examples(opts, echo, f"through {opts.endpoint} ({opts.model})" + (f"; answers kept in {cache}" if cache else ""))
    sampling = dict(max_tokens=opts.max_new_tokens, temperature=opts.temperature, top_p=opts.top_p, concurrency=opts.concurrency)
    q_scores = gpqa.score(exs, gpqa.run(exs, answerer(Endpoint(opts.endpoint, opts.model, **sampling), cache), len(exs)))
    if opts.ref_endpoint:
        ref_ep = Endpoint(opts.ref_endpoint, opts.ref_model or opts.model, **sampling)
        ref_scores = gpqa.score(exs, gpqa.run(exs, answerer(ref_ep, cache), len(exs)))
        reference = f"{ref_ep.url} ({ref_ep.model})"
    else:
        from .calibrate import load_model

        with open_checkpoint(opts.ref) as ref:
            model = load_model(ref.root, ref.config, opts.device, opts.trust_remote_code)
            answer, _ = _local_answerer(model, ref.root, opts)
            ref_scores = gpqa.score(exs, gpqa.run(exs, answer, opts.batch))
            reference = str(ref.root)
    return {
        "producer": {"name": "stepquant", "version": __version__}, "checkpoint": str(dst), "reference": reference,
        "mode": "endpoint", "device": opts.endpoint, "corpus": None, "tokens": 0, "kl": None, "top1": None, "ppl": None,
        "sqnr_db": {}, "gpqa": _gpqa_result(exs, ref_scores, q_scores, echo),
    }  # fmt: skip


def _gpqa_examples(opts: VerifyOptions, echo, how: str) -> list:
    rows = gpqa.load_rows(opts.gpqa)[: opts.gpqa_limit or None]
    echo(f"GPQA: {len(rows)} questions x {opts.repeats} repeats, {how}")
    return gpqa.examples(rows, opts.repeats)


def _local_answerer(model, root: Path, opts: VerifyOptions):
    """(prompts -> responses from `model` here with the reference's tokenizer, the prompt maker) for
    the GPQA mode: generation with the chat template, or lm-eval's log-likelihood choice."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(root, trust_remote_code=opts.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise StepquantError(f"{root}: no usable tokenizer for GPQA ({type(exc).__name__})") from None
    if opts.gpqa_mode == "loglik":
        return gpqa.loglik_chooser(model, tok, opts.device), gpqa.loglik_prompt
    return gpqa.generator(model, tok, opts.device, opts.max_new_tokens, opts.temperature, opts.top_p), gpqa.prompt


def _gpqa_result(exs, ref_scores, q_scores, echo) -> dict:
    result = gpqa.paired(exs, ref_scores, q_scores)
    se, rec = result["paired_se"], result["recovery"]
    echo(f"GPQA accuracy {100 * result['accuracy']['ref']:.1f}% -> {100 * result['accuracy']['quant']:.1f}%, paired "
         f"{100 * result['paired_diff']:+.1f} ± {'-' if se is None else f'{100 * se:.1f}'} pp, "
         f"recovery {'-' if rec is None else f'{rec:.3f}'}")  # fmt: skip
    return result


def _quantiles(values: list[float]) -> dict:
    v = sorted(values)
    return {f"p{q}": v[min(len(v) - 1, int(q / 100 * len(v)))] for q in (50, 90, 99)} | {"max": v[-1]}


def _kl_histogram(values: list[float], bins: int = 40) -> dict:
    """Per-token KL counts over log-spaced bins (plus the exact zeros): small enough for report.json."""
    pos = sorted(v for v in values if v > 0)
    if not pos:
        return {"zeros": len(values), "edges": [], "counts": []}
    lo, hi = math.log10(pos[0]), math.log10(pos[-1]) + 1e-9
    edges = [10 ** (lo + (hi - lo) * i / bins) for i in range(bins + 1)]
    counts = [0] * bins
    for v in pos:
        counts[min(bins - 1, int((math.log10(v) - lo) / (hi - lo) * bins))] += 1
    return {"zeros": len(values) - len(pos), "edges": edges, "counts": counts}


def _plots(r: dict, out: Path) -> list[tuple[str, str]]:
    """sqnr.png (per-layer output SQNR) and kl.png (per-token KL histogram) where the report has the
    data; (title, file) of each written."""
    from matplotlib.figure import Figure

    made = []

    def save(fig, title: str, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / (name + ".partial"), format="png", dpi=100)
        (out / (name + ".partial")).replace(out / name)
        made.append((title, name))

    sq = [(k, v) for k, v in r.get("sqnr_db", {}).items() if math.isfinite(v)]
    if sq:
        fig = Figure(figsize=(8, 3.5))
        ax = fig.add_subplot()
        ax.bar(range(len(sq)), [v for _, v in sq])
        ax.set_xticks(range(len(sq)), [k.rsplit(".", 1)[-1] for k, _ in sq], fontsize=7)
        ax.set(xlabel="layer", ylabel="output SQNR (dB)", title="Per-layer output SQNR, quantized vs reference")
        save(fig, "Per-layer SQNR", "sqnr.png")
    h = r.get("kl_histogram") or {}
    if h.get("counts"):
        fig = Figure(figsize=(6, 3.5))
        ax = fig.add_subplot()
        ax.stairs(h["counts"], h["edges"], fill=True)
        ax.set_xscale("log")
        ax.set(xlabel="KL divergence per token (nats)", ylabel="tokens",
               title=f"Next-token KL vs reference ({h['zeros']} tokens at 0)")  # fmt: skip
        save(fig, "KL histogram", "kl.png")
    return made


def format_table(r: dict) -> str:
    """The report as a Markdown table (also what `push` puts into the model card)."""
    if r["kl"] is None:  # endpoint mode: GPQA only
        lines = [f"Measured by stepquant {r['producer']['version']} through the endpoint {r['device']}.", "",
                 "| metric | reference | quantized |", "|---|---|---|"]  # fmt: skip
    else:
        kv = r.get("kv_cache") or {}
        cache = f", FP8 KV cache ({kv['layers']} layers)" if kv.get("dtype") == "fp8" else ""
        lines = [f"Measured by stepquant {r['producer']['version']} as `{r['mode']}`{cache} on {r['device']}, {r['tokens']} tokens "
                 f"of {r['corpus']}.", "", "| metric | reference | quantized |", "|---|---|---|",
                 f"| perplexity | {r['ppl']['ref']:.4f} | {r['ppl']['quant']:.4f} |",
                 f"| mean KL divergence | - | {r['kl']:.5f} |", f"| same top-1 token | - | {100 * r['top1']:.2f}% |"]  # fmt: skip
    g = r.get("gpqa")
    if g:
        se = "-" if g["paired_se"] is None else f"{100 * g['paired_se']:.2f}"
        how = ", lm-eval log-likelihood" if r.get("options", {}).get("gpqa_mode") == "loglik" else ""
        lines.append(f"| GPQA accuracy ({g['n']} questions x {g['samples'] // g['n']}{how}) | {100 * g['accuracy']['ref']:.2f}% | "
                     f"{100 * g['accuracy']['quant']:.2f}% (paired {100 * g['paired_diff']:+.2f} ± {se} pp) |")  # fmt: skip
    sq = [v for v in r["sqnr_db"].values() if math.isfinite(v)]
    if sq:
        lines += ["", f"Per-layer output SQNR: min {min(sq):.1f} dB, median {sorted(sq)[len(sq) // 2]:.1f} dB."]
    lines += ["", f"Verdict: **{r['verdict']}** (GPQA quantized ≥ {r['min_recovery']} × reference accuracy)" if g else ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(r: dict, out: Path) -> None:
    """report.json, report.md and its plots, each written whole (temporary names, then renamed)."""
    out.mkdir(parents=True, exist_ok=True)
    images = "".join(f"\n![{title}]({name})\n" for title, name in _plots(r, out))
    for name, text in (("report.json", json.dumps(r, indent=2) + "\n"), ("report.md", "# stepquant verify\n\n" + format_table(r) + images)):
        tmp = out / (name + ".partial")
        tmp.write_text(text)
        tmp.replace(out / name)
