"""Eval-step (inference) throughput of resnet_jax against baselines timed in the same run.

    python benchmarks/eval_step.py --arch resnet20 --batch 128 --baseline plain --baseline torch

Times ``resnet_jax.train.step.eval_step`` (forward in eval mode + masked sums) under
``parallel.compile``; FLOPs are the forward mult-adds x 2. Same output as train_step.py.
"""

from __future__ import annotations

import argparse

import baselines
import harness
import jax
import numpy as np
from train_step import build

from resnet_jax import parallel
from resnet_jax.summary import summarize
from resnet_jax.train import config as config_lib
from resnet_jax.train.state import create_train_state
from resnet_jax.train.step import eval_step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_args(parser)
    args = parser.parse_args(argv)
    model = build(args)
    parallel.check_batch_size(args.batch, "batch")
    batch = harness.random_batch(args, model.num_classes, args.image)
    batch["mask"] = np.ones((args.batch,), np.float32)
    peak = None if args.no_peak else harness.matmul_peak_flops()

    state = create_train_state(
        config_lib.default_config(), model, jax.random.key(0), image_shape=batch["image"].shape[1:]
    )
    step = parallel.compile(eval_step, args.parallel, donate_state=False)
    state = step.replicate(state)
    device_batch = step.shard(batch)

    def run() -> None:
        jax.block_until_ready(step(state, device_batch))

    timing = harness.time_steps(run, run, args.warmup, args.steps)
    flops = 2 * summarize(model, args.image).mult_adds

    results = {
        name: baselines.time_baseline(name, model, batch, args, train=False)
        for name in args.baseline
    }
    return harness.report("eval_step", args, timing, flops, peak, results)


if __name__ == "__main__":
    main()
