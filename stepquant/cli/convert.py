"""`stepquant convert SRC DST`."""

from __future__ import annotations

import click

from ..convert import FORMATS, ConvertOptions, convert
from ..naming import CHOICES
from ..shards import DEFAULT_MAX_SHARD


@click.command("convert")
@click.argument("src")
@click.argument("dst", type=click.Path())
@click.option("--to", "to", type=click.Choice(FORMATS), default="keep", show_default=True,
              help="Output format; 'keep' copies tensors as they are.")
@click.option("--naming", type=click.Choice(CHOICES), default="keep", show_default=True,
              help="Prefix convention of the output's tensor names and exclude lists.")
@click.option("--naming-map", type=click.Path(exists=True, dir_okay=False),
              help="YAML file {rename: {old.prefix.: new.prefix.}} used instead of --naming.")
@click.option("--max-shard-size", default=DEFAULT_MAX_SHARD, show_default=True,
              help="Largest shard, e.g. 5GB or 500MB; a bigger tensor gets its own shard.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from DST.partial.")
@click.option("--overwrite", is_flag=True, help="Replace an existing DST (or a stale DST.partial).")
@click.option("--revision", help="Hub revision (branch, tag or commit) when SRC is a repo id.")
@click.option("--allow-pickle", is_flag=True, help="Read .bin/.pt pickle weights (they can run code).")
def command(src: str, dst: str, **opts: object) -> None:  # fmt: skip
    """Convert the checkpoint SRC into a new folder DST."""
    out = convert(src, dst, ConvertOptions(**opts))
    click.echo(f"wrote {out}")
