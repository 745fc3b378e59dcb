"""Input pipelines: host-local numpy batches with the paper's augmentation (DESIGN.md seam 5).

    info = data.info(config)
    train = data.create(config, "train", process_index=p, process_count=n, seed=s, start_step=k)
    batch = next(train)  # {"image": u8 (B, H, W, C), "label": i32 (B,), + augmentation draws}
    for batch in data.create(config, "eval", ...):  # + "mask": f32 (B,), 0 for padding
        ...
    recipe = data.device_recipe(config)  # what the device's preprocess needs (mean, pad)

Batches hold uint8 pixels and random draws (keys: ``resnet_jax.data.pipeline``); the float work
(mean, §3.4's colour shift, flips, §4.2's pad-and-crop) runs in the jitted step
(``resnet_jax.train.preprocess``). With ``data.on_device`` (cifar recipe) the training images
live on the accelerator (``device_table``) and batches carry only indices and draws.

``config`` is the run config: ``dataset`` (cifar10, cifar100, imagenet2012, any TFDS image
classification name, digits, synthetic), ``batch_size`` and ``eval_batch_size`` (global) and
``data`` (see ``default_config``). View contract with the trainer: every batch key starting with
"image" is a view group; a rank-5 array holds V same-size views per example; softmax
probabilities are averaged over all views (``average_views``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, NamedTuple

import ml_collections
import numpy as np
from ml_collections import config_dict

from resnet_jax.data import augment, loader, pipeline, sources
from resnet_jax.data.augment import average_views
from resnet_jax.data.pipeline import Batches
from resnet_jax.data.sources import DataError
from resnet_jax.errors import ConfigError

__all__ = ["Batches", "DataError", "DatasetInfo", "DeviceRecipe", "average_views", "create",
           "default_config", "device_recipe", "device_table", "info", "recipe"]

EVAL_PROTOCOLS = ("center", "ten_crop", "multi_scale")


def default_config() -> ml_collections.ConfigDict:
    """Defaults of the run config's ``data`` field (the paper's recipe where it has one)."""
    return ml_collections.ConfigDict(dict(
        # -- where the examples come from --
        archive=config_dict.placeholder(str),  # CIFAR python archive (cifar-10-python.tar.gz /
        #   cifar-100-python.tar.gz) or its extracted folder; used instead of TFDS when set
        data_dir=config_dict.placeholder(str),  # TFDS data_dir (None: TFDS's default)
        manual_dir=config_dict.placeholder(str),  # TFDS manual_dir (imagenet2012's tars)
        download=False,  # let TFDS download and prepare (network; TFDS needs tensorflow to
        #   prepare); otherwise a missing dataset is an error saying how to provide it
        tfds_eval_split=config_dict.placeholder(str),  # None: "test", else "validation"
        validation_split=0,  # >0: hold out the LAST n training examples as the "eval" split
        #   (§4.2's 45k/5k split: 5000), so model selection never sees the test set
        # -- digits / synthetic --
        num_classes=10,  # synthetic only
        num_train=1024,  # synthetic only
        num_eval=256,  # synthetic only
        synthetic_seed=0,  # synthetic only: the data is a pure function of this
        # -- recipe --
        pipeline="auto",  # "cifar" (§4.2) | "imagenet" (§3.4) | "auto": cifar for fixed-size
        #   images up to 64 px (digits, synthetic 32, CIFAR, ...), imagenet otherwise
        image_size=config_dict.placeholder(int),  # output side; None: the stored size (cifar)
        #   or 224 (imagenet)
        augment=True,  # training augmentation (off: cifar = original image, imagenet = center)
        flip=config_dict.placeholder(bool),  # None: on, except digits (mirrored digits differ)
        pad=4,  # §4.2: zero padding per side before the random crop
        scale_range=(256, 480),  # §3.4: shorter side uniform in [256, 480] (integers)
        pca_std=0.1,  # §3.4 / AlexNet: std of the PCA colour coefficients (0 disables)
        eval_protocol="center",  # imagenet recipe: "center" (shorter side eval_resize, centre
        #   crop) | "ten_crop" ("image" (B, 10, S, S, C)) | "multi_scale" ("image_<s>" keys)
        eval_resize=256,  # §3.4: shorter side for "center" and "ten_crop"
        multi_scale_sizes=(224, 256, 384, 480, 640),  # §3.4: shorter sides for "multi_scale"
        # -- engine --
        on_device=False,  # cifar recipe: keep the uint8 training split on the accelerator and
        #   run §4.2's pad/crop/flip inside the step (batches carry indices: no host pixels)
        prefetch=2,  # batches decoded ahead of the consumer (>= 1)
        workers=-1,  # worker processes computing batches; 0: in this process; -1 (auto): all
        #   cores but one for the imagenet recipe (decode-bound), 0 for the in-memory cifar one
    ))


class DatasetInfo(NamedTuple):
    """What a model and a loop need to know about a configured dataset."""

    num_classes: int
    image_shape: tuple[int, int, int]  # (H, W, C) of a training "image"
    num_train: int
    num_eval: int


def _data_config(config: Any) -> ml_collections.ConfigDict:
    """``default_config()`` overlaid with ``config.data``; unknown fields are an error."""
    cfg = default_config()
    given = config.get("data", None) if hasattr(config, "get") else getattr(config, "data", None)
    if given is not None:
        items = given.items() if hasattr(given, "items") else vars(given).items()
        for key, value in items:
            if key not in cfg:
                raise ConfigError(f"unknown field data.{key}; valid: {sorted(cfg)}")
            cfg[key] = value
    return cfg


def _field(config: Any, name: str) -> Any:
    value = config.get(name, None) if hasattr(config, "get") else getattr(config, name, None)
    if value is None:
        raise ConfigError(f"the run config needs a {name!r} field")
    return value


@dataclasses.dataclass(frozen=True)
class _Key:
    """Everything that determines the loaded splits (hashable, for the in-process cache)."""

    dataset: str
    archive: str | None
    archive_stamp: tuple[int, int] | None  # (size, mtime_ns): reload when the file changes
    data_dir: str | None
    manual_dir: str | None
    download: bool
    tfds_eval_split: str | None
    validation_split: int
    synthetic: tuple[int, int, int, int, int]


def _key(config: Any, d: ml_collections.ConfigDict) -> _Key:
    archive, stamp = d.archive, None
    if archive is not None:
        archive = os.path.abspath(os.path.expanduser(archive))
        if os.path.exists(archive):
            st = os.stat(archive)
            stamp = (st.st_size, st.st_mtime_ns)
    size = d.image_size or 32
    return _Key(str(_field(config, "dataset")), archive, stamp, d.data_dir, d.manual_dir,
                bool(d.download), d.tfds_eval_split, int(d.validation_split),
                (d.num_train, d.num_eval, size, d.num_classes, d.synthetic_seed))


@functools.lru_cache(maxsize=4)
def _splits(key: _Key) -> tuple[sources.Source, sources.Source]:
    """(train, eval) sources, with the validation split applied. Cheap for TFDS (no decode)."""
    if key.archive is not None:
        train, test = sources.cifar_archive(key.archive, key.dataset)
    elif key.dataset == "digits":
        train, test = sources.digits()
    elif key.dataset == "synthetic":
        train, test = sources.synthetic(*key.synthetic)
    else:
        train, test = sources.tfds_splits(key.dataset, key.data_dir, key.manual_dir,
                                          key.download, key.tfds_eval_split)
    if key.validation_split:
        train, test = train.split(key.validation_split)  # type: ignore[attr-defined]
    return train, test


def _kind(d: ml_collections.ConfigDict, train: sources.Source) -> str:
    if d.pipeline in ("cifar", "imagenet"):
        return d.pipeline
    if d.pipeline != "auto":
        raise ConfigError(f"data.pipeline={d.pipeline!r}; valid: 'auto', 'cifar', 'imagenet'")
    h, w, _ = train.image_shape
    return "cifar" if h is not None and w is not None and max(h, w) <= 64 else "imagenet"


@functools.lru_cache(maxsize=4)
def _prepared(key: _Key, kind: str) -> tuple[sources.Source, sources.Source, np.ndarray]:
    """(train, eval, mean): the cifar recipe holds the splits in memory and the training split's
    per-pixel mean (§4.2), computed once per process; the imagenet recipe streams and uses the
    per-channel ImageNet mean (§3.4)."""
    train, test = _splits(key)
    if kind == "imagenet":
        if isinstance(train, sources.TfdsSource):  # JPEG bytes, decoded by the recipe (§3.4)
            train, test = train.encoded(), test.encoded()  # type: ignore[attr-defined]
        return train, test, augment.IMAGENET_MEAN_RGB[: train.image_shape[2]]
    if isinstance(train, sources.TfdsSource):
        if None in train.image_shape:
            raise ConfigError(f"data.pipeline='cifar' needs fixed-size images; {key.dataset} "
                              f"has {train.image_shape}")
        train, test = train.to_memory(), test.to_memory()  # type: ignore[attr-defined]
    # §4.2: "the per-pixel mean subtracted" — of the training split actually trained on.
    mean = train.images.mean(axis=0, dtype=np.float64).astype(np.float32)  # type: ignore
    return train, test, mean


def _recipe(d: ml_collections.ConfigDict, kind: str, train: sources.Source, mean: np.ndarray,
            dataset: str) -> pipeline.Recipe:
    h, w, c = train.image_shape
    if d.eval_protocol not in EVAL_PROTOCOLS:
        raise ConfigError(f"data.eval_protocol={d.eval_protocol!r}; valid: {EVAL_PROTOCOLS}")
    if kind == "cifar":
        if h != w:
            raise ConfigError(f"the cifar recipe needs square images; {dataset} has {h}x{w}")
        if d.image_size is not None and d.image_size != h:
            raise ConfigError(f"data.image_size={d.image_size} but {dataset} images are {h}x{w}; "
                              "the cifar recipe keeps the stored size (unset data.image_size)")
        if d.eval_protocol != "center":
            raise ConfigError(f"data.eval_protocol={d.eval_protocol!r} is an ImageNet protocol "
                              "(§3.4); the cifar recipe tests the single original image (§4.2): "
                              "use 'center' or data.pipeline='imagenet'")
        size = h
    else:
        size = d.image_size or 224
        if d.pca_std and c != 3:
            raise ConfigError(f"PCA colour augmentation needs RGB; {dataset} has {c} channels: "
                              "set data.pca_std=0")
    flip = d.flip if d.flip is not None else dataset != "digits"
    return pipeline.Recipe(
        kind=kind, size=int(size), channels=int(c), mean=mean, augment=bool(d.augment),
        flip=bool(flip), pad=int(d.pad), scale_range=tuple(d.scale_range),
        eval_resize=int(d.eval_resize), eval_protocol=d.eval_protocol,
        multi_scale_sizes=tuple(int(s) for s in d.multi_scale_sizes), pca_std=float(d.pca_std))


class DeviceRecipe(NamedTuple):
    """What the device half of the recipe needs (``resnet_jax.train.preprocess``)."""

    mean: np.ndarray  # float32, 0..255: per pixel (H, W, C) (cifar, §4.2) or per channel (C,)
    pad: int  # §4.2: zero padding per side that the "crop" offsets refer to


def _open(config: Any) -> tuple[ml_collections.ConfigDict, pipeline.Recipe, sources.Source,
                                 sources.Source]:
    """(data fields, recipe, train split, eval split) of ``config``, validated."""
    d = _data_config(config)
    key = _key(config, d)
    kind = _kind(d, _splits(key)[0])
    train, test, mean = _prepared(key, kind)
    recipe = _recipe(d, kind, train, mean, key.dataset)
    if d.on_device and (kind != "cifar" or not isinstance(train, sources.ArraySource)):
        raise ConfigError(f"data.on_device=True needs the cifar recipe's in-memory images; "
                          f"{key.dataset} streams through the {kind} recipe: set "
                          "--config.data.on_device=False")
    return d, recipe, train, test


def recipe(config: Any) -> pipeline.Recipe:
    """The recipe ``config``'s batches are made with: its kind ("cifar", §4.2, or "imagenet",
    §3.4), sizes, the training mean and the augmentation settings."""
    return _open(config)[1]


def device_recipe(config: Any) -> DeviceRecipe:
    """The mean (and §4.2 padding) the jitted step's ``preprocess`` applies to this config's
    batches."""
    r = recipe(config)
    return DeviceRecipe(np.asarray(r.mean, np.float32), r.pad)


def device_table(config: Any) -> np.ndarray:
    """The uint8 training images (N, H, W, C) that ``data.on_device`` keeps on the accelerator;
    training batches then index into it (``index``)."""
    d, _, train, _ = _open(config)
    if not d.on_device:
        raise ConfigError("device_table is for data.on_device=True; set "
                          "--config.data.on_device=True")
    return train.images  # type: ignore[attr-defined]


def info(config: Any) -> DatasetInfo:
    """Classes, training image shape and split sizes of the configured dataset. Opens the
    dataset (cached for ``create``) but decodes nothing for TFDS datasets."""
    d = _data_config(config)
    key = _key(config, d)
    train, test = _splits(key)
    kind = _kind(d, train)
    h = train.image_shape[0] if kind == "cifar" else (d.image_size or 224)
    return DatasetInfo(int(train.num_classes), (int(h), int(h), int(train.image_shape[2])),
                       len(train), len(test))


def create(config: Any, split: str, *, process_index: int = 0, process_count: int = 1,
           seed: int = 0, start_step: int = 0) -> Batches:
    """An iterator of this process's numpy batches of fixed shape.

    ``split="train"``: infinite, shuffled and augmented as a pure function of (seed, step);
    starting at ``start_step`` gives exactly the uninterrupted stream from that batch on.
    ``split="eval"``: the test split (or the held-out ``data.validation_split``), every
    example once, with "mask" 0 on padding; ``len()`` is the number of batches. Processes get
    disjoint slices of every global batch.
    """
    if split not in ("train", "eval"):
        raise ConfigError(f"split={split!r}; valid: 'train', 'eval'")
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index={process_index} not in [0, {process_count})")
    field = "batch_size" if split == "train" else "eval_batch_size"
    global_batch = int(_field(config, field))
    if global_batch % process_count:
        raise ConfigError(f"{field}={global_batch} is not divisible by process_count="
                          f"{process_count}; set --config.{field} to a multiple of it")
    if split == "train" and start_step < 0:
        raise ConfigError(f"start_step={start_step} must be >= 0")
    d, r, train, test = _open(config)
    plan = pipeline.Plan(train if split == "train" else test, r,
                         global_batch // process_count, process_index, process_count, seed,
                         on_device=bool(d.on_device) and split == "train")
    workers = loader.resolve_workers(d.workers, r.kind)
    if split == "train":
        return pipeline.train_stream(plan, start_step, prefetch=d.prefetch, workers=workers)
    return pipeline.eval_stream(plan, prefetch=d.prefetch, workers=workers)
