"""`stepquant inspect SRC`."""

from __future__ import annotations

import json

import click

from ..inspect import format_report, inspect_checkpoint


@click.command("inspect")
@click.argument("src")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--revision", help="Hub revision (branch, tag or commit) when SRC is a repo id.")
@click.option("--allow-pickle", is_flag=True, help="Read .bin/.pt pickle weights (they can run code).")
def command(src: str, as_json: bool, revision: str | None, allow_pickle: bool) -> None:
    """Describe the checkpoint SRC (a folder or a Hub repo id)."""
    report = inspect_checkpoint(src, revision=revision, allow_pickle=allow_pickle)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
