"""Exceptions that separate a user's mistake from a bug.

The CLI turns :class:`InputError` (and its subclasses) into a one-line message and exit code 2;
anything else is an internal failure (exit code 1).
"""


class InputError(Exception):
    """Bad input from the user: a file, a value or an option that is not what was expected.

    The message must name the file or key, the value found and what was expected, in one line.
    """


class ConfigError(InputError):
    """A configuration file or override that does not validate."""


class CheckpointError(InputError):
    """A checkpoint that is missing, corrupt, or does not match the requested configuration."""
