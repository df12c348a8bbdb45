"""`stepquant inspect SRC`."""

from __future__ import annotations

import json

import click

from ..convert import ConvertOptions, plan_conversion
from ..inspect import format_report, inspect_checkpoint
from .convert import format_plan


@click.command("inspect")
@click.argument("src")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--recipe", help="Instead, print the per-tensor plan this recipe would carry out (like convert --dry-run).")
@click.option("--revision", help="Hub revision (branch, tag or commit) when SRC is a repo id.")
@click.option("--allow-pickle", is_flag=True, help="Read .bin/.pt pickle weights (they can run code).")
def command(src: str, as_json: bool, recipe: str | None, revision: str | None, allow_pickle: bool) -> None:
    """Describe the checkpoint SRC (a folder or a Hub repo id)."""
    if recipe:
        plan = plan_conversion(src, ConvertOptions(recipe=recipe, revision=revision, allow_pickle=allow_pickle))
        click.echo(json.dumps(plan, indent=2) if as_json else format_plan(plan))
        return
    report = inspect_checkpoint(src, revision=revision, allow_pickle=allow_pickle)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
