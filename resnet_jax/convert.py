"""Import torchvision ResNet weights (ResNet-18 ... 152) as ``params`` and ``batch_stats``.

    model, variables = convert.load_torchvision("resnet50-11ad3fa6.pth")
    logits = model.apply(variables, images_nhwc, train=False)

torchvision's ResNets are the paper's Table 1 networks with option-B shortcuts and, for the
bottleneck depths, the stride on the 3x3 conv ("v1.5"); here that is
``models.create("resnet50", stride_in="3x3")``. The file is read with
``torch.load(..., weights_only=True)``, which never unpickles code; torch is needed only here
(``pip install torch``). The input must be preprocessed as the torchvision weights expect
(RGB in [0, 1], normalised with their mean/std), as NHWC.

Layout map (torch -> here): ``conv1`` -> ``stem/conv``, ``bn1`` -> ``stem/bn``,
``layer{k}.{i}.conv{j}`` / ``bn{j}`` -> ``stage{k}/block{i}/conv{j}`` / ``bn{j}``,
``layer{k}.0.downsample.{0,1}`` -> ``stage{k}/block0/shortcut/{conv,bn}``, ``fc`` -> ``fc``.
Conv weights OIHW -> HWIO, the fc weight is transposed; BN ``weight, bias, running_mean,
running_var`` -> ``scale, bias`` (params) and ``mean, var`` (batch_stats). Both paddings
(k // 2, max pool 3x3/2 pad 1) and BN epsilon (1e-5) already match.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from resnet_jax import models
from resnet_jax.errors import CheckpointMismatch, ConfigError
from resnet_jax.models.resnet import IMAGENET_STAGES

_BN = {"weight": ("params", "scale"), "bias": ("params", "bias"),
       "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_BLOCK_KEY = re.compile(r"layer(\d+)\.(\d+)\.")


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "reading a PyTorch checkpoint needs torch, an optional dependency: "
            "pip install torch (the CPU wheel is enough)."
        ) from e
    return torch


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A torch ``state_dict`` file as numpy arrays (``torch.load(weights_only=True)``)."""
    torch = _torch()
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        keys = list(state_dict)[:5] if isinstance(state_dict, Mapping) else type(state_dict)
        raise ConfigError(
            f"{path} is not a state_dict of tensors (top level: {keys}); save "
            "model.state_dict() or pass the state_dict inside your checkpoint."
        )
    return {k: v.detach().cpu().numpy() for k, v in state_dict.items()}


def _strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop ``module.`` when every key has it (a ``DataParallel`` save)."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def torchvision_architecture(state_dict: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(model name, create() overrides)`` of a torchvision ResNet ``state_dict``."""
    sd = _strip_prefix(state_dict)
    blocks: dict[int, set[int]] = {}
    for key in sd:
        m = _BLOCK_KEY.match(key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    sizes = tuple(len(blocks[k]) for k in sorted(blocks))
    bottleneck = "layer1.0.conv3.weight" in sd
    depths = [d for d, (stage_sizes, block_cls) in IMAGENET_STAGES.items()
              if stage_sizes == sizes and (block_cls is models.BottleneckBlock) == bottleneck]
    if not depths:
        raise ConfigError(
            f"blocks per layer {sizes} ({'bottleneck' if bottleneck else 'basic'}) is not a "
            f"torchvision ResNet-18/34/50/101/152; Table 1 depths: {sorted(IMAGENET_STAGES)}."
        )
    if "fc.weight" not in sd:
        raise ConfigError("state_dict has no 'fc.weight'; is this a torchvision ResNet?")
    overrides: dict[str, Any] = {"num_classes": int(np.shape(sd["fc.weight"])[0])}
    if bottleneck:
        overrides["stride_in"] = "3x3"  # torchvision's v1.5 bottleneck
    return f"resnet{depths[0]}", overrides


def _target(key: str) -> tuple[str, tuple[str, ...], str] | None:
    """torch key -> (collection, path, kind) with kind in {"conv", "dense", "vector"}."""
    parts = key.split(".")
    name, leaf = parts[:-1], parts[-1]
    if leaf == "num_batches_tracked":
        return None
    if name == ["conv1"]:
        module, kind = ("stem", "conv"), "conv"
    elif name == ["bn1"]:
        module, kind = ("stem", "bn"), "bn"
    elif name == ["fc"] and leaf in ("weight", "bias"):
        return ("params", ("fc", "kernel"), "dense") if leaf == "weight" else (
            "params", ("fc", "bias"), "vector")
    elif len(name) >= 3 and name[0].startswith("layer"):
        block = (f"stage{name[0][len('layer'):]}", f"block{name[1]}")
        rest = name[2:]
        if rest == ["downsample", "0"]:
            module, kind = (*block, "shortcut", "conv"), "conv"
        elif rest == ["downsample", "1"]:
            module, kind = (*block, "shortcut", "bn"), "bn"
        elif len(rest) == 1 and rest[0][:-1] in ("conv", "bn"):
            module, kind = (*block, rest[0]), rest[0][:-1]
        else:
            raise ConfigError(f"unexpected torchvision key {key!r}.")
    else:
        raise ConfigError(f"unexpected torchvision key {key!r}.")
    if kind == "conv":
        if leaf != "weight":
            raise ConfigError(f"unexpected torchvision key {key!r} (convs have no bias here).")
        return "params", (*module, "kernel"), "conv"
    if leaf not in _BN:
        raise ConfigError(f"unexpected torchvision key {key!r}.")
    collection, field = _BN[leaf]
    return collection, (*module, field), "vector"


def from_torchvision(state_dict: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``(model, {"params", "batch_stats"})`` from a torchvision ResNet ``state_dict`` (arrays).

    Every key is used and every variable of the model is filled with the shape it declares,
    else a ValueError names the key or path.
    """
    sd = _strip_prefix(state_dict)
    name, overrides = torchvision_architecture(sd)
    model = models.create(name, **overrides)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
    expected = {(col, *(getattr(k, "key", k) for k in path)): leaf for col in shapes
                for path, leaf in jax.tree_util.tree_flatten_with_path(shapes[col])[0]}

    filled: dict[tuple[str, ...], np.ndarray] = {}
    for key, value in sd.items():
        target = _target(key)
        if target is None:
            continue
        collection, path, kind = target
        array = np.asarray(value, np.float32)
        if kind == "conv":
            array = array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif kind == "dense":
            array = array.T
        full = (collection, *path)
        if full not in expected:
            raise CheckpointMismatch(f"torchvision key {key!r} maps to {'/'.join(full)}, which "
                                     f"{name} does not have.")
        if array.shape != expected[full].shape:
            raise CheckpointMismatch(
                f"torchvision key {key!r} has shape {np.shape(value)}, but {'/'.join(full)} "
                f"needs {expected[full].shape} (after layout).")
        filled[full] = array
    missing = sorted("/".join(p) for p in expected if p not in filled)
    if missing:
        raise CheckpointMismatch(f"state_dict lacks {len(missing)} variable(s) of {name}, e.g. "
                                 f"{missing[0]}.")

    variables: dict[str, Any] = {}
    for (collection, *path), array in filled.items():
        node = variables.setdefault(collection, {})
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = jax.numpy.asarray(array)
    return model, variables


def load_torchvision(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """``(model, variables)`` from a torchvision ResNet ``state_dict`` file."""
    return from_torchvision(read_state_dict(path))
