"""Example sources: random-access (image, label) stores behind one small interface.

A source is a split of a dataset: ``len(source)`` examples, ``source.read(indices)`` returning
``(images, labels)`` with uint8 HWC images (a stacked array when every image has the same shape,
else a list) or, for the imagenet recipe, encoded image files (a list of ``bytes``, decoded by
``augment`` at a reduced JPEG scale where the recipe shrinks the image) and int labels. Sources:

* ``ArraySource``: everything in memory (digits, synthetic, the CIFAR python archives, and TFDS
  datasets with small fixed-size images such as cifar10/cifar100, decoded once).
* ``EncodedSource``: encoded image files in memory (what a folder of JPEGs reads to).
* ``TfdsSource``: streaming reads from ``tfds.data_source`` over array_record (no TensorFlow);
  used for variable-size datasets (imagenet2012), with the image left encoded (``encoded()``).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import pickle
import tarfile
import zlib
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from resnet_jax.data import augment
from resnet_jax.errors import ConfigError, DataError

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
# What ``python -m resnet_jax.data.prepare`` writes (others: ``tfds build``, needs tensorflow).
PREPARED_HERE = ("imagenet2012", "cifar10", "cifar100")
# Fixed digits split: the first 1437 examples train, the last 360 (20%) test.
DIGITS_NUM_TEST = 360


class Source(Protocol):
    """One split of a dataset, random access by example index."""

    num_classes: int
    image_shape: tuple[int | None, int | None, int]  # stored shape; None = varies per image

    def __len__(self) -> int: ...

    def read(self, indices: np.ndarray
             ) -> tuple[np.ndarray | list[np.ndarray] | list[bytes], np.ndarray]: ...


class _RandomAccess:
    """``source[i]`` -> ``{"image", "label"}``: grain's ``RandomAccessDataSource`` protocol
    (``len`` + ``__getitem__``), so a source plugs into ``grain.MapDataset.source`` directly.
    The pipeline itself reads whole batches (``read``)."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):  # type: ignore[arg-type]
            raise IndexError(f"example {index} of {len(self)}")  # type: ignore[arg-type]
        images, labels = self.read(np.array([index % len(self)]))  # type: ignore[attr-defined]
        return {"image": images[0], "label": int(labels[0])}


@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource(_RandomAccess):
    """An in-memory split: ``images`` uint8 (N, H, W, C), ``labels`` int (N,)."""

    images: np.ndarray
    labels: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N,H,W,C), got {self.images.dtype} "
                             f"{self.images.shape}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.images)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.images[indices], self.labels[indices]

    def split(self, num_heldout: int) -> tuple[ArraySource, ArraySource]:
        """(first N - num_heldout, last num_heldout) examples, in stored order."""
        n = _check_heldout(len(self), num_heldout)
        return (ArraySource(self.images[:n], self.labels[:n], self.num_classes),
                ArraySource(self.images[n:], self.labels[n:], self.num_classes))


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedSource(_RandomAccess):
    """An in-memory split of encoded image files (JPEG, PNG, ...): ``images`` (N,) bytes,
    ``labels`` int (N,). ``read`` returns the bytes; the imagenet recipe decodes them to
    ``channels`` (3: RGB, grey and CMYK converted; 1: grey)."""

    images: Sequence[bytes]
    labels: np.ndarray
    num_classes: int
    channels: int = 3

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if not all(isinstance(b, bytes) for b in self.images):
            raise ValueError("images must be encoded files (bytes)")
        object.__setattr__(self, "labels", np.asarray(self.labels, np.int32))

    @property
    def image_shape(self) -> tuple[None, None, int]:
        return None, None, self.channels

    def __len__(self) -> int:
        return len(self.images)

    def read(self, indices: np.ndarray) -> tuple[list[bytes], np.ndarray]:
        return [self.images[int(i)] for i in indices], self.labels[indices]

    def split(self, num_heldout: int) -> tuple[EncodedSource, EncodedSource]:
        """(first N - num_heldout, last num_heldout) examples, in stored order."""
        n = _check_heldout(len(self), num_heldout)
        return (dataclasses.replace(self, images=self.images[:n], labels=self.labels[:n]),
                dataclasses.replace(self, images=self.images[n:], labels=self.labels[n:]))


def _check_heldout(n: int, num_heldout: int) -> int:
    if not 0 < num_heldout < n:
        raise ConfigError(f"data.validation_split={num_heldout} must be in (0, {n}), the size of "
                          "the training split")
    return n - num_heldout


# ---------------------------------------------------------------------------------------------
# Bundled and synthetic sources.


def digits() -> tuple[ArraySource, ArraySource]:
    """scikit-learn's bundled 8x8 digits (1797 real scans of 0..9) as 32x32x3 uint8.

    Each grey level 0..16 is scaled to 0..255 and each pixel becomes a 4x4 block (nearest
    upsampling, so a 4-pixel crop shift moves the digit by exactly one original pixel); the grey
    plane is repeated into RGB. Split: the first 1437 examples train, the last 360 test.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    grey = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
    big = grey.repeat(4, axis=1).repeat(4, axis=2)  # (N, 32, 32)
    images = np.ascontiguousarray(np.repeat(big[..., None], 3, axis=-1))
    labels = d.target.astype(np.int32)
    return ArraySource(images, labels, 10).split(DIGITS_NUM_TEST)


def synthetic(num_train: int, num_eval: int, image_size: int, num_classes: int,
              seed: int) -> tuple[ArraySource, ArraySource]:
    """Uniform random uint8 images and labels, a pure function of the arguments."""
    rng = np.random.default_rng(seed)
    n = num_train + num_eval
    images = rng.integers(0, 256, size=(n, image_size, image_size, 3), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=(n,), dtype=np.int32)
    return ArraySource(images, labels, num_classes).split(num_eval)


# ---------------------------------------------------------------------------------------------
# The official CIFAR-10/100 "python version" archives.

CIFAR_LAYOUT = {
    # dataset: (top folder, train files, test files, label key, archive file name, classes)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                b"labels", "cifar-10-python.tar.gz", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels",
                 "cifar-100-python.tar.gz", 100),
}

# The CIFAR pickles hold numpy arrays; nothing else may be constructed while unpickling.
_PICKLE_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR pickle")
        module = module.replace("numpy.core.", "numpy._core.")  # numpy 2 name, no warning
        return super().find_class(module, name)


def unpickle_cifar(data: bytes) -> dict:
    """One CIFAR python-version pickle (numpy arrays only) as a dict with bytes keys."""
    obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    if not isinstance(obj, dict):
        raise pickle.UnpicklingError(f"expected a dict, got {type(obj).__name__}")
    return {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}


def _cifar_arrays(batches: list[dict], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
    labels = np.concatenate([np.asarray(b[label_key], dtype=np.int32) for b in batches])
    # Each row: the 1024 R values, then G, then B, each plane row-major -> (N, 32, 32, 3).
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels


def cifar_archive(path: str, dataset: str) -> tuple[ArraySource, ArraySource]:
    """Reads the official CIFAR python archive (``cifar-10-python.tar.gz`` /
    ``cifar-100-python.tar.gz``) or the folder it extracts to; returns (train, test)."""
    if dataset not in CIFAR_LAYOUT:
        raise DataError(f"data.archive is for the CIFAR python archives, but dataset="
                        f"{dataset!r}; use --config.dataset=cifar10 or cifar100")
    top, train_files, test_files, label_key, expected, num_classes = CIFAR_LAYOUT[dataset]
    how = (f"download {expected} (python version) from {CIFAR_URL} and pass "
           f"--config.data.archive=/path/to/{expected}")
    if not os.path.exists(path):
        raise DataError(f"CIFAR archive {path!r} not found; {how}")
    names = [*train_files, *test_files]
    raw: dict[str, bytes] = {}
    try:
        if os.path.isdir(path):
            folder = os.path.basename(os.path.normpath(path))
            root = path if folder == top else os.path.join(path, top)
            for name in names:
                if os.path.isfile(os.path.join(root, name)):
                    with open(os.path.join(root, name), "rb") as f:
                        raw[name] = f.read()
        else:
            with tarfile.open(path, "r|*") as tar:  # one sequential pass over the stream
                for member in tar:
                    folder, _, name = member.name.removeprefix("./").rpartition("/")
                    if folder == top and name in names and member.isfile():
                        raw[name] = tar.extractfile(member).read()  # type: ignore[union-attr]
        missing = [f"{top}/{n}" for n in names if n not in raw]
        if missing:
            raise DataError(f"{path!r} has no {', '.join(missing)}: not the {dataset} python "
                            f"archive ({expected}) or the folder it extracts to; {how}")
        batches = {name: unpickle_cifar(data) for name, data in raw.items()}
        train = ArraySource(*_cifar_arrays([batches[n] for n in train_files], label_key),
                            num_classes)
        test = ArraySource(*_cifar_arrays([batches[n] for n in test_files], label_key),
                           num_classes)
    except DataError:
        raise
    except (OSError, EOFError, tarfile.TarError, gzip.BadGzipFile, zlib.error,
            pickle.UnpicklingError, KeyError, ValueError, TypeError) as e:
        raise DataError(f"CIFAR archive {path!r} is truncated or corrupt "
                        f"({type(e).__name__}: {e}); {how}") from e
    return train, test


# ---------------------------------------------------------------------------------------------
# TensorFlow Datasets, read through tfds.data_source (array_record; no TensorFlow needed).

# Where a dataset's held-out split is not called "test".
_TFDS_EVAL_SPLIT = {"imagenet2012": "validation", "imagenet2012_subset": "validation",
                    "imagenette": "validation", "imagenet_v2": "test"}


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsSource(_RandomAccess):
    """Examples ``start .. stop-1`` of a TFDS split, read (and, unless ``encoded()``, decoded by
    TFDS) in the calling thread."""

    ds: Sequence[dict]
    start: int
    stop: int
    num_classes: int
    image_shape: tuple[int | None, int | None, int]
    builder: Any = dataclasses.field(default=None, repr=False)  # to reopen ``split_name``
    split_name: str | None = None
    # The split's shard files in record order, (path, first record, number of records), to
    # name the file of a record that cannot be read; and how to repair the dataset.
    shards: tuple[tuple[str, int, int], ...] = dataclasses.field(default=(), repr=False)
    repair: str = dataclasses.field(default="", repr=False)

    def __len__(self) -> int:
        return self.stop - self.start

    def read(self, indices: np.ndarray) -> tuple[list[np.ndarray] | list[bytes], np.ndarray]:
        examples = [self._example(int(i) + self.start) for i in indices]
        return ([e["image"] if isinstance(e["image"], bytes) else np.asarray(e["image"])
                 for e in examples],
                np.asarray([e["label"] for e in examples], dtype=np.int32))

    def _example(self, index: int) -> dict:
        try:
            return self.ds[index]
        except (RuntimeError, OSError) as e:  # array_record's reader raises RuntimeError
            raise DataError(self._unreadable(index, e)) from e

    def _unreadable(self, index: int, error: BaseException) -> str:
        """One line: the shard file (and record in it) that ``index`` could not be read from."""
        cause = " ".join(f"{type(error).__name__}: {error}".split())
        where = f"example {index} of split {self.split_name!r}"
        for path, first, count in self.shards:
            if index < count:
                what = "is missing" if "://" not in path and not os.path.exists(path) else \
                    "is damaged"
                return (f"data shard {path} {what} (record {first + index} of the file, {where}: "
                        f"{cause}); {self.repair}")
            index -= count
        return f"{where} cannot be read ({cause}); {self.repair}"

    def encoded(self) -> TfdsSource:
        """The same examples with the image feature left encoded (``read`` returns the stored
        JPEG/PNG bytes; ``augment`` decodes them, at a reduced scale where it can)."""
        if self.builder is None or self.split_name is None:
            return self
        import tensorflow_datasets as tfds

        ds = self.builder.as_data_source(split=self.split_name,
                                         decoders={"image": tfds.decode.SkipDecoding()})
        if len(self):
            try:
                ds[self.start]
            except ImportError:
                # tfds.testing.mock_data makes undecoded examples by encoding fake ones with
                # TensorFlow; without it, keep TFDS's decoded arrays (augment takes both).
                return dataclasses.replace(self, builder=None)
        return dataclasses.replace(self, ds=ds, builder=None)

    def split(self, num_heldout: int) -> tuple[TfdsSource, TfdsSource]:
        n = _check_heldout(len(self), num_heldout)
        return (dataclasses.replace(self, stop=self.start + n),
                dataclasses.replace(self, start=self.start + n))

    def to_memory(self) -> ArraySource:
        """Decodes every example once (for small fixed-size images, e.g. cifar10)."""
        images, labels = self.read(np.arange(len(self)))
        images = [augment.decode(im, self.image_shape[2]) for im in images]
        return ArraySource(np.stack(images).astype(np.uint8, copy=False), labels,
                           self.num_classes)


def _tfds_how(name: str, builder: Any, manual_dir: str | None) -> str:
    root = builder._data_dir_root
    if name == "imagenet2012":
        where = manual_dir or os.path.join(str(root), "downloads", "manual")
        return (f"put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from "
                f"https://image-net.org/download-images) in {where} and prepare it once, "
                f"without tensorflow: `python -m resnet_jax.data.prepare imagenet2012 "
                f"--manual_dir={where} --data_dir={root}`")
    if name in CIFAR_LAYOUT:
        archive = CIFAR_LAYOUT[name][4]
        return (f"download {archive} (python version) from {CIFAR_URL} and either prepare it "
                f"once, without tensorflow: `python -m resnet_jax.data.prepare {name} "
                f"--archive=/path/to/{archive} --data_dir={root}` (what `tfds build {name} "
                f"--file_format=array_record` writes, which needs tensorflow), or read it "
                f"directly with --config.data.archive=/path/to/{archive}")
    if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
        where = manual_dir or os.path.join(str(root), "downloads", "manual")
        return (f"put the files in tfds.builder({name!r}).MANUAL_DOWNLOAD_INSTRUCTIONS in "
                f"{where} (or set --config.data.manual_dir) and prepare it once as "
                f"array_record: `tfds build {name} --data_dir={root} --manual_dir={where} "
                f"--file_format=array_record` (needs tensorflow)")
    return (f"prepare it once as array_record: `tfds build {name} --data_dir={root} "
            f"--file_format=array_record` (needs network and tensorflow)")


def tfds_splits(name: str, data_dir: str | None, manual_dir: str | None, download: bool,
                eval_split: str | None) -> tuple[TfdsSource, TfdsSource]:
    """Opens the (train, eval) splits of a TFDS image classification dataset.

    Never downloads unless ``download`` is True; a missing or unprepared dataset raises
    ``DataError`` saying how to provide it.
    """
    import tensorflow_datasets as tfds

    scheme = str(data_dir).partition("://")[0] if data_dir and "://" in str(data_dir) else ""
    # array_record opens local paths and gs:// (its reader has a GCS client); TFDS reads the
    # metadata through etils.epath, which needs gcsfs for gs:// when tensorflow is absent.
    local = ("copy it to a local disk (or mount it with FUSE: gcsfuse, mountpoint-s3, ...) "
             "and set --config.data.data_dir to that path")
    if scheme and scheme != "gs":
        raise DataError(f"data.data_dir={data_dir!r}: TFDS's array_record reader opens local "
                        f"paths and gs:// only, not {scheme}://; {local}")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(f"TFDS has no dataset {name!r}; use a TFDS image classification name "
                        "(e.g. cifar10, cifar100, imagenet2012), digits or synthetic") from e
    except ImportError as e:
        if not scheme:
            raise
        raise DataError(f"data.data_dir={data_dir!r} is on Google Cloud Storage: `pip install "
                        f"gcsfs` (TFDS reads the dataset's metadata through it; array_record "
                        f"reads the shards from gs:// itself), or {local}") from e
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise DataError(f"TFDS dataset {name!r} has features {list(features)}; an image "
                        "classification dataset with 'image' and 'label' is required")
    if download:
        from tensorflow_datasets.core import download as tfds_download

        try:
            builder.download_and_prepare(
                file_format="array_record",
                download_config=tfds_download.DownloadConfig(manual_dir=manual_dir))
        except ImportError as e:
            # TFDS 4.9.x imports importlib_resources unconditionally but declares it only for
            # Python < 3.9; past it, preparing needs network and tensorflow (image encoding).
            missing = getattr(e, "name", None) or str(e)
            raise DataError(f"--config.data.download=True runs TFDS's download_and_prepare, "
                            f"which imports {missing!r} (not installed) and then needs network "
                            f"and tensorflow; without them: {_tfds_how(name, builder, manual_dir)}"
                            ) from e
    splits = list(builder.info.splits)
    if eval_split is None:
        eval_split = _TFDS_EVAL_SPLIT.get(name, "test")
        if splits and eval_split not in splits and "validation" in splits:
            eval_split = "validation"
    shape = tuple(features["image"].shape)
    num_classes = int(features["label"].num_classes)
    sources = []
    for split in ("train", eval_split):
        if splits and split not in splits:
            raise DataError(f"TFDS dataset {name!r} has splits {splits}, not {split!r}; set "
                            "--config.data.tfds_eval_split")
        try:
            ds = builder.as_data_source(split=split)
        except (NotImplementedError, FileNotFoundError, OSError, ValueError) as e:
            if builder.is_prepared():
                msg = (f"TFDS dataset {name!r} in {builder.data_dir} is prepared as "
                       f"{builder.info.file_format}, which needs tensorflow to read; "
                       f"re-prepare it as array_record ({e})")
            else:
                msg = (f"TFDS dataset {name!r} is not prepared in "
                       f"{builder._data_dir_root}; {_tfds_how(name, builder, manual_dir)}")
            raise DataError(msg) from e
        shards = tuple((os.fspath(f.filename), int(f.skip), int(f.take))
                       for f in builder.info.splits[split].file_instructions) if splits else ()
        sources.append(TfdsSource(ds, 0, len(ds), num_classes, shape,  # type: ignore[arg-type]
                                  builder, split, shards, _tfds_repair(name, builder)))
    return sources[0], sources[1]


def _tfds_repair(name: str, builder: Any) -> str:
    """How to repair a prepared dataset whose files are damaged (the end of a DataError)."""
    root = builder._data_dir_root
    if name in PREPARED_HERE:
        how = f"`python -m resnet_jax.data.prepare {name} --data_dir={root} ...`"
    else:
        how = f"`tfds build {name} --data_dir={root} --file_format=array_record`"
    return (f"restore the file from a copy, or delete {builder.data_dir} and prepare the "
            f"dataset again: {how}")
