"""The README's CLI reference, rendered from the commands' own click help (a test keeps them in sync).

Run: python -m stepquant.cli.reference [--write README.md]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click

from . import main

START, END = "<!-- cli-reference:start -->", "<!-- cli-reference:end -->"


def render() -> str:
    """Every command's `--help` text, in registration order, as Markdown."""
    parts: list[str] = []

    def add(cmd: click.Command, name: str, parent: click.Context) -> None:
        with click.Context(cmd, info_name=name, parent=parent, terminal_width=100, max_content_width=100) as ctx:
            parts.append(f"#### `{ctx.command_path}`\n\n```\n{cmd.get_help(ctx).rstrip()}\n```\n")
            for sub, sub_cmd in getattr(cmd, "commands", {}).items():  # a group's own commands
                add(sub_cmd, sub, ctx)

    top = main.make_context("stepquant", [], resilient_parsing=True)
    for name, cmd in main.commands.items():
        add(cmd, name, top)
    return "\n".join(parts)


def replace(readme: str) -> str:
    """`readme` with the text between the reference markers replaced by `render()`."""
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(readme):
        raise SystemExit(f"the README has no {START} ... {END} block")
    return pattern.sub(lambda _: f"{START}\n\n{render()}\n{END}", readme)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        path = Path(sys.argv[2] if len(sys.argv) > 2 else "README.md")
        path.write_text(replace(path.read_text()))
    else:
        print(render())
