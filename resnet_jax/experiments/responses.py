"""Fig. 7: standard deviations of the layer responses of trained nets on the test set.

§4.2: "the responses are the outputs of each 3x3 layer, after BN and before other nonlinearity
(ReLU/addition)". What is computed, per layer: the output of every BatchNorm that follows a 3x3
convolution (``bn1``/``bn2`` of a basic block, ``bn2`` of a bottleneck, the CIFAR stem's ``bn``;
not 1x1 shortcut or bottleneck BNs, not a 7x7 stem), with BN in inference mode (running
statistics), on every test example (padding masked out). The std is ONE number per layer: the
population standard deviation over all test examples, spatial positions and channels together.

The activations are read through Flax (``capture_intermediates`` with a filter), not from a copy
of the model. Scanned stages (``stage{k}/blocks``) give stacked intermediates whose leading axis
is blocks 1..n-1; they are unstacked into ``stage{k}/block{i}`` in execution order. One streaming
pass: per batch and layer the device computes (count, mean, sum of squared deviations from the
batch mean) in float32; the host merges batches in float64 (Chan et al.'s parallel update), so
no large sums of squares are ever subtracted.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnet_jax.errors import ConfigError, DataError

SCANNED = "blocks"  # the scanned part of a stage: leading axis = blocks 1..n-1 (models/resnet.py)


def paired_conv(bn: nn.BatchNorm) -> str:
    """The conv a BN normalises, by the models' naming: ``bnK`` <- ``convK``, ``bn`` <- ``conv``,
    ``block1_bn2`` <- ``block1_conv2``."""
    i = bn.name.rfind("bn")
    return f"{bn.name[:i]}conv{bn.name[i + 2:]}"


def follows_3x3_conv(module: nn.Module, method_name: str) -> bool:
    """``capture_intermediates`` filter: a BatchNorm whose sibling conv has a 3x3 kernel.

    A BN in a module without convolutions (a pre-activation head) is skipped. Raises if a BN has
    convs but none of the matching name beside it (a fork with other names must pass its own
    filter rather than silently lose layers).
    """
    if method_name != "__call__" or not isinstance(module, nn.BatchNorm):
        return False
    conv = paired_conv(module)
    params = module.parent.variables.get("params", {})
    if not any("conv" in name for name in params):
        return False  # a BN beside no convolution (a pre-activation head) follows none
    if conv not in params:
        raise ConfigError(f"BatchNorm {'/'.join(module.path)} has no sibling {conv!r}; "
                          "pass a filter that names the 3x3 layers of this model.")
    return tuple(params[conv]["kernel"].shape[:2]) == (3, 3)


def _unstack_name(path: tuple[str, ...], i: int) -> str:
    if SCANNED not in path:
        raise ValueError(f"intermediate {'/'.join(path)} is stacked but not under a scanned "
                         f"'{SCANNED}' module.")
    k = path.index(SCANNED)
    return "/".join((*path[:k], f"block{i + 1}", *path[k + 1:]))


def _execution_order(
    inter: Mapping[str, Any], order: Sequence[tuple[str, ...]], ndim: int
) -> list[tuple[str, jax.Array]]:
    """``(layer name, response)`` in execution order. ``order``: the captured module paths in
    first-call order; paths under one scanned ``blocks`` module are stacked (leading axis =
    blocks 1..n-1) and run block by block, so they are emitted block-major."""
    groups: list[tuple[tuple[str, ...] | None, list[tuple[str, ...]]]] = []
    for path in order:
        prefix = path[: path.index(SCANNED) + 1] if SCANNED in path else None
        if prefix is not None and groups and groups[-1][0] == prefix:
            groups[-1][1].append(path)
        else:
            groups.append((prefix, [path]))
    out = []
    for prefix, paths in groups:
        ys = []
        for path in paths:
            node = inter
            for key in path:
                node = node[key]
            (y,) = node["__call__"]
            stacked = y.ndim == ndim + 1
            if stacked != (prefix is not None):
                raise ValueError(f"intermediate {'/'.join(path)} has shape {y.shape}: stacked "
                                 f"responses must come from a scanned '{SCANNED}' module.")
            ys.append(y.astype(jnp.float32))
        if prefix is None:
            out += [("/".join(p), y) for p, y in zip(paths, ys, strict=True)]
            continue
        for i in range(ys[0].shape[0]):
            out += [(_unstack_name(p, i), y[i]) for p, y in zip(paths, ys, strict=True)]
    return out


def batch_moments_fn(model: nn.Module, filter_fn: Any = follows_3x3_conv) -> Any:
    """A jitted ``(variables, image, mask) -> (names, sizes, count, means, m2s)`` for a batch.

    ``names`` (execution order) label the per-layer float32 ``means`` and ``m2s`` (sum of
    squared deviations from the batch mean, over masked-in examples, positions and channels);
    ``sizes``: positions x channels per example of each layer (Python ints); ``count``: the
    number of masked-in examples.
    """
    static: dict[str, list[Any]] = {}

    def moments(variables: Any, image: jax.Array, mask: jax.Array) -> tuple[Any, Any, Any]:
        order: list[tuple[str, ...]] = []

        def recording_filter(mdl: nn.Module, method_name: str) -> bool:
            keep = filter_fn(mdl, method_name)
            if keep and mdl.path not in order:  # nn.scan may trace its body more than once
                order.append(mdl.path)
            return keep

        _, state = model.apply(variables, image, train=False,
                               capture_intermediates=recording_filter, mutable=["intermediates"])
        inter = state["intermediates"]
        m = mask.astype(jnp.float32)
        layer_names, sizes, means, m2s = [], [], [], []
        for name, yi in _execution_order(inter, order, image.ndim):
            w = m.reshape((-1,) + (1,) * (yi.ndim - 1))
            n = jnp.sum(m) * np.prod(yi.shape[1:])
            mean = jnp.sum(yi * w) / jnp.maximum(n, 1.0)
            m2s.append(jnp.sum(w * jnp.square(yi - mean)))
            means.append(mean)
            sizes.append(int(np.prod(yi.shape[1:])))
            layer_names.append(name)
        if not layer_names:
            raise ConfigError("the filter selected no layer of this model.")
        static["names"], static["sizes"] = layer_names, sizes  # set while tracing
        return jnp.sum(m), jnp.stack(means), jnp.stack(m2s)

    jitted = jax.jit(moments)

    def run(variables: Any, image: Any, mask: Any) -> tuple[list[str], list[int], Any, Any, Any]:
        count, means, m2s = jitted(variables, image, mask)
        return list(static["names"]), list(static["sizes"]), count, means, m2s

    return run


@dataclasses.dataclass(frozen=True)
class LayerStd:
    index: int  # 1-based, execution order (Fig. 7 top: "layer index (original)")
    layer: str
    std: float
    values: int  # test examples x positions x channels


def single_view(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, str]:
    """``config`` with the 'center' eval protocol (Fig. 7 is measured on single views), and a
    note when a multi-view protocol (ten_crop, multi_scale) was replaced ("" otherwise)."""
    protocol = config.data.get("eval_protocol", "center")
    if protocol == "center":
        return config, ""
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.eval_protocol = "center"
    return config, f"eval protocol {protocol!r} -> 'center' (responses need single views)"


def layer_responses(
    model: nn.Module, variables: Mapping[str, Any], batches: Iterable[Mapping[str, Any]],
    filter_fn: Any = follows_3x3_conv, preprocess: Any = None,
) -> list[LayerStd]:
    """Std of every selected layer's response over all (masked-in) examples of ``batches``.

    ``batches``: dicts with "image" (B, H, W, C) and optionally "mask" (B,) (1 = real example);
    uint8 pipeline batches need the run's ``preprocess`` (``train.loop.make_preprocess``).
    """
    fn = batch_moments_fn(model, filter_fn)
    prep = jax.jit(preprocess) if preprocess is not None else None
    names: list[str] | None = None
    n = mean = m2 = None
    for batch in batches:
        if prep is not None:
            batch = prep(batch)
        image = np.asarray(batch["image"])
        if image.ndim != 4:
            raise ConfigError(f"responses need single-view images (B, H, W, C), got "
                              f"{image.shape}; use the 'center' eval protocol.")
        mask = np.asarray(batch.get("mask", np.ones(image.shape[0], np.float32)))
        names_b, sizes, count, means, m2s = fn(variables, image, mask)
        per_layer = np.float64(count) * np.asarray(sizes, np.float64)
        means, m2s = np.asarray(means, np.float64), np.asarray(m2s, np.float64)
        if names is None:
            names, n, mean, m2 = names_b, per_layer, means, m2s
            continue
        total = n + per_layer  # Chan et al.: merge (n, mean, M2) of two disjoint sets
        delta = means - mean
        safe = np.maximum(total, 1.0)
        mean = mean + delta * per_layer / safe
        m2 = m2 + m2s + delta**2 * n * per_layer / safe
        n = total
    if names is None or not np.all(n > 0):
        raise DataError("no test examples were seen (empty split or all masked).")
    return [LayerStd(i + 1, name, float(np.sqrt(m2[i] / n[i])), int(n[i]))
            for i, name in enumerate(names)]



def write_csv(per_net: Mapping[str, Sequence[LayerStd]], path: str) -> None:
    """``net, index, layer, std, rank, values``; rank 1 = the largest std of that net."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["net", "index", "layer", "std", "rank", "values"])
        for net, layers in per_net.items():
            rank = {r.index: k + 1 for k, r in enumerate(sorted(layers, key=lambda r: -r.std))}
            for r in layers:
                w.writerow([net, r.index, r.layer, f"{r.std:.6g}", rank[r.index], r.values])


def plot_fig7(per_net: Mapping[str, Sequence[LayerStd]], path: str, title: str = "") -> None:
    """Fig. 7: std against the layer index (top) and sorted by magnitude (bottom); plain nets
    dashed, residual nets solid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6.5))
    for k, (net, layers) in enumerate(per_net.items()):
        stds = np.array([r.std for r in layers])
        style = dict(color=f"C{k}", linestyle="--" if net.startswith("plain") else "-",
                     linewidth=1.4, label=net)
        idx = np.arange(1, len(stds) + 1)
        top.plot(idx, stds, **style)
        bottom.plot(idx, np.sort(stds)[::-1], **style)
    top.set_xlabel("layer index (original)")
    bottom.set_xlabel("layer index (sorted by magnitude)")
    for ax in (top, bottom):
        ax.set_ylabel("std")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        top.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
