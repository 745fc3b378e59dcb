"""Training engine: TrainState, optimiser + schedules, train/eval steps, the loop."""

from resnet_jax.train.state import TrainState, create_train_state
from resnet_jax.train.step import eval_step, train_step

__all__ = ["TrainState", "create_train_state", "eval_step", "train_step"]
