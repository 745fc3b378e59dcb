"""What each JAX transform of a resnet_jax model costs, timed interleaved against ``jax.grad``.

    python benchmarks/transforms.py                       # resnet20, default kernels, batch 32
    python benchmarks/transforms.py --conv onednn --batch 32
    python benchmarks/transforms.py --width 4 --batch 2 --image 8 --blocks 1 --steps 1  # smoke

The functional promise, checked on the model a user gets from ``models.create``: the training
loss (train=True, batch statistics of the batch) is differentiated by every transform below,
each jitted; the times are medians over interleaved blocks (``harness.time_interleaved``) and
every ratio is against ``grad`` measured in the same run. Transforms:

* ``grad``: reverse mode, the train step's gradient (the baseline);
* ``jvp``: one forward-mode directional derivative (``jax.jvp``);
* ``linearize``: ``jax.linearize`` then one application of the linear map;
* ``hvp``: a Hessian-vector product, forward over reverse (``jvp`` of ``grad``);
* ``grad_of_grad``: the gradient of the squared gradient norm (reverse over reverse);
* ``per_example``: per-example gradients, ``vmap`` of ``grad`` over the batch.

A transform that a path cannot apply fails with JAX's own error; nothing falls back.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import harness
import jax
import jax.numpy as jnp
import numpy as np
import optax

from resnet_jax import models, parallel

TRANSFORMS = ("grad", "jvp", "linearize", "hvp", "grad_of_grad", "per_example")


def transform_fns(model: Any, variables: dict[str, Any]) -> dict[str, Callable[..., Any]]:
    """``name -> jitted fn(params, tangent, images, labels)`` for every transform."""
    batch_stats = variables.get("batch_stats", {})

    def loss(params: Any, images: jax.Array, labels: jax.Array) -> jax.Array:
        logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grad = jax.grad(loss)

    def jvp(p, t, x, y):
        return jax.jvp(lambda p: loss(p, x, y), (p,), (t,))

    def linearize(p, t, x, y):
        value, f_jvp = jax.linearize(lambda p: loss(p, x, y), p)
        return value, f_jvp(t)

    def hvp(p, t, x, y):
        return jax.jvp(lambda p: grad(p, x, y), (p,), (t,))[1]

    def grad_of_grad(p, t, x, y):
        return jax.grad(lambda p: optax.tree.norm(grad(p, x, y), squared=True))(p)

    def per_example(p, t, x, y):
        one = lambda p, xi, yi: grad(p, xi[None], yi[None])
        return jax.vmap(one, in_axes=(None, 0, 0))(p, x, y)

    fns = {"grad": lambda p, t, x, y: grad(p, x, y), "jvp": jvp, "linearize": linearize,
           "hvp": hvp, "grad_of_grad": grad_of_grad, "per_example": per_example}
    return {name: jax.jit(fns[name]) for name in TRANSFORMS}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet20", help="registry name")
    parser.add_argument("--conv", default="xla", choices=models.CONV_IMPLS,
                        help="the model's conv_impl")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image", type=int, default=None, help="image side (default 32 / 224)")
    parser.add_argument("--width", type=int, default=None, help="override the model width")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed calls per program per block")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--only", action="append", choices=TRANSFORMS, default=[],
                        help="time only these transforms (repeatable; grad always runs)")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args(argv)
    parallel.keep_freed_memory()
    overrides: dict[str, Any] = {"conv_impl": args.conv}
    if args.width:
        overrides["width"] = args.width
    model = models.create(args.arch, **overrides)
    image = args.image or (32 if model.stem == "cifar" else 224)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((args.batch, image, image, 3), dtype=np.float32))
    labels = jnp.asarray(rng.integers(0, model.num_classes, (args.batch,), dtype=np.int32))
    variables = models.init(model, jax.random.key(0), (1, image, image, 3))
    params = variables["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    tangent = jax.tree.unflatten(
        tree, [jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves, strict=True)])

    names = ["grad", *[t for t in TRANSFORMS if t != "grad" and (not args.only or t in args.only)]]
    fns = transform_fns(model, variables)
    programs = [
        harness.Program(name, lambda f=fns[name]: jax.block_until_ready(
            f(params, tangent, images, labels)))
        for name in names
    ]
    result = harness.time_interleaved(programs, blocks=args.blocks, steps_per_block=args.steps,
                                      warmup=args.warmup)
    m = harness.machine()
    print(harness.machine_line(m))
    print(f"transforms of {args.arch} (conv {args.conv}), train-mode loss, batch {args.batch}, "
          f"image {image}; {args.warmup} warm-up + {result.blocks} blocks x {args.steps} "
          "timed calls, interleaved; ratio = time / grad's time in the same block")
    out: dict[str, Any] = {"benchmark": "transforms", "arch": args.arch, "conv": args.conv,
                           "batch": args.batch, "image": image, **m}
    print(f"  {'transform':<13} {'compile s':>9} {'median ms':>10} {'x grad':>7} {'(min-max)':>12}")
    for name in names:
        t = result.timing(name)
        r = result.ratio("grad", name) if name != "grad" else harness.Ratio(1.0, 1.0, 1.0)
        out[name] = {"compile_seconds": round(t.compile_seconds, 3),
                     "median_seconds": t.median, "x_grad": r.median,
                     "x_grad_min": r.min, "x_grad_max": r.max}
        print(f"  {name:<13} {t.compile_seconds:9.1f} {t.median * 1e3:10.1f} {r.median:7.2f} "
              f"{f'({r.min:.2f}-{r.max:.2f})':>12}")
    if args.json:
        print(json.dumps(out, default=float))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
