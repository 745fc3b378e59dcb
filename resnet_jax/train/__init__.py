"""Training engine: TrainState (+ EMA), optimiser + schedules, train/eval steps, the loop,
evaluation and ``--mode eval`` (``evaluate``), the run's checkpoint policy (``policy``)."""

from resnet_jax.train.state import EMATrainState, TrainState, create_train_state
from resnet_jax.train.step import eval_step, train_step

__all__ = ["EMATrainState", "TrainState", "create_train_state", "eval_step", "train_step"]
