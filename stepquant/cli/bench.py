"""`stepquant bench kernels` and `stepquant bench convert`."""

from __future__ import annotations

import json

import click

from ..bench import SHAPE_SETS, bench_convert, bench_kernels, format_kernels


@click.group("bench")
def command() -> None:
    """Measure stepquant's GPU kernels on this machine (needs CUDA)."""


@command.command("kernels")
@click.option("--shapes", type=click.Choice(list(SHAPE_SETS)), default="step3p7", show_default=True,
              help="Whose Linear and MoE shapes to time.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def kernels(shapes: str, as_json: bool) -> None:
    """Copy bandwidth, NVFP4 quantization kernel, NVFP4 linear and fused MoE vs torch BF16."""
    result = bench_kernels(shapes)
    click.echo(json.dumps(result, indent=2) if as_json else format_kernels(result))


@command.command("convert")
@click.option("--workdir", type=click.Path(file_okay=False), required=True,
              help="Where the generated checkpoint (kept and reused) and the outputs go.")  # fmt: skip
@click.option("--layers", type=click.IntRange(1), default=1, show_default=True, help="Full-width MoE layers (~9.3 GB each).")
@click.option("--devices", default="cuda,cpu", show_default=True, help="Comma-separated devices to convert on.")
def convert_cmd(workdir: str, layers: int, devices: str) -> None:
    """End-to-end NVFP4 conversion GB/s of a generated Step-3.7-shaped checkpoint, GPU and CPU (each run
    twice: the second is the steady rate, the first is reported too)."""
    result = bench_convert(workdir, layers, tuple(d.strip() for d in devices.split(",") if d.strip()), echo=click.echo)
    click.echo(json.dumps(result, indent=2))
