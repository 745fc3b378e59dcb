"""Exit codes shared by the command-line entry points (``train.py``, ``python -m
resnet_jax.experiments``): every expected failure is one line on stderr and a documented
status, never a traceback."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from resnet_jax import checkpoint
from resnet_jax.data import DataError

EXIT_CONFIG = 2  # config, usage or data error, before anything is compiled
EXIT_NO_CHECKPOINT = 4  # no readable checkpoint (all damaged, or none for --mode eval)


class CommandFailed(RuntimeError):
    """A failure that carries its own exit status (e.g. a failed ``--jobs`` lane's)."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def exit_on_error() -> Iterator[None]:
    """Turn the library's expected errors into ``error: <message>`` and an exit status:
    2 config/data, 3 diverged (``checkpoint.EXIT_DIVERGED``), 4 no readable checkpoint, a
    ``CommandFailed``'s own status, 143/130 SIGTERM/SIGINT after the checkpoint was saved
    (``checkpoint.Preempted``)."""
    try:
        yield
    except (checkpoint.CheckpointDamaged, checkpoint.CheckpointNotFound) as e:
        _fail(e, EXIT_NO_CHECKPOINT)
    except (ValueError, FileNotFoundError, DataError) as e:
        _fail(e, EXIT_CONFIG)
    except checkpoint.TrainingDiverged as e:
        _fail(e, checkpoint.EXIT_DIVERGED)
    except CommandFailed as e:
        _fail(e, e.exit_code)
    except checkpoint.Preempted as e:
        print(str(e), file=sys.stderr)
        sys.exit(e.exit_code)


def _fail(error: BaseException, code: int) -> None:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(code)
