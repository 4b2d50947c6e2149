"""What every command shares: options, error handling, Rich progress, result output.

A command parses its options, resolves the configuration, calls **one** core function with a
reporter, and renders the result. Errors from bad input become one line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from bladdergen.errors import InputError
from bladdergen.fileio import json_safe
from bladdergen.progress import Reporter, Task

stderr_console = Console(stderr=True)
stdout_console = Console()
# The stream results go to: the real stdout while a command body runs with stdout sent to stderr
# (third-party code that prints, e.g. MONAI's FID, must not break a `--json` document).
_result_streams: list[Any] = []

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config file (any subset of sections and keys)."),
]
ProfileOption = Annotated[
    str | None,
    typer.Option(
        "--profile", "-p", help="Named profile: tiny (CPU, minutes) or paper (24 GB GPU)."
    ),
]
QuietOption = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bars or notices (for scripts).")
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")
]
DeviceOption = Annotated[
    str | None,
    typer.Option("--device", help="auto, cpu, cuda or cuda:N (default: the config's device)."),
]

RunSeedOption = Annotated[
    int | None, typer.Option("--seed", help="Seed of the whole run (config `seed`).")
]
ResumeOption = Annotated[
    bool, typer.Option("--resume", help="Continue the run in RUN_DIR from its last checkpoint.")
]

F = TypeVar("F", bound=Callable[..., Any])


class _RichTask(Task):
    def __init__(self, progress: Progress, task_id: int) -> None:
        self._progress = progress
        self._task_id = task_id

    def advance(self, n: int = 1, **fields: Any) -> None:
        info = "  ".join(f"{k}={_short(v)}" for k, v in fields.items())
        self._progress.update(self._task_id, advance=n, info=info)

    def close(self) -> None:
        self._progress.stop_task(self._task_id)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class RichReporter(Reporter):
    """Progress bars and notices on stderr; silent with ``quiet`` (errors still show)."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._progress: Progress | None = None

    def _ensure_progress(self) -> Progress:
        if self._progress is None:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=stderr_console,
                transient=False,
            )
            self._progress.start()
        return self._progress

    def task(self, description: str, total: int | None = None, completed: int = 0) -> Task:
        if self.quiet:
            return Task()
        progress = self._ensure_progress()
        task_id = progress.add_task(description, total=total, completed=completed, info="")
        return _RichTask(progress, task_id)

    def notice(self, text: str) -> None:
        if self.quiet:
            return
        if self._progress is not None:
            self._progress.console.print(f"[yellow]note:[/] {escape(text)}", highlight=False)
        else:
            stderr_console.print(f"[yellow]note:[/] {escape(text)}", highlight=False)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def handle_errors(command: F) -> F:
    """Run a command body: InputError -> one line + exit 2; other failures -> exit 1.

    Messages are printed as given (paths like ``a[/]b`` are not Rich markup). While the body runs,
    anything printed to ``sys.stdout`` goes to stderr, so stdout holds only the result
    (:func:`emit_result`). Set ``BLADDERGEN_DEBUG=1`` to see the traceback of an internal failure.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _stdout_to_stderr():
                return command(*args, **kwargs)
        except InputError as error:
            stderr_console.print(
                f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            stderr_console.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None
        except typer.Exit:
            raise
        except Exception as error:  # an internal failure, not the user's fault
            stderr_console.print(
                f"[bold red]internal error:[/] {type(error).__name__}: {escape(str(error))}",
                highlight=False,
                soft_wrap=True,
            )
            if os.environ.get("BLADDERGEN_DEBUG"):
                traceback.print_exc(file=sys.stderr)
            else:
                stderr_console.print("(set BLADDERGEN_DEBUG=1 for the traceback)")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send ``sys.stdout`` writes to stderr; :func:`emit_result` still writes to the real one."""
    _result_streams.append(sys.stdout)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _result_streams.pop()


def result_stream() -> Any:
    """The stream a command's result goes to (the real stdout, even while it is redirected)."""
    return _result_streams[-1] if _result_streams else sys.stdout


def emit_result(result: dict[str, Any], as_json: bool, quiet: bool, title: str) -> None:
    """Print a command's result: JSON on stdout for pipelines, else a short human summary.

    The JSON document is strict (NaN and infinities become null). Under torchrun only rank 0
    prints, so a script still reads exactly one JSON line.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return
    stream = result_stream()
    if as_json:
        stream.write(json.dumps(json_safe(result), default=str, allow_nan=False) + "\n")
        stream.flush()
        return
    if quiet:
        return
    console = Console(file=stream) if stream is not sys.stdout else stdout_console
    console.print(f"[bold green]{escape(title)}[/]")
    for key, value in result.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(json_safe(value), default=str)
            if len(value) > 200:
                value = value[:197] + "..."
        console.print(f"  {key}: {escape(str(value))}", highlight=False, soft_wrap=True)
