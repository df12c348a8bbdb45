"""`stepquant bench kernels`."""

from __future__ import annotations

import json

import click

from ..bench import SHAPE_SETS, bench_kernels, format_kernels


@click.group("bench")
def command() -> None:
    """Measure stepquant's GPU kernels on this machine (needs CUDA)."""


@command.command("kernels")
@click.option("--shapes", type=click.Choice(list(SHAPE_SETS)), default="step3p7", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def kernels(shapes: str, as_json: bool) -> None:
    """Copy bandwidth, NVFP4 quantization kernel, and NVFP4 linear vs torch BF16."""
    result = bench_kernels(shapes)
    click.echo(json.dumps(result, indent=2) if as_json else format_kernels(result))
