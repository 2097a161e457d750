"""One error family. Internals raise short errors; the CLI/API boundary adds context once."""

from __future__ import annotations


class WeightspaceError(Exception):
    """Base class for every error weightspace raises on purpose (exit code 1)."""

    exit_code = 1


class SpecError(WeightspaceError):
    """The merge spec or the command line is wrong (exit code 2)."""

    exit_code = 2


class InputError(WeightspaceError):
    """An input model, index or tensor is missing, corrupt or incompatible (exit code 1)."""


class NonFiniteError(WeightspaceError):
    """A merge produced NaN or Inf values."""
