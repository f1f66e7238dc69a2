"""User-facing errors.

Anything a user can fix (a missing file, a bad params key, an unsupported precision on this
hardware) raises :class:`R2GenError` with a one-line message that names the file, the problem and
the next step. Stage scripts and the CLI print that line and exit with status 2; any other exception
is a bug and keeps its traceback.
"""

from __future__ import annotations


class R2GenError(Exception):
    """An error the user can fix; its message is shown as one line, without a traceback."""


class DataError(R2GenError):
    """Bad or missing input data (annotation.json, images, splits)."""


class ConfigError(R2GenError):
    """A params.yaml key or value that is not valid."""


class PrecisionError(R2GenError):
    """A precision/backend that this machine cannot run."""


class CheckpointError(R2GenError):
    """A checkpoint that is missing, corrupt, unsafe or from an incompatible version."""
