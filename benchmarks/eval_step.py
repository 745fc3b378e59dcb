"""Eval-step (inference) throughput of resnet_jax against baselines timed interleaved in one run.

    python benchmarks/eval_step.py --baseline plain --baseline torch --torch-channels-last

Times ``resnet_jax.train.step.eval_step`` (forward in eval mode + masked sums) under
``parallel.compile``; FLOPs are the forward mult-adds x 2. Same flags (``--blocks``, ``--steps``
per block, ``--conv``, ``--baseline plain|torch|xla``) and output as train_step.py.
"""

from __future__ import annotations

from train_step import benchmark


def main(argv: list[str] | None = None) -> dict:
    return benchmark(False, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
