"""``bladdergen`` command line: thin Typer commands over the core modules.

Each module here registers its commands on :data:`bladdergen.cli.app.app`; heavy imports (torch,
MONAI) happen inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

from typing import Annotated

import typer

from bladdergen import __version__
from bladdergen.cli import config_cmd, data, deepatlas, diffusion, evaluate, pipeline, vqgan  # noqa: F401
from bladdergen.cli.app import app


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bladdergen {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """bladdergen command-line tool."""


def main() -> None:
    """Console-script entry point."""
    app()
