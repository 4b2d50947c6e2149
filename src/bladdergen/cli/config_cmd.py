"""``bladdergen config``: print a profile (or a resolved config) as YAML to start from."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bladdergen.cli.app import app
from bladdergen.cli.common import ConfigOption, handle_errors, result_stream

config_app = typer.Typer(help="Show configuration profiles as YAML.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
@handle_errors
def show(
    profile: Annotated[str, typer.Argument(help="Profile to print: tiny or paper.")] = "paper",
    config: ConfigOption = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write to this file instead of stdout.")
    ] = None,
) -> None:
    """Print PROFILE (merged with --config if given) as YAML; edit it and pass it with --config."""
    from bladdergen.config import config_to_yaml, load_config
    from bladdergen.fileio import atomic_write_text

    text = config_to_yaml(load_config(profile, config))
    if out is None:
        typer.echo(text, nl=False, file=result_stream())
    else:
        atomic_write_text(out, text)


@config_app.command("reference")
@handle_errors
def reference(
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write to this file instead of stdout.")
    ] = None,
) -> None:
    """Print the configuration reference (every key, both profiles) as Markdown."""
    from bladdergen.config import config_reference_markdown
    from bladdergen.fileio import atomic_write_text

    text = config_reference_markdown()
    if out is None:
        typer.echo(text, nl=False, file=result_stream())
    else:
        atomic_write_text(out, text)
