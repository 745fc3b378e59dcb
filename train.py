"""Train and evaluate one config.

    python train.py --config configs/cifar10.py:resnet56 --workdir runs/r56 \
        [--config.field=value ...]

    python train.py --config configs/cifar10.py:resnet56 --workdir runs/r56 --mode eval

Checkpoints go to ``workdir/checkpoints`` (the policy: ``resnet_jax/train/policy.py``);
rerunning the same command on a workdir with checkpoints resumes from the newest one.
``--mode eval`` evaluates that checkpoint with the config's test protocol (prints the errors,
appends to ``workdir/eval.jsonl``; ``resnet_jax/train/evaluate.py``).

Exit status:
  0    done.
  1    a bug, e.g. a fork's block that breaks while tracing (a shape error JAX raises as
       ValueError included): Python's traceback, naming the file and line.
  2    config or data error (``errors.ConfigError``, ``data.DataError``: unknown model or
       dataset, bad value, batch not divisible by the devices, a missing archive: before
       anything is compiled; or a checkpoint of another model/config in the workdir), printed
       as one line.
  3    non-finite loss or state; the message names the step; the newest checkpoint is the last
       good one (``errors.EXIT_DIVERGED``).
  4    no readable checkpoint (all damaged, or none for ``--mode eval``;
       ``errors.EXIT_NO_CHECKPOINT``).
  5    another run holds the workdir (its lock, ``workdir/.lock``, is live; one run per
       workdir, ``--mode eval`` included); nothing was touched (``errors.EXIT_BUSY``).
  143  SIGTERM (130: SIGINT): the current step was finished and saved, rerun to resume
       (128 + signal number, ``errors.EXIT_SIGTERM`` / ``EXIT_SIGINT``). A second signal
       kills the process at once.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from resnet_jax import cli
from resnet_jax.train import config as config_lib
from resnet_jax.train.evaluate import evaluate_checkpoint
from resnet_jax.train.loop import train_and_evaluate

config_flags.DEFINE_config_file("config", None, "configs/<family>.py[:<arch>]", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for metrics, TensorBoard events, checkpoints.")
flags.DEFINE_enum("mode", "train", ["train", "eval"],
                  "train (resuming from workdir/checkpoints) or eval (the newest checkpoint).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; -v 0 shows it
    with cli.exit_on_error():
        # The run's length given on the command line wins over the config file's other unit.
        config_lib.length_from_overrides(
            flags.FLAGS.config, config_flags.get_override_values(flags.FLAGS["config"]))
        if flags.FLAGS.mode == "eval":
            evaluate_checkpoint(flags.FLAGS.config, flags.FLAGS.workdir)
        else:
            train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)

if __name__ == "__main__":
    app.run(main)
