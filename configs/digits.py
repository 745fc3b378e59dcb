"""Offline quick start: a small CIFAR-style ResNet on scikit-learn's bundled digits.

    python train.py --config configs/digits.py --workdir runs/digits

1797 real 8x8 scans (1437 train / 360 test, fixed split), upscaled to 32x32x3, trained with the
CIFAR recipe of §4.2 (pad-4 crop, no flip for digits, per-pixel mean) at a reduced width and a
short piecewise schedule. No download; runs on a laptop CPU.

Expect: MEASURED_RESULT
Not a paper number: the paper has no digits experiment; this checks the engine end to end.
"""

import ml_collections

from resnet_jax.train.config import default_config


def get_config() -> ml_collections.ConfigDict:
    c = default_config()
    c.model = "resnet20"
    c.model_kwargs.width = 8
    c.dataset = "digits"
    c.batch_size = 64
    c.eval_batch_size = 360
    c.num_train_steps = 600
    c.learning_rate = 0.1
    c.schedule = "piecewise"
    c.lr_boundaries = (400, 520)
    c.warmup_steps = 0
    c.eval_every_steps = 200
    c.log_every_steps = 50
    c.checkpoint_every_steps = 200
    return c
