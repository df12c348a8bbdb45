"""`stepquant demo`."""

from __future__ import annotations

import click

from ..demo import run_demo


@click.command("demo")
@click.option("--out", default="build/demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the demo checkpoint and everything made from it.")
def command(out: str) -> None:
    """Build a tiny Step-3.7 checkpoint and run stepquant's pipeline on it (CPU, under a minute)."""
    run_demo(out, echo=click.echo)
