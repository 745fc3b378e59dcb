"""CIFAR-10 with the paper's recipe (§4.2, Table 6, Fig. 6).

    python train.py --config configs/cifar10.py:resnet56 --workdir runs/cifar10_resnet56

Architectures: resnet20/32/44/56/110/1202 and plain20/32/44/56/110 (shortcut option A).
Recipe: batch 128, SGD momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at 32k and 48k
iterations, stop at 64k (~164 epochs); 4-pixel pad + random 32x32 crop + flip, per-pixel mean
subtracted; the test image is the original 32x32 (§4.2). ResNet-110 and -1202 first train at
lr 0.01 for 400 iterations ("until the training error is below 80%"), then go back to 0.1.
The paper trains on two GPUs (BN over 64 images each): ``--config.bn_sync=False`` on 2 devices.

Paper test error (Table 6): resnet20 8.75%, resnet32 7.51%, resnet44 7.17%, resnet56 6.97%,
resnet110 6.43% (best; 6.61±0.16 over 5 runs), resnet1202 7.93%. Plain nets get worse with
depth (Fig. 6 left). The paper held out 5k training images only to pick the schedule; set
``--config.data.validation_split=5000`` for that setting.

Cost: 64k steps x 128 images = 8.2M images. Compute per image is ~41 MFLOPs x 3 for ResNet-20,
~125 for ResNet-56, ~253 for ResNet-110 (forward); not measured on this machine (2 CPU cores);
on one modern GPU a ResNet-56 run is roughly an hour (estimate, unmeasured here). Data: TFDS
``cifar10`` or ``--config.data.archive=/path/cifar-10-python.tar.gz`` (offline).
"""

import ml_collections

from resnet_jax.train.config import default_config

WARMUP_ARCHS = ("resnet110", "resnet1202", "plain110")


def get_config(arch: str = "resnet56") -> ml_collections.ConfigDict:
    c = default_config()
    c.model = arch
    c.dataset = "cifar10"
    c.batch_size = 128
    c.eval_batch_size = 512  # a power of two splits over any power-of-two device count
    c.num_train_steps = 64_000
    c.learning_rate = 0.1
    c.schedule = "piecewise"
    c.lr_boundaries = (32_000, 48_000)
    c.lr_boundaries_unit = "steps"
    c.momentum = 0.9
    c.weight_decay = 1e-4
    # §4.2: "we use 0.01 to warm up the training until the training error is below 80% (about
    # 400 iterations), and then go back to 0.1" for the 110- and 1202-layer nets.
    c.warmup_steps = 400 if arch in WARMUP_ARCHS else 0
    c.warmup_type = "constant"
    c.warmup_lr = 0.01
    c.eval_every_steps = 2_000
    c.log_every_steps = 100
    c.checkpoint_every_steps = 2_000
    return c
