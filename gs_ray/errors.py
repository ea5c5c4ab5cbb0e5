"""The errors a user can fix: the command line prints their message alone (no traceback).

Everything else is a bug and keeps its traceback. Each subclass is also a ``ValueError`` so that
callers that caught ``ValueError`` before keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user; the message names the file or key and what is wrong."""

    label = "error"  # how the command line introduces the message


class ConfigError(UserError):
    """A configuration key or value is wrong; the message names the key, the value and what is
    allowed."""

    label = "config error"


class DataError(UserError):
    """Bad input data; the message names the file, line (or row) and field."""

    label = "data error"


class RunDirError(UserError):
    """A run directory is missing, incomplete or corrupt; the message names the file."""

    label = "run directory error"
