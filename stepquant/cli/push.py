"""`stepquant push DST REPO_ID`."""

from __future__ import annotations

import click

from ..hub import PushOptions, push


@click.command("push")
@click.argument("dst")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", help="Branch to commit to (created from main when missing).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--commit-message", help="The commit's title.")
@click.option("--dry-run", is_flag=True, help="Write the card and list every file and its size; upload nothing.")
@click.option("--force", is_flag=True, help="Push a folder without a manifest or one that check finds defects in.")
@click.option("--regenerate-card", is_flag=True, help="Replace an existing DST/README.md with a generated card.")
@click.option("--report", help="A `stepquant verify --report` folder for the card (default: DST/verify).")
@click.option("--base-model", help="The Hub repo the source was, when it was converted from a local folder.")
def command(dst: str, repo_id: str, **kw) -> None:
    """Publish the checkpoint DST to the Hub repo REPO_ID with a generated model card; a rerun uploads only
    what is missing. The token comes from HF_TOKEN or `hf auth login` and is never printed."""
    res = push(dst, repo_id, PushOptions(**kw), echo=click.echo)
    total = sum(n for _, n in res.files)
    if kw["dry_run"]:
        for rel, n in res.files:
            click.echo(f"{n:>15,}  {rel}")
        click.echo(f"{total:>15,}  {len(res.files)} files would go to {repo_id} (dry run: nothing uploaded)")
        return
    click.echo(f"{repo_id}: {len(res.uploaded)} of {len(res.files)} files new or changed, the rest already there; {res.url}")
