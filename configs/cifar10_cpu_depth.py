"""A CPU-sized depth study on real CIFAR-10: Fig. 6's effect at 2,000 iterations.

    python -m resnet_jax.experiments depth --config configs/cifar10_cpu_depth.py \
        --archs plain20,plain56,resnet20,resnet56 --workdir runs/cifar10_cpu_depth --jobs 2 \
        --config.data.archive=/path/to/cifar-10-python.tar.gz
    python -m resnet_jax.experiments responses --workdir runs/cifar10_cpu_depth

The paper's nets and recipe (``configs/cifar10.py``: batch 128, SGD 0.9, weight decay 1e-4,
§4.2 augmentation), but 2,000 iterations (~5 epochs): lr 0.1, 0.01 from 1,500, 0.001 from
1,900. Evaluates every 500 steps. Resumable: rerun the same command after an interruption.

Expect (training error at 2,000 iterations; an independent PyTorch run of this budget gave
plain20 22%, plain56 66%, resnet20 18%, resnet56 33%): what the budget shows is the
degradation problem (§4.1, Fig. 6 left): the 56-layer plain net has a much HIGHER training
error than the 20-layer one, and residual learning removes most of the gap (resnet56 far below
plain56). What it cannot show: ResNet-56 beating ResNet-20 (at this budget resnet56 still
trails resnet20; the deeper net overtakes only over the full 64k schedule, Table 6), test errors
near Table 6's (8.75% / 6.97%), or Fig. 7's response stds of converged nets.

Measured here (2026-11-27, real CIFAR-10, training / test error %): plain20 22.66 / 22.55,
plain56 68.44 / 65.92, resnet20 19.88 / 19.76, resnet56 36.41 / 34.66 (README).

Cost: 4 nets x 2,000 steps x 128 images = 1M training images. On this project's 2-core CPU,
``--jobs 2`` trains two nets at once, one per core (1.5x the images/s of one net on both cores):
the 56-layer nets at ~45 img/s each (~95 min), then the 20-layer nets (~30 min): about 2 h 10
min in all (2 h 26 min measured, with other work on the machine). The responses command then
takes ~30 s per net on the 10k test images.
Not a paper number.
"""

import importlib.util
import os

import ml_collections


def get_config(arch: str = "resnet20") -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar10.py")
    spec = importlib.util.spec_from_file_location("configs_cifar10", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arch)
    c.num_train_steps = 2_000
    c.lr_boundaries = (1_500, 1_900)
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 500
    c.log_every_steps = 20
    return c
