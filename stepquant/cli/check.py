"""`stepquant check DST`."""

from __future__ import annotations

import click

from ..check import ENGINES, check_checkpoint, format_report


@click.command("check")
@click.argument("path")
@click.option("--engine", type=click.Choice([*ENGINES, "all"]), default="all", show_default=True,
              help="Whose loader rules to apply.")
@click.option("--ref", help="The source checkpoint: dequantize and compare (catches swapped nibbles).")
@click.pass_context
def command(ctx: click.Context, path: str, engine: str, ref: str | None) -> None:
    """Lint a quantized checkpoint against what vLLM, SGLang and TensorRT-LLM load. Exit 0 clean, 1 defects."""
    rep = check_checkpoint(path, ENGINES if engine == "all" else (engine,), ref)
    click.echo(format_report(rep))
    ctx.exit(rep.exit_code)
