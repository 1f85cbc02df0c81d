"""Exit codes of every command: what a launcher, a sweep or Slurm can tell apart; and the one base
of the errors that are the user's to fix (exit code 2), with the one way every command reports them.

This module imports nothing, so every layer (the config at the bottom included) can raise these.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_OK = 0  # success, also after a SIGTERM/SIGUSR1 stop that saved a checkpoint
EXIT_FAILURE = 1  # anything else (a bug, a lost rank, a full disk that stopped the run)
EXIT_CONFIG = 2  # a UsageError: a configuration, data, checkpoint or usage error, found before anything was written
EXIT_DIVERGED = 3  # NaN/Inf loss or gradient with train.nonfinite=stop (nothing non-finite is checkpointed)


class UsageError(ValueError):
    """What the user asked for cannot be done, and the message says why and names the key, file or
    argument to change. Every command prints it as one line (:func:`report_usage_error`), never a
    traceback, and exits :data:`EXIT_CONFIG`.

    The kinds: :class:`sdd_train.config.ConfigError` (a config key), :class:`sdd_train.data.sources.DataError`
    (input files, datasets, tokenizers), :class:`CheckpointUnusable`, :class:`sdd_train.kernels.attention.BackendUnavailable`,
    and this class itself for a command's arguments and paths. ``label`` starts the printed line.
    """

    label = "usage error"


class CheckpointUnusable(UsageError):
    """A checkpoint (or a run directory's set of them) that this command cannot use: missing, damaged,
    or written for another model. The files are left as they are."""

    label = "checkpoint error"


def error_line(e: BaseException) -> str:
    """``e`` as the one line a command prints: its ``label`` (``error`` for other exceptions), then its
    message with any line breaks turned into spaces."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return f"{getattr(e, 'label', 'error')}: {text}"


def report_usage_error(e: BaseException, report: Callable[..., None] = print) -> int:
    """Print ``e`` as one line on stderr (through ``report``, e.g. only on rank 0) and return :data:`EXIT_CONFIG`."""
    report(error_line(e), file=sys.stderr)
    return EXIT_CONFIG
