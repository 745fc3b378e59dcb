"""Per-stage parameters and multiply-adds, counted from the module itself (no memory used).

``python -m resnet_jax.summary resnet50 [--image 224] [--override stride_in=3x3]`` prints a table
with stem, each stage, the classifier and the totals; :func:`summarize` returns the same numbers.
Multiply-adds are those of convolutions and the fully connected layer (the paper's "FLOPs" in
Table 1 are multiply-adds); BN, ReLU, additions and pooling are not counted, as in Table 1.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax import models
from resnet_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Row:
    """One top-level part of a network: ``stem``, ``stage1``..``stageN`` or ``fc``."""

    name: str
    output_shape: tuple[int, ...]
    params: int
    mult_adds: int


@dataclasses.dataclass(frozen=True)
class Summary:
    model: str
    image_size: int
    rows: tuple[Row, ...]

    @property
    def params(self) -> int:
        """Learnable parameters: BN scale/offset included, running statistics excluded."""
        return sum(r.params for r in self.rows)

    @property
    def mult_adds(self) -> int:
        """Multiply-adds for one image."""
        return sum(r.mult_adds for r in self.rows)

    def table(self) -> str:
        head = f"{'part':<8} {'output shape':<18} {'params':>14} {'mult-adds':>16}"
        lines = [f"{self.model} at {self.image_size}x{self.image_size}", head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r.name:<8} {'x'.join(map(str, r.output_shape)):<18} "
                f"{r.params:>14,} {r.mult_adds:>16,}"
            )
        lines.append("-" * len(head))
        lines.append(
            f"{'total':<8} {'':<18} {self.params:>14,} {self.mult_adds:>16,}"
            f"   ({self.mult_adds / 1e9:.3f} G mult-adds, {self.params / 1e6:.2f} M params)"
        )
        return "\n".join(lines)


def default_image_size(model: nn.Module) -> int:
    if isinstance(model, models.ResNet):
        return 32 if model.stem == "cifar" else 224
    return int(model.default_image_size)  # other registered nets (VGG) declare theirs


def _trace_init(module: nn.Module, image_size: int, interceptor: Any) -> Any:
    """``module.init`` on one image under ``jax.eval_shape`` (no memory) with ``interceptor``
    on every module method; the variables' shapes."""

    def init() -> Any:
        with nn.intercept_methods(interceptor):
            return module.init(
                jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)), train=False
            )

    return jax.eval_shape(init)


def repeats(module: nn.Module, path: tuple[str, ...]) -> int:
    """How many blocks the submodule at ``path`` stands for: one scanned body (``stageK/blocks``)
    stands for blocks 2..n of stage K, anything else for itself."""
    if path[1:2] == ("blocks",):
        return module.stage_sizes[int(path[0].removeprefix("stage")) - 1] - 1
    return 1


@dataclasses.dataclass(frozen=True)
class Convolution:
    """One distinct convolution of a network: NHWC input ``side`` x ``side`` x ``cin``,
    ``kernel`` x ``kernel`` to ``cout`` at ``stride``, symmetric ``padding``; ``count`` layers
    of the network have it."""

    side: int
    cin: int
    cout: int
    kernel: int
    stride: int
    padding: int
    count: int


def convolutions(
    model: str | nn.Module, image_size: int | None = None, **overrides: Any
) -> tuple[Convolution, ...]:
    """The distinct square convolutions of ``model`` at ``image_size`` with how many layers
    have each, in call order (scanned blocks counted as the blocks they stand for)."""
    module = models.create(model, **overrides) if isinstance(model, str) else model
    if image_size is None:
        image_size = default_image_size(module)
    module = module.clone(return_features=False)
    seen: dict[tuple[str, ...], tuple[int, ...]] = {}

    def record(next_fun, args, kwargs, context):
        mod = context.module
        if isinstance(mod, nn.Conv) and context.method_name == "__call__":
            x = args[0]
            (kh, kw), cin, cout = mod.kernel_size, x.shape[-1], mod.features
            strides = mod.strides or 1
            strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
            pad = mod.padding
            if isinstance(pad, str):
                pad = jax.lax.padtype_to_pads(x.shape[1:3], (kh, kw), strides, pad)
            if (kh != kw or len(set(strides)) != 1
                    or len({p for pair in pad for p in pair}) != 1 or x.shape[1] != x.shape[2]):
                raise ConfigError(f"{'/'.join(mod.path)}: only square convolutions with "
                                  f"symmetric padding are listed (kernel {kh}x{kw}, strides "
                                  f"{strides}, padding {pad}, input {x.shape})")
            geometry = (x.shape[1], cin, cout, kh, strides[0], pad[0][0])
            seen[mod.path] = (*geometry, repeats(module, mod.path))
        return next_fun(*args, **kwargs)

    _trace_init(module, image_size, record)
    counts: dict[tuple[int, ...], int] = {}
    for *geometry, n in seen.values():
        counts[tuple(geometry)] = counts.get(tuple(geometry), 0) + n
    return tuple(Convolution(*g, count=n) for g, n in counts.items())


def summarize(
    model: str | nn.Module, image_size: int | None = None, **overrides: Any
) -> Summary:
    """Parameters and multiply-adds of every top-level part of ``model`` for one image."""
    name = model if isinstance(model, str) else type(model).__name__
    module = models.create(model, **overrides) if isinstance(model, str) else model
    if image_size is None:
        image_size = default_image_size(module)
    module = module.clone(return_features=False)

    macs: dict[tuple[str, ...], int] = {}
    shapes: dict[str, tuple[int, ...]] = {}

    def count(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        mod = context.module
        if context.method_name != "__call__" or not mod.path:
            return out
        top = mod.path[0]
        if len(mod.path) == 1 and hasattr(out, "shape"):
            shapes[top] = tuple(out.shape[1:])
        if isinstance(mod, nn.Conv | nn.Dense):
            kernel = mod.variables["params"]["kernel"]
            # per output position: k_h * k_w * c_in/groups * c_out
            n = math.prod(out.shape[1:-1]) * math.prod(kernel.shape)
            macs[mod.path] = n * repeats(module, mod.path)  # by path: scan may trace twice
        return out

    variables = _trace_init(module, image_size, count)
    params = variables["params"]
    order = [*shapes, *(k for k in params if k not in shapes)]  # call order: stem first
    rows = [
        Row(
            top,
            shapes.get(top, ()),
            sum(math.prod(x.shape) for x in jax.tree.leaves(params.get(top, {}))),
            sum(n for path, n in macs.items() if path[0] == top),
        )
        for top in order
    ]
    return Summary(name, image_size, tuple(rows))


def parse_override(text: str) -> tuple[str, Any]:
    """``"shortcut=B"`` -> ``("shortcut", "B")``; values are Python literals where they parse."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"override {text!r} is not FIELD=VALUE, e.g. shortcut=B")
    key, value = text.split("=", 1)
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help=f"one of: {', '.join(models.names())}")
    parser.add_argument("--image", type=int, default=None, help="input side (default 32 / 224)")
    parser.add_argument(
        "--override", action="append", type=parse_override, default=[],
        help="FIELD=VALUE model override, repeatable (e.g. shortcut=B, stride_in=3x3, depth=1202)",
    )
    args = parser.parse_args(argv)
    try:
        summary = summarize(args.model, args.image, **dict(args.override))
    except ConfigError as e:  # a bad name or field; a fork's bug keeps its traceback
        parser.exit(2, f"error: {e}\n")
    print(summary.table())


if __name__ == "__main__":
    main()
