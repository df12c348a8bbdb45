"""`stepquant convert SRC DST`."""

from __future__ import annotations

import json

import click

from ..convert import ConvertOptions, convert
from ..formats import FORMATS
from ..naming import CHOICES
from ..recipes import LAYOUTS, SCOPES
from ..shards import DEFAULT_MAX_SHARD


@click.command("convert")
@click.argument("src")
@click.argument("dst", type=click.Path())
@click.option("--recipe", help="A recipe name from recipes/ or a YAML path; the flags below override its fields.")
@click.option("--to", "to", type=click.Choice(["keep", *FORMATS]), help="Output format of the quantized modules.")
@click.option("--scope", type=click.Choice(list(SCOPES)), help="Which Linears are quantized.")
@click.option("--kv-cache", type=click.Choice(["fp8", "none"]), help="Calibrate FP8 KV-cache scales.")
@click.option("--moe-layout", type=click.Choice(LAYOUTS), help="Routed-expert layout of the output.")
@click.option("--naming", type=click.Choice(CHOICES), help="Prefix convention of the output's names and exclude lists.")
@click.option("--naming-map", type=click.Path(exists=True, dir_okay=False),
              help="YAML file {rename: {old.prefix.: new.prefix.}} used instead of --naming.")
@click.option("--calib-data", help="embedded | a .txt/.jsonl file | a token-id .json | an HF dataset id.")
@click.option("--calib-samples", type=int, help="Number of calibration sequences.")
@click.option("--calib-seq-len", type=int, help="Tokens per calibration sequence.")
@click.option("--calib-seed", type=int, default=0, show_default=True,
              help="Seed of the shuffle of a calibration dataset given by Hub id (recorded in the manifest).")
@click.option("--calib-all-experts", is_flag=True,
              help="Send every calibration token through every expert for statistics; only routed outputs flow on.")
@click.option("--calib-mode", type=click.Choice(["layers", "model"]), default="layers", show_default=True,
              help="layers: one decoder layer in memory at a time (resumable per layer); model: the whole model. Same scales.")
@click.option("--gpus", type=int, default=1, show_default=True,
              help="Calibrate on N GPUs, one process each, a share of the batches each (byte-identical result).")
@click.option("--expert-input-scale", type=click.Choice(["shared", "per-expert"]),
              help="One input_scale per projection for all experts of a layer, or one per expert.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where weights are quantized (Triton kernels on cuda; bit-identical to cpu).")
@click.option("--calib-device", type=click.Choice(["cpu", "cuda"]),
              help="Where the calibration forward runs (default: --device). GPU and CPU forwards differ in rounding.")
@click.option("--max-shard-size", default=DEFAULT_MAX_SHARD, show_default=True,
              help="Largest shard, e.g. 5GB or 500MB; a bigger tensor gets its own shard.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from DST.partial.")
@click.option("--overwrite", is_flag=True, help="Replace an existing DST (or a stale DST.partial).")
@click.option("--dry-run", is_flag=True, help="Print the per-tensor plan and predicted size; write nothing.")
@click.option("--revision", help="Hub revision (branch, tag or commit) when SRC is a repo id.")
@click.option("--allow-pickle", is_flag=True, help="Read .bin/.pt pickle weights (they can run code).")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own Python code for calibration.")
@click.option("--allow-nonfinite", is_flag=True, help="Keep modules whose weights hold NaN/Inf in BF16 (excluded, with a warning) instead of refusing.")
def command(src: str, dst: str, **opts: object) -> None:  # fmt: skip
    """Convert the checkpoint SRC into a new folder DST."""
    result = convert(src, dst, ConvertOptions(**opts))
    if isinstance(result, dict):
        click.echo(format_plan(result))
    else:
        click.echo(f"wrote {result}")


def format_plan(plan: dict) -> str:
    lines = [f"recipe: {json.dumps(plan['recipe'])}", f"source naming: {plan['source_naming']}", ""]
    width = max((len(r["module"]) for r in plan["modules"]), default=10)
    for r in plan["modules"]:
        lines.append(f"{r['module']:<{width}}  {r['role']:<13} {r['action']}")
    lines.append(f"\n{plan['copied_tensors']} other tensors copied as they are")
    lines.append(f"exclude_modules: {len(plan['exclude_modules'])} entries")
    lines.append(f"predicted output: {plan['predicted_bytes']:,} bytes ({plan['predicted_tensor_bytes']:,} in"
                 f" {len(plan['outputs'])} tensors)")
    return "\n".join(lines)
