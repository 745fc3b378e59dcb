"""Train and evaluate one config.

    python train.py --config configs/cifar10.py:resnet56 --workdir runs/r56 \
        [--config.field=value ...]

A config error (unknown model or dataset, bad value, batch not divisible by the devices) is
printed as one line and exits with status 2 before anything is compiled.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from resnet_jax.data import DataError
from resnet_jax.train.loop import train_and_evaluate

config_flags.DEFINE_config_file("config", None, "configs/<family>.py[:<arch>]", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for metrics, TensorBoard events, checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except (ValueError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
