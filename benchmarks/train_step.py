"""Train-step throughput of resnet_jax against baselines timed in the same run.

    python benchmarks/train_step.py --arch resnet20 --batch 128 --baseline plain --baseline torch
    python benchmarks/train_step.py --arch resnet50 --stride-in 3x3 --batch 32 --dtype bfloat16

Prints the machine and devices, compile time, the median and spread of the step time over the
timed steps after warm-up, images/s, achieved FLOP/s (3 x the forward mult-adds x 2) and its
fraction of a matmul measured in the same run, and peak memory; ``--json`` adds one JSON line.
"""

from __future__ import annotations

import argparse

import baselines
import harness
import jax
import numpy as np

from resnet_jax import models, parallel
from resnet_jax.summary import parse_override, summarize
from resnet_jax.train import config as config_lib
from resnet_jax.train.state import create_train_state
from resnet_jax.train.step import eval_step, train_step


def build(args: argparse.Namespace) -> models.ResNet:
    overrides = {"dtype": args.dtype}
    if args.width:
        overrides["width"] = args.width
    if args.stride_in:
        overrides["stride_in"] = args.stride_in
    for item in args.override:
        key, value = item.split("=", 1)
        overrides[key] = parse_override(f"{key}={value}")[1]
    model = models.create(args.arch, **overrides)
    if args.image is None:
        args.image = 32 if model.stem == "cifar" else 224
    return model


def benchmark(train: bool, argv: list[str] | None, description: str) -> dict:
    """Time resnet_jax's train_step (``train``) or eval_step, then the requested baselines."""
    parser = argparse.ArgumentParser(description=description)
    harness.add_common_args(parser)
    args = parser.parse_args(argv)
    parallel.set_cpu_devices(args.cpu_devices)  # before anything touches a device
    model = build(args)
    parallel.check_batch_size(args.batch, "batch")
    batch = harness.random_batch(args, model.num_classes, args.image)
    if not train:
        batch["mask"] = np.ones((args.batch,), np.float32)
    peak = None if args.no_peak else harness.matmul_peak_flops()

    state = create_train_state(
        config_lib.default_config(), model, jax.random.key(0), image_shape=batch["image"].shape[1:]
    )
    step = parallel.compile(train_step if train else eval_step, args.parallel,
                            donate_state=train)
    holder = {"state": step.replicate(state)}
    device_batch = step.shard(batch)
    rng = jax.random.PRNGKey(1)

    def run() -> None:
        if train:
            holder["state"], metrics = step(holder["state"], device_batch, rng)
        else:
            metrics = step(holder["state"], device_batch)
        jax.block_until_ready(metrics)

    timing = harness.time_steps(run, run, args.warmup, args.steps)
    # mult-adds x 2 FLOPs; a train step is ~3 forward passes (forward, input and weight grads)
    flops = (3 if train else 1) * 2 * summarize(model, args.image).mult_adds
    results = {
        name: baselines.time_baseline(name, model, batch, args, train=train)
        for name in args.baseline
    }
    return harness.report("train_step" if train else "eval_step", args, timing, flops, peak,
                          results)


def main(argv: list[str] | None = None) -> dict:
    return benchmark(True, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
