"""Every expected failure of the library and the exit status each one maps to.

A leaf module (standard library only), so persistence, the data layer, the training policy and
the command-line entry points share one list. ``resnet_jax.cli.exit_on_error`` prints an expected
failure as one line and exits with :func:`exit_code`: what validation checks (:class:`ConfigError`
and its subclasses, :class:`DataError`) exits :data:`EXIT_CONFIG`, the checkpoint errors
:data:`EXIT_NO_CHECKPOINT` (or :data:`EXIT_CONFIG` for a mismatch), a busy workdir
:data:`EXIT_BUSY`. Every other exception, a plain ``ValueError``, ``TypeError`` or
``FileNotFoundError`` from a fork's module included, is a bug: it keeps its traceback and
Python's exit status 1.
"""

from __future__ import annotations

import signal

EXIT_CONFIG = 2  # config, usage or data error, before anything is compiled; another model/config
EXIT_DIVERGED = 3  # non-finite loss or state; the newest checkpoint is the last good one
EXIT_NO_CHECKPOINT = 4  # no readable checkpoint (all damaged, or none for --mode eval)
EXIT_BUSY = 5  # another run holds the workdir (its lock is live); nothing was touched
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143: stopped by SIGTERM after saving (resumable)
EXIT_SIGINT = 128 + signal.SIGINT  # 130: stopped by SIGINT (Ctrl-C) after saving (resumable)


class ConfigError(ValueError):
    """What validation checks: a bad config value, model field, option combination or usage.

    Only this family (and the data and checkpoint errors) is printed as one line with exit 2;
    any other exception, a fork's shape bug included, keeps its traceback.
    """


class DataError(RuntimeError):
    """A dataset or archive is missing or unreadable; the message says how to provide it.

    Raised by ``resnet_jax.data`` (and exported there as ``resnet_jax.data.DataError``).
    """


class CheckpointMismatch(ConfigError):
    """The checkpoint was written for another model, state or config than the one running."""


class CheckpointDamaged(RuntimeError):
    """No checkpoint in the directory can be read."""


class CheckpointNotFound(FileNotFoundError):
    """The workdir has no checkpoint (or not the step asked for)."""


class ExtensionUnavailable(ConfigError):
    """An optional compiled extension (the ``[onednn]`` extra) cannot be built or loaded here."""


class WorkdirBusy(ConfigError):
    """Another live run holds the workdir's lock (``resnet_jax.train.workdir``); exit 5."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss or state; ``step`` is the first bad step found."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class Preempted(Exception):
    """SIGTERM/SIGINT: the state of ``step`` was saved; exit with ``exit_code`` to be requeued."""

    def __init__(self, signum: int, step: int, directory: str) -> None:
        self.signum = signum
        self.step = step
        self.exit_code = 128 + signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {step} saved "
            f"in {directory}; exit code {self.exit_code}. Rerun the same command to resume."
        )


class CommandFailed(RuntimeError):
    """A failure that carries its own exit status (e.g. a failed ``--jobs`` lane's)."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def exit_code(error: BaseException) -> int | None:
    """The exit status of an expected failure; None for anything else (a bug: keep its traceback).

    Expected: :class:`ConfigError` (subclasses included) and :class:`DataError` (2), the
    checkpoint errors (4; a mismatch is a ConfigError), a divergence (3), a busy workdir (5),
    and the failures that carry their own status (:class:`CommandFailed`, :class:`Preempted`).
    A plain ``ValueError`` or ``FileNotFoundError`` is not one: JAX raises those for a fork's
    shape bug.
    """
    if isinstance(error, CheckpointDamaged | CheckpointNotFound):
        return EXIT_NO_CHECKPOINT
    if isinstance(error, TrainingDiverged):
        return EXIT_DIVERGED
    if isinstance(error, CommandFailed | Preempted):
        return error.exit_code
    if isinstance(error, WorkdirBusy):
        return EXIT_BUSY
    if isinstance(error, ConfigError | DataError):
        return EXIT_CONFIG
    return None
