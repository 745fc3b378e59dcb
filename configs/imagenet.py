"""ImageNet 2012 with the paper's recipe (§3.4, Tables 2-4).

    python -m resnet_jax.data.prepare imagenet2012 --manual_dir /data/imagenet --data_dir /data/tfds
    python train.py --config configs/imagenet.py:resnet50 --workdir runs/imagenet_resnet50 \
        --config.data.data_dir=/data/tfds

Architectures: resnet18/34/50/101/152 (shortcut option B), plain18/34.
Recipe: batch 256, SGD momentum 0.9, weight decay 1e-4, lr 0.1 "divided by 10 when the error
plateaus" (§3.4) -- here at epochs 30 and 60, stopping at 90 (the fb.resnet.torch convention;
the paper ran up to 60e4 iterations = ~120 epochs: ``--config.num_epochs=120``). Scale
augmentation (shorter side in [256, 480]), 224 crop, flip, per-channel mean, PCA colour noise;
BN after every conv, no dropout. The paper's 8 GPUs compute BN over 32 images each: use
``--config.parallel=pmap --config.bn_sync=False`` (or jit, which then uses per-device groups).
``--config.scale_lr_by_batch=True`` scales lr 0.1 by batch/256 for other batch sizes.

Paper top-1 / top-5 error, 10-crop testing (Tables 2-3): plain18 27.94, plain34 28.54,
resnet18 27.88, resnet34 (B) 24.52 / 7.46, resnet50 22.85 / 6.71, resnet101 21.75 / 6.05,
resnet152 21.43 / 5.71. Evaluation during training uses one centre crop (cheaper); the paper's
10-crop number: ``--config.data.eval_protocol=ten_crop``.

Beyond the paper: ``resnet50_large_batch`` (any ``<arch>_large_batch``) is Goyal et al. 2017,
*Accurate, Large Minibatch SGD*, for 32-256 accelerators: batch 8192, lr 0.1 x batch/256 (3.2)
reached by a linear warm-up from 0.1 over 5 epochs, /10 at epochs 30, 60 and 80 of 90, the last
BN scale of every residual block initialised to zero, no weight decay on BN/bias (the default
mask); their 23.74 % top-1 (ResNet-50, batch 8k) against 23.60 % at 256. Other batch sizes:
``--config.batch_size=N`` (lr and warm-up follow). Beyond 8k, ``--config.optimizer=lars``
(You et al. 2017) is available (trust coefficient ``lars_trust_coefficient``; not tuned here).

Cost: 90 epochs x 1.28M images = 115M images; ResNet-50 is 3.8 GFLOPs per forward pass
(Table 1), so ~1.3e18 FLOPs per run -- many accelerator-hours (not measured on this machine).
"""

import ml_collections

from resnet_jax.train.config import default_config

IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config(arch: str = "resnet50") -> ml_collections.ConfigDict:
    large_batch = arch.endswith("_large_batch")
    arch = arch.removesuffix("_large_batch")
    c = default_config()
    c.model = arch
    c.dataset = "imagenet2012"
    c.batch_size = 256
    c.eval_batch_size = 256  # a power of two splits over any power-of-two device count
    c.num_epochs = 90.0  # the run's length: round(90 * num_train / batch_size) steps
    c.num_train_steps = -1  # from num_epochs; --config.num_train_steps=N alone runs N steps
    c.learning_rate = 0.1
    c.schedule = "piecewise"
    c.lr_boundaries = (30, 60)
    c.lr_boundaries_unit = "epochs"
    c.momentum = 0.9
    c.weight_decay = 1e-4
    c.warmup_steps = 0
    epoch = IMAGENET_TRAIN_IMAGES // 256  # steps per epoch at batch 256
    c.eval_every_steps = epoch
    c.checkpoint_every_steps = epoch
    c.log_every_steps = 100
    c.data.pipeline = "imagenet"
    if large_batch:  # Goyal et al. 2017 (not the paper's recipe)
        c.batch_size = 8192
        c.scale_lr_by_batch = True  # 0.1 x 8192 / 256 = 3.2
        c.warmup_type, c.warmup_lr, c.warmup_epochs = "linear", 0.1, 5.0
        c.lr_boundaries = (30, 60, 80)
        c.model_kwargs.zero_init_last_bn = True
        c.eval_batch_size = 1024
        c.eval_every_steps = c.checkpoint_every_steps = IMAGENET_TRAIN_IMAGES // 8192
        c.log_every_steps = 20
    return c
