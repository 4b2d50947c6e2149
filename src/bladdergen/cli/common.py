"""What every command shares: options, error handling, Rich progress, result output.

A command parses its options, resolves the configuration, calls **one** core function with a
reporter, and renders the result. Errors from bad input become one line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import time
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


class LineTask(Task):
    """Plain progress lines for a log file (SLURM, ``nohup``, ``| tee``), where a live bar cannot
    redraw: one line every ``every_steps`` items (a twentieth of the total) or ``every_seconds``,
    whichever comes first, and one at the end. Each line reads
    ``train-vqgan: 120/1200 (10%)  elapsed 0:01:03  eta 0:09:27  l1=0.081 perplexity=300``.
    """

    def __init__(
        self,
        description: str,
        total: int | None,
        completed: int = 0,
        every_seconds: float = 60.0,
        stream: Any = None,
    ) -> None:
        self.description, self.total, self.done = description, total, completed
        self.stream = stream if stream is not None else sys.stderr
        self.every_seconds = every_seconds
        self.every_steps = max(1, math.ceil(total / 20)) if total else None
        self.started = self.last_time = time.monotonic()
        self.first, self.last_done = completed, completed

    def advance(self, n: int = 1, **fields: Any) -> None:
        self.done += n
        now = time.monotonic()
        by_steps = self.every_steps is not None and self.done - self.last_done >= self.every_steps
        by_time = now - self.last_time >= self.every_seconds
        finished = self.total is not None and self.done >= self.total
        if by_steps or by_time or finished:
            self._write(now, fields)

    def _write(self, now: float, fields: dict[str, Any]) -> None:
        elapsed = now - self.started
        parts = [f"{self.description}: {self.done}"]
        if self.total:
            parts[0] += f"/{self.total} ({100 * self.done // self.total}%)"
        parts.append(f"elapsed {_clock(elapsed)}")
        rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
        if self.total and rate > 0:
            parts.append(f"eta {_clock((self.total - self.done) / rate)}")
        if fields:
            parts.append(" ".join(f"{k}={_short(v)}" for k, v in fields.items()))
        self.stream.write("  ".join(parts) + "\n")
        self.stream.flush()
        self.last_time, self.last_done = now, self.done


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class RichReporter(Reporter):
    """Progress bars and notices on stderr; silent with ``quiet`` (errors still show).

    When stderr is not a terminal (a log file), progress comes as plain lines (:class:`LineTask`)
    instead of a bar that would only be drawn once, at the end.
    """

    def __init__(self, quiet: bool = False, line_seconds: float = 60.0) -> None:
        self.quiet = quiet
        self.line_seconds = line_seconds
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
        if not stderr_console.is_terminal:
            return LineTask(description, total, completed, self.line_seconds)
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


def parse_range(option: str, text: str | None) -> list[float] | None:
    """``"LOW:HIGH"`` -> [LOW, HIGH] (None stays None); InputError naming ``option`` otherwise."""
    if text is None:
        return None
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        return [float(parts[0]), float(parts[1])]
    except ValueError:
        raise InputError(f"{option}: got {text!r}, expected LOW:HIGH, e.g. -120:-20") from None
