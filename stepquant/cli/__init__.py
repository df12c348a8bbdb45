"""The `stepquant` command: a thin layer that parses options and calls one library function each."""

from __future__ import annotations

import logging

import click

from .. import __version__
from ..errors import StepquantError


class _Group(click.Group):
    """Turns stepquant's errors into one line on stderr and an exit code, never a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except StepquantError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"error: {where}{exc.strerror or exc}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted; run the command again to continue (convert: with --resume)", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="stepquant")
def main() -> None:
    """Convert Hugging Face MoE checkpoints to BF16, FP8 and NVFP4; check, verify and publish them."""


class _Warnings(logging.Handler):
    """The library's warnings (logger "stepquant"), one line each on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"{record.levelname.lower()}: {record.getMessage()}", err=True)


logging.getLogger("stepquant").addHandler(_Warnings(logging.WARNING))  # the root logger stays untouched


def _register() -> None:
    from . import bench, check, convert, demo, inspect, push, serve, verify

    for mod in (inspect, convert, check, verify, push, demo, bench, serve):
        main.add_command(mod.command)


_register()
