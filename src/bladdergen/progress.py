"""Progress reporting handed to core functions, so that they never print.

Core functions take a ``reporter: Reporter`` argument (default: :data:`SILENT`). The CLI passes a
Rich-backed reporter; tests and library users get silence or their own implementation.
"""

from __future__ import annotations

from typing import Any


class Task:
    """One loop over cases or steps. ``advance`` moves the bar; keyword fields are shown beside it."""

    def advance(self, n: int = 1, **fields: Any) -> None:
        """Record ``n`` finished items; ``fields`` are short metrics such as ``loss=0.12``."""

    def close(self) -> None:
        """Mark the loop finished."""

    def __enter__(self) -> Task:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Reporter:
    """Silent reporter; subclasses show progress and notices to a person."""

    def task(self, description: str, total: int | None = None, completed: int = 0) -> Task:
        """Start a loop of ``total`` items (``None`` when unknown), ``completed`` already done."""
        return Task()

    def notice(self, text: str) -> None:
        """A one-time message worth a person's attention (e.g. 'perceptual loss is off')."""


SILENT = Reporter()
