"""Commands: phantom, preprocess."""

from __future__ import annotations

from bladdergen.cli.app import app  # noqa: F401
