"""Eval-step (inference) throughput of resnet_jax against baselines timed in the same run.

    python benchmarks/eval_step.py --arch resnet20 --batch 128 --baseline plain --baseline torch

Times ``resnet_jax.train.step.eval_step`` (forward in eval mode + masked sums) under
``parallel.compile``; FLOPs are the forward mult-adds x 2. Same output as train_step.py.
"""

from __future__ import annotations

from train_step import benchmark


def main(argv: list[str] | None = None) -> dict:
    return benchmark(False, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
