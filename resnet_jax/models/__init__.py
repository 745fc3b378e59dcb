"""The paper's networks by name: ``create("resnet56")``, ``create("resnet50", stride_in="3x3")``.

CIFAR nets (§4.2) default to shortcut option A, ImageNet nets (Table 1) to option B, as in the
paper's main results. ``register(name, factory)`` adds a name; ``create`` also takes a factory's
import path (``"my_pkg.models:my_net"``), and ``block``/``block_cls``, ``stem`` and ``head``
overrides may be import paths too (``block="my_pkg.blocks:SEBlock"``), so a config that names
them by string rebuilds the same network wherever the fork is importable.
CIFAR nets scan their identical blocks (ResNet-1202's 200 blocks per stage
compile in seconds); ImageNet nets are unrolled (``stage3/block5/...``, as torchvision's layout).
Either is a flag: ``scan_blocks=``. ``cifar_resnet``, ``cifar_plain``, ``imagenet_resnet`` and
``imagenet_plain`` take any ``depth=`` (6n+2 for CIFAR; 18/34/50/101/152 for ImageNet).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from resnet_jax.errors import ConfigError
from resnet_jax.models.blocks import (
    SHORTCUTS,
    BasicBlock,
    BottleneckBlock,
    Shortcut,
    subsample_and_pad,
)
from resnet_jax.models.conv import CONV_CHOICES, CONV_IMPLS
from resnet_jax.models.nnx import NNXNetwork, to_nnx
from resnet_jax.models.resnet import (
    IMAGENET_STAGES,
    STEMS,
    ResNet,
    Stage,
    Stem,
    cifar_stage_sizes,
    he_normal,
)
from resnet_jax.models.vgg import VGG, vgg19

__all__ = [
    "CONV_CHOICES",
    "CONV_IMPLS",
    "SHORTCUTS",
    "VGG",
    "BasicBlock",
    "BottleneckBlock",
    "NNXNetwork",
    "ResNet",
    "Shortcut",
    "Stage",
    "Stem",
    "cifar_stage_sizes",
    "create",
    "he_normal",
    "init",
    "names",
    "register",
    "resolve",
    "subsample_and_pad",
    "to_nnx",
]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dtype(value: Any, field: str) -> Any:
    if isinstance(value, str):
        if value not in _DTYPES:
            raise ConfigError(f"{field}={value!r} is not one of {sorted(_DTYPES)}.")
        return _DTYPES[value]
    return value


def cifar(depth: int, *, shortcut: str = "A", **overrides: Any) -> ResNet:
    """A CIFAR net of ``depth = 6n+2`` layers: 16/32/64 filters on 32/16/8 maps (§4.2)."""
    sizes = cifar_stage_sizes(depth)
    kw: dict[str, Any] = dict(
        stage_sizes=sizes, block_cls=BasicBlock, stem="cifar", width=16, num_classes=10,
        shortcut=shortcut, scan_blocks=True,
    )
    return _build(kw, overrides)


def imagenet(depth: int, *, shortcut: str = "B", **overrides: Any) -> ResNet:
    """An ImageNet net of Table 1 (18/34 basic blocks, 50/101/152 bottlenecks)."""
    if depth not in IMAGENET_STAGES:
        raise ConfigError(
            f"ImageNet depth {depth} is not in Table 1; use one of {sorted(IMAGENET_STAGES)}."
        )
    sizes, block_cls = IMAGENET_STAGES[depth]
    kw: dict[str, Any] = dict(
        stage_sizes=sizes, block_cls=block_cls, stem="imagenet", width=64, num_classes=1000,
        shortcut=shortcut,
    )
    return _build(kw, overrides)


def resolve(spec: Any) -> Any:
    """``"package.module:Name"`` -> that object (imported); anything else as it is."""
    if not isinstance(spec, str):
        return spec
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{spec!r} is not an import path 'package.module:Name'.")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not (module_name + ".").startswith(e.name + "."):
            raise  # the module exists but fails to import something: its own traceback
        raise ConfigError(f"cannot import {module_name!r} for {spec!r} ({e}); install the "
                          "package that defines it or run from its directory.") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{module_name!r} has no {attr!r} (from {spec!r}).")
        obj = getattr(obj, part)
    return obj


def _build(kw: dict[str, Any], overrides: dict[str, Any]) -> ResNet:
    fields = {f.name for f in dataclasses.fields(ResNet)} - {"parent", "name"}
    overrides = dict(overrides)
    if "block" in overrides:  # the config's name for block_cls
        overrides["block_cls"] = overrides.pop("block")
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"unknown model override(s) {unknown}; valid fields: {sorted(fields)}.")
    kw.update(overrides)
    for f in ("block_cls", "head"):
        if isinstance(kw.get(f), str):
            kw[f] = resolve(kw[f])
    if isinstance(kw.get("stem"), str) and kw["stem"] not in STEMS:
        kw["stem"] = resolve(kw["stem"])
    for f in ("dtype", "param_dtype"):
        if f in kw:
            kw[f] = _dtype(kw[f], f)
    if kw.get("stage_sizes") is not None:
        kw["stage_sizes"] = tuple(int(n) for n in kw["stage_sizes"])
    model = ResNet(**kw)
    model.validate()  # fail here, in one line, not at trace time
    return model


def _named(family: Callable[..., ResNet], depth: int, **fixed: Any) -> Callable[..., ResNet]:
    def make(**overrides: Any) -> ResNet:
        return family(depth, **{**fixed, **overrides})

    return make


def _any_depth(family: Callable[..., ResNet], **fixed: Any) -> Callable[..., ResNet]:
    def make(*, depth: int | None = None, **overrides: Any) -> ResNet:
        if depth is None:
            raise ConfigError("this model needs depth=..., e.g. create('cifar_resnet', depth=20).")
        return family(int(depth), **{**fixed, **overrides})

    return make


_REGISTRY: dict[str, Callable[..., ResNet]] = {}
for _d in (20, 32, 44, 56, 110, 1202):
    _REGISTRY[f"resnet{_d}"] = _named(cifar, _d)
for _d in (20, 32, 44, 56, 110):
    _REGISTRY[f"plain{_d}"] = _named(cifar, _d, shortcut="none")
for _d in (18, 34, 50, 101, 152):
    _REGISTRY[f"resnet{_d}"] = _named(imagenet, _d)
for _d in (18, 34):
    _REGISTRY[f"plain{_d}"] = _named(imagenet, _d, shortcut="none")
_REGISTRY["cifar_resnet"] = _any_depth(cifar)
_REGISTRY["cifar_plain"] = _any_depth(cifar, shortcut="none")
_REGISTRY["imagenet_resnet"] = _any_depth(imagenet)
_REGISTRY["imagenet_plain"] = _any_depth(imagenet, shortcut="none")
_REGISTRY["vgg19"] = vgg19  # the cost baseline of §3.3 / Fig. 3 (resnet_jax/models/vgg.py)


def init(model: Any, rng: jax.Array, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """``model.init(rng, zeros(input_shape), train=False)``, jitted and quick to compile.

    Threefry's partitionable mode (JAX's default) makes each parameter's normal sample ~4x
    slower to compile on CPU (ResNet-20: 11 s against 3 s); the variables are replicated, so
    the sharding-friendly mode buys nothing here. Deterministic in ``rng``.
    """
    x = jnp.zeros(input_shape, jnp.float32)
    with jax.threefry_partitionable(False):
        return jax.jit(lambda r: model.init(r, x, train=False))(rng)


def names() -> list[str]:
    """Every registered model name."""
    return list(_REGISTRY)


def register(name: str, factory: Callable[..., Any], *, overwrite: bool = False) -> None:
    """Make ``create(name, **overrides)`` call ``factory(**overrides)`` (which returns a linen
    module taking ``num_classes`` and ``dtype``). A checkpoint records only ``name``, so the
    fork must register it wherever it is loaded; an import path (``"my_pkg.models:my_net"``)
    as the config's ``model`` needs no registration."""
    if name in _REGISTRY and not overwrite:
        raise ConfigError(f"model {name!r} is registered already; pass overwrite=True.")
    _REGISTRY[name] = factory


def create(name: str, **overrides: Any) -> Any:
    """Build a registered network (or the factory at import path ``name``); ``overrides`` set
    any :class:`ResNet` field (or ``depth``; ``block`` is ``block_cls``)."""
    if name not in _REGISTRY:
        if ":" in name:
            return resolve(name)(**overrides)
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown model {name!r}{hint}; valid names: {', '.join(_REGISTRY)} "
                          "(or a factory's import path 'my_pkg.models:my_net').")
    return _REGISTRY[name](**overrides)
