"""Table 1 (ImageNet nets) and Table 6's layer and parameter columns (CIFAR), from the code.

Every number comes from :func:`resnet_jax.summary.summarize` (parameters, multiply-adds) and from
the parameter tree (weight layers), beside the paper's values. Multiply-adds are the paper's
"FLOPs" (Table 1 counts convolutions and the fc layer; see ``resnet_jax/summary.py``).
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from resnet_jax import models, summary

# Table 1, "FLOPs" row (multiply-adds at 224x224); VGG-19 from §3.3 / Fig. 3.
PAPER_MULT_ADDS = {"resnet18": 1.8e9, "resnet34": 3.6e9, "resnet50": 3.8e9, "resnet101": 7.6e9,
                   "resnet152": 11.3e9, "vgg19": 19.6e9}
# Table 6, "# params" column (CIFAR-10 nets, option A shortcuts).
PAPER_PARAMS = {"resnet20": 0.27e6, "resnet32": 0.46e6, "resnet44": 0.66e6, "resnet56": 0.85e6,
                "resnet110": 1.7e6, "resnet1202": 19.4e6}
TABLE1_NETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg19")
TABLE6_NETS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202")


@dataclasses.dataclass(frozen=True)
class NetRow:
    """One network: weight layers, parameters and multiply-adds (ours) and the paper's value."""

    name: str
    layers: int
    params: int
    mult_adds: int
    image_size: int
    paper: float | None  # Table 1: multiply-adds; Table 6: parameters


def weight_layers(name: str) -> int:
    """Convolutions and fc layers on the main path (shortcut projections excluded, as the
    paper's depth counts them), read from the parameter tree; a scanned stack of ``k`` blocks
    counts ``k`` times."""
    model = models.create(name)
    size = summary.default_image_size(model)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    )["params"]
    count = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        keys = [p.key for p in path]
        if keys[-1] != "kernel" or "shortcut" in keys:
            continue
        count += leaf.shape[0] if "blocks" in keys else 1  # stage{k}/blocks: leading axis
    return count


def net_row(name: str, paper: dict[str, float]) -> NetRow:
    s = summary.summarize(name)
    return NetRow(name, weight_layers(name), s.params, s.mult_adds, s.image_size, paper.get(name))


def table1(nets: Sequence[str] = TABLE1_NETS) -> list[NetRow]:
    """Table 1 at 224x224: layers, parameters, multiply-adds (ours) and the paper's FLOPs."""
    return [net_row(n, PAPER_MULT_ADDS) for n in nets]


def table6(nets: Sequence[str] = TABLE6_NETS) -> list[NetRow]:
    """Table 6's architecture columns at 32x32: layers and parameters (ours and the paper's)."""
    return [net_row(n, PAPER_PARAMS) for n in nets]


def _fmt(x: float | None, scale: float, digits: int) -> str:
    return "—" if x is None else f"{x / scale:.{digits}f}"


def markdown(t1: Sequence[NetRow], t6: Sequence[NetRow]) -> str:
    """Both tables and the ResNet-34 / VGG-19 cost ratio (§3.3: "18% of VGG-19") as markdown."""
    lines = [
        "# Architecture tables (counted from resnet_jax.models)",
        "",
        "## Table 1: ImageNet networks at 224x224",
        "",
        "Multiply-adds of convolutions and fc layers (the paper's FLOPs); parameters include BN "
        "scale/offset. Layers: weight layers on the main path (shortcut projections excluded).",
        "",
        "| net | layers | params (M) | mult-adds (G) | paper mult-adds (G) | ours / paper |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in t1:
        ratio = "—" if r.paper is None else f"{r.mult_adds / r.paper:.3f}"
        lines.append(f"| {r.name} | {r.layers} | {r.params / 1e6:.2f} | {r.mult_adds / 1e9:.3f} "
                     f"| {_fmt(r.paper, 1e9, 1)} | {ratio} |")
    by = {r.name: r for r in t1}
    if "resnet34" in by and "vgg19" in by:
        ours = by["resnet34"].mult_adds / by["vgg19"].mult_adds
        lines += ["", f"ResNet-34 / VGG-19 multiply-adds: {100 * ours:.1f}% here; the paper: "
                  f"3.6 / 19.6 = {100 * 3.6 / 19.6:.1f}% (§3.3: \"only 18% of VGG-19\")."]
    lines += [
        "",
        "## Table 6: CIFAR-10 networks at 32x32 (option A shortcuts)",
        "",
        "| net | layers | params (M) | paper params (M) | mult-adds (M) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in t6:
        lines.append(f"| {r.name} | {r.layers} | {r.params / 1e6:.3f} | {_fmt(r.paper, 1e6, 2)} "
                     f"| {r.mult_adds / 1e6:.1f} |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[NetRow], path: str, paper_column: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["net", "layers", "params", "mult_adds", "image_size", paper_column])
        for r in rows:
            paper = "" if r.paper is None else f"{r.paper:.6g}"
            w.writerow([r.name, r.layers, r.params, r.mult_adds, r.image_size, paper])


def write_tables(out: str) -> str:
    """``out/tables.md``, ``out/table1.csv`` and ``out/table6.csv``; returns the markdown."""
    os.makedirs(out, exist_ok=True)
    t1, t6 = table1(), table6()
    text = markdown(t1, t6)
    with open(os.path.join(out, "tables.md"), "w") as f:
        f.write(text)
    write_csv(t1, os.path.join(out, "table1.csv"), "paper_mult_adds")
    write_csv(t6, os.path.join(out, "table6.csv"), "paper_params")
    return text
