"""Train-step throughput of resnet_jax against baselines timed interleaved in the same run.

    python benchmarks/train_step.py --baseline plain --baseline torch --torch-channels-last
    python benchmarks/train_step.py --arch resnet50 --stride-in 3x3 --batch 32 --dtype bfloat16
    python benchmarks/train_step.py --conv onednn --baseline xla --baseline torch

``--conv`` defaults to "auto", train.py's default (oneDNN on a CPU where it builds).

Every program (resnet_jax's step, then each ``--baseline``) is built and compiled first, then
timed in ``--blocks`` blocks of ``--steps`` steps each, the programs taking turns within a block
(the first one rotating), so the speed drift of a shared machine moves all of them alike. Prints
the machine and devices, compile time, the median and spread of the step time over all timed
steps, images/s, achieved FLOP/s (3 x the forward mult-adds x 2) and its fraction of a matmul
measured in the same run, peak memory, and per baseline the median of the per-block ratios and
their min-max; ``--json`` adds one JSON line. The torch baseline runs in a worker process of its
own (``harness.Worker``), with the OpenMP settings a PyTorch user would have.
"""

from __future__ import annotations

import argparse
import contextlib

import baselines
import harness
import numpy as np

from resnet_jax import models, parallel
from resnet_jax.summary import parse_override, summarize
from resnet_jax.train.config import resolve_conv


def build(args: argparse.Namespace) -> models.ResNet:
    """resnet_jax's model from the flags (``--conv`` becomes ``conv_impl`` unless "xla")."""
    overrides = {"dtype": args.dtype}
    if args.width:
        overrides["width"] = args.width
    if args.stride_in:
        overrides["stride_in"] = args.stride_in
    if getattr(args, "conv", "xla") == "auto":
        args.conv = resolve_conv("auto")  # after set_cpu_devices: starts JAX
    if getattr(args, "conv", "xla") != "xla":
        overrides["conv_impl"] = args.conv
    for item in args.override:
        key, value = item.split("=", 1)
        overrides[key] = parse_override(f"{key}={value}")[1]
    try:
        model = models.create(args.arch, **overrides)
    except TypeError as e:
        if "conv_impl" in overrides and "conv_impl" in str(e):
            raise SystemExit(f"--conv {args.conv}: this resnet_jax's models have no conv_impl "
                             f"field yet ({e})") from e
        raise
    if args.image is None:
        args.image = 32 if model.stem == "cifar" else 224
    return model


def benchmark(train: bool, argv: list[str] | None, description: str) -> dict:
    """Time resnet_jax's train_step (``train``) or eval_step interleaved with the baselines."""
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

    names = list(dict.fromkeys(args.baseline))
    # torch runs in a process of its own (harness.Worker: OpenMP's settings are per process)
    with contextlib.ExitStack() as stack:
        worker = stack.enter_context(harness.Worker()) if "torch" in names else None
        programs = [baselines.resnet_jax_program("resnet_jax", model, batch, args.parallel,
                                                 train=train)]
        programs += [baselines.build_baseline(name, model, batch, args, train=train,
                                              worker=worker) for name in names]
        result = harness.time_interleaved(programs, blocks=args.blocks,
                                          steps_per_block=args.steps, warmup=args.warmup)
    # mult-adds x 2 FLOPs; a train step is ~3 forward passes (forward, input and weight grads)
    flops = (3 if train else 1) * 2 * summarize(baselines.xla_model(model), args.image).mult_adds
    return harness.report("train_step" if train else "eval_step", args, result, flops, peak)


def main(argv: list[str] | None = None) -> dict:
    return benchmark(True, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
