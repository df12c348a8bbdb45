"""`stepquant verify DST --ref SRC`."""

from __future__ import annotations

import click

from ..qmodel import MODES
from ..verify import VerifyOptions, verify


@click.command("verify")
@click.argument("path")
@click.option("--ref", required=True, help="The source checkpoint (the BF16 reference).")
@click.option("--mode", type=click.Choice(MODES), default="w4a4", show_default=True,
              help="NVFP4 execution: w4a4 as Blackwell computes it, w4a16 as Hopper engines do.")
@click.option("--device", default="cpu", show_default=True, help="cpu (exact emulation) or cuda (Triton kernels).")
@click.option("--kv-cache", type=click.Choice(["auto", "none"]), default="auto", show_default=True,
              help="auto: emulate the FP8 KV cache with the checkpoint's k/v scales where it has them; none: BF16 cache.")
@click.option("--compute-dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16", show_default=True,
              help="Dtype of the reference model around the quantized Linears (whose inputs are BF16 either way); "
                   "float32 keeps BF16 rounding elsewhere out of the comparison.")
@click.option("--layerwise", is_flag=True,
              help="Fidelity with one decoder layer in memory at a time, for models that do not fit (no GPQA).")
@click.option("--eval-data", help="Fidelity corpus: a .txt/.jsonl file, token JSON or HF dataset id (default: embedded).")
@click.option("--eval-samples", type=click.IntRange(1), default=8, show_default=True)
@click.option("--eval-seq-len", type=click.IntRange(2), default=256, show_default=True)
@click.option("--gpqa", help="GPQA rows: a CSV/JSON/JSONL file, or hf:diamond|main|extended (gated).")
@click.option("--gpqa-mode", type=click.Choice(["generate", "loglik"]), default="generate", show_default=True,
              help="generate: simple-evals (chat template, reasoning, answer regex); loglik: lm-eval's zeroshot "
                   "variant (the choice \" (A)\"..\" (D)\" of highest log-likelihood).")
@click.option("--repeats", type=click.IntRange(1), default=8, show_default=True)
@click.option("--gpqa-limit", type=click.IntRange(1), help="Only the first N questions.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=2048, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True)
@click.option("--top-p", type=click.FloatRange(0, 1), default=1.0, show_default=True)
@click.option("--batch", type=click.IntRange(1), default=8, show_default=True, help="Prompts generated at once.")
@click.option("--min-recovery", type=click.FloatRange(0), default=0.99, show_default=True,
              help="GPQA accuracy quantized / reference needed to pass.")
@click.option("--report", type=click.Path(file_okay=False), help="Write report.json and report.md here.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own Python code (off by default).")
@click.option("--endpoint", help="GPQA of the checkpoint served at this OpenAI-compatible API base (e.g. http://host:8000/v1).")
@click.option("--model", help="The checkpoint's name on --endpoint.")
@click.option("--ref-endpoint", help="The reference served too (else it runs here from --ref).")
@click.option("--ref-model", help="The reference's name on --ref-endpoint (default: --model).")
@click.option("--concurrency", type=click.IntRange(1), default=8, show_default=True, help="Requests in flight per endpoint.")
@click.option("--gpqa-cache", type=click.Path(dir_okay=False), help="Endpoint answers kept here; a rerun asks only the rest (default: REPORT/gpqa-answers.jsonl).")
@click.pass_context
def command(ctx: click.Context, path: str, **kw) -> None:
    """Accuracy of a quantized checkpoint against its source: KL, top-1, perplexity, GPQA.
    Exit 0 when GPQA recovery passes (or no GPQA was asked), 1 when it fails, 2 on bad input."""
    report = verify(path, VerifyOptions(**kw), echo=click.echo)
    click.echo(f"verdict: {report['verdict']}")
    ctx.exit(1 if report["verdict"] == "fail" else 0)
