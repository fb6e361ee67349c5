"""Error types. Each carries its exit code; the CLI maps them in one table
(quantkit/cli/__init__.py) to one line on stderr.

Exit codes (stable, documented in the README):
  0  success
  1  internal error (a bug: please report it; --debug shows the traceback)
  2  usage error (bad option or argument)
  3  invalid input (corrupt/truncated file, bad config, missing tensor, NaN/Inf, unsafe pickle)
  4  unsupported (architecture, tensor type, vocabulary kind)
  5  output error (exists without --force, unwritable, disk full)
  6  cluster error (--cluster: no scheduler answers, no workers, a worker
     cannot see the source at the client's path, every worker lost)
  130 interrupted (Ctrl-C); no partial file is left
"""
from __future__ import annotations


class QuantkitError(Exception):
    """Base of every error quantkit reports as one line."""

    exit_code = 1


class UsageError(QuantkitError):
    exit_code = 2


class InputError(QuantkitError):
    """The input model/file is missing, corrupt or inconsistent."""

    exit_code = 3


class UnsafePickleError(InputError):
    """A PyTorch .bin pickle referenced a global outside the allow-list."""


class NonFiniteError(InputError):
    """A weight holds NaN or Inf. Message names tensor (and row)."""

    def __init__(self, message: str, *, tensor: str | None = None, row: int | None = None):
        super().__init__(message)
        self.tensor = tensor
        self.row = row


class UnsupportedError(QuantkitError):
    exit_code = 4


class OutputError(QuantkitError):
    exit_code = 5


class ClusterError(QuantkitError):
    """--cluster: the Dask scheduler or its workers failed us (quantkit.cluster)."""

    exit_code = 6
