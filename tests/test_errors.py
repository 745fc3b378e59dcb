"""Which failures are one line and exit 2, and which keep their traceback.

What validation checks (``errors.ConfigError``, the data and checkpoint errors) is an expected
failure: ``cli.exit_on_error`` prints one line and exits with its status. Anything else, a
fork's shape bug that JAX raises as a plain ``ValueError`` included, propagates with its
traceback (Python's exit status 1), so the person who wrote the block sees where it broke.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from resnet_jax import cli, data, errors, models

ROOT = Path(__file__).resolve().parent.parent

# A fork's basic block with a bug only on the downsampling block (strides != 1): it gates the
# residual with the *input's* spatial map, twice the output's size, so jnp.where cannot
# broadcast (B, 2H, 2W, 1) against (B, H, W, C) and JAX raises a ValueError while tracing.
BAD_BLOCK = '''
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from resnet_jax import models


class BadBlock(nn.Module):
    features: int
    strides: int = 1
    shortcut: str = "A"
    conv: Any = nn.Conv
    norm: Any = nn.BatchNorm
    act: Callable = nn.relu

    @nn.compact
    def __call__(self, x):
        s = (self.strides, self.strides)
        y = self.conv(self.features, (3, 3), s, padding=1, name="conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        y = self.conv(self.features, (3, 3), padding=1, name="conv2")(y)
        y = self.norm(name="bn2")(y)
        if self.strides != 1:
            y = jnp.where(x[..., :1] > 0, y, 0.0)  # the bug: x is the block's input
        short = models.Shortcut(self.features, self.strides, self.shortcut, self.conv,
                                self.norm, name="shortcut")(x)
        return self.act(y + short)
'''

TINY = ["--config.num_train_steps=2", "--config.eval_every_steps=2",
        "--config.checkpoint_every_steps=2", "--config.log_every_steps=1",
        "--config.model_kwargs.width=4", "--config.batch_size=8", "--config.data.workers=0"]


@pytest.mark.parametrize("error,code", [
    (errors.ConfigError("bad value"), errors.EXIT_CONFIG),
    (errors.ExtensionUnavailable("no compiler"), errors.EXIT_CONFIG),
    (errors.CheckpointMismatch("another model"), errors.EXIT_CONFIG),
    (errors.WorkdirBusy("another run holds it"), errors.EXIT_BUSY),
    (data.DataError("archive not found"), errors.EXIT_CONFIG),
    (errors.CheckpointNotFound("no checkpoint"), errors.EXIT_NO_CHECKPOINT),
    (errors.CheckpointDamaged("all damaged"), errors.EXIT_NO_CHECKPOINT),
    (errors.TrainingDiverged("nan", step=3), errors.EXIT_DIVERGED),
    (errors.CommandFailed(7, "lane failed"), 7),
    (ValueError("Incompatible shapes for broadcasting"), None),
    (FileNotFoundError("a fork's own file"), None),
    (TypeError("unsupported operand"), None),
    (KeyError("params"), None),
])
def test_exit_code_maps_only_what_validation_checks(error: BaseException, code: int | None
                                                    ) -> None:
    assert errors.exit_code(error) == code


def test_data_error_is_the_errors_module_one() -> None:
    assert data.DataError is errors.DataError and not issubclass(data.DataError, ValueError)
    assert issubclass(errors.ConfigError, ValueError)  # old `except ValueError` still catch it


def test_exit_on_error_one_line_for_config_error_reraises_a_plain_value_error(
        capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e, cli.exit_on_error():
        raise errors.ConfigError("shortcut='Z' is not one of ('A', 'B', 'C', 'none')")
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: shortcut='Z' is not one of ('A', 'B', 'C', 'none')\n"
    bug = ValueError("Incompatible shapes for broadcasting: (8, 32, 32, 1) and (8, 16, 16, 8)")
    with pytest.raises(ValueError) as e, cli.exit_on_error():
        raise bug
    assert e.value is bug and capsys.readouterr().err == ""


def test_validation_raises_config_errors() -> None:
    with pytest.raises(errors.ConfigError, match="'A', 'B', 'C' or 'none'"):
        models.create("resnet20", shortcut="Z")
    with pytest.raises(errors.ConfigError, match="unknown model 'resnet21'"):
        models.create("resnet21")
    from resnet_jax.train import config as config_lib

    c = config_lib.default_config()
    c.momentum = 1.5
    with pytest.raises(errors.ConfigError, match=r"momentum=1.5 must be in \[0, 1\)"):
        config_lib.validate(c)


def test_a_fork_module_that_fails_to_import_keeps_its_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing fork package is a config error; a fork whose own import breaks is its bug."""
    pkg = tmp_path / "fork_imports_missing"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "blocks.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz") as e:
        models.resolve("fork_imports_missing.blocks:Block")
    assert not isinstance(e.value, errors.ConfigError)
    with pytest.raises(errors.ConfigError, match=r"cannot import 'fork_imports_missing\.nope'"):
        models.resolve("fork_imports_missing.nope:Block")


def _train(workdir: Path, *overrides: str, pythonpath: Path | None = None
           ) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath),
                                                          env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"--config={ROOT}/configs/digits.py",
         f"--workdir={workdir}", *TINY, *overrides],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_a_forks_shape_bug_on_the_downsampling_block_prints_its_traceback(
        tmp_path: Path) -> None:
    """The must-show: the fork's jnp.where breaks on stage 2's first block; train.py prints the
    traceback naming the fork's file (not one 'error:' line) and exits 1, not 2."""
    fork = tmp_path / "forks" / "my_fork"
    fork.mkdir(parents=True)
    (fork / "__init__.py").write_text("")
    block_file = fork / "blocks.py"
    block_file.write_text(textwrap.dedent(BAD_BLOCK))
    r = _train(tmp_path / "run", "--config.model_kwargs.block=my_fork.blocks:BadBlock",
               pythonpath=tmp_path / "forks")
    assert r.returncode not in (0, 2), (r.returncode, r.stderr[-3000:])
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback (most recent call last)" in r.stderr, r.stderr[-3000:]
    assert f'File "{block_file}"' in r.stderr, r.stderr[-3000:]
    assert "jnp.where(x[..., :1] > 0, y, 0.0)" in r.stderr  # the fork's own line is shown
    assert "\nValueError: Incompatible shapes for broadcasting" in r.stderr, r.stderr[-1000:]
    assert not any(line.startswith("error: ") for line in r.stderr.splitlines())


def test_a_config_mistake_is_still_one_line_and_exit_2(tmp_path: Path) -> None:
    r = _train(tmp_path / "run", "--config.model_kwargs.shortcut=Z")
    assert r.returncode == errors.EXIT_CONFIG == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    said = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert said == ["error: shortcut='Z' is not one of ('A', 'B', 'C', 'none'); use 'A', 'B', "
                    "'C' or 'none' (plain)."], r.stderr[-3000:]


# The plain ValueErrors left in the library: invariants of its own code (a bug if they fire,
# so a traceback is right), never a check of what a user or a config gives.
INTERNAL_INVARIANTS = (
    "eval batch has no 'image*' key",  # train/step.py: the pipeline's batches
    "expected rank 4 or 5",
    "is stacked but not under a scanned",  # experiments/responses.py: the scanned stages
    "stacked responses must come from",
    "meta is not a format-",  # checkpoint.py: caught there, the checkpoint counts as damaged
    "CRC-32/shape differs",
    "images must be uint8 (N,H,W,C)",  # data/sources.py: what the readers build
    "images but {len(self.labels)} labels",
    "images must be encoded files",
    "outside the resized",  # data/augment.py: crops the recipe computes
    "batch has no image* key",
)


def test_every_validation_raises_a_config_error() -> None:
    """A ``raise ValueError``/``FileNotFoundError`` in resnet_jax/ or train.py is one of the
    internal invariants above; a check of config, usage or input raises ConfigError (or
    DataError, a checkpoint error), which the entry points print as one line."""
    found = []
    for path in sorted([*(ROOT / "resnet_jax").rglob("*.py"), ROOT / "train.py"]):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if "raise ValueError(" in line or "raise FileNotFoundError(" in line:
                statement = " ".join(s.strip() for s in lines[i:i + 3])
                statement = statement.replace('" f"', "").replace('" "', "")
                if not any(fragment in statement for fragment in INTERNAL_INVARIANTS):
                    found.append(f"{path.relative_to(ROOT)}:{i + 1}: {line.strip()}")
    assert not found, "validation raising a plain ValueError (use errors.ConfigError):\n" + (
        "\n".join(found))
