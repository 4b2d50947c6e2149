"""Commands: evaluate seg | gen | reader-study."""

from __future__ import annotations

from bladdergen.cli.app import app  # noqa: F401
