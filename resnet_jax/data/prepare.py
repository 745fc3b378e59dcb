"""Writes TFDS-format array_record datasets from the official archives, without TensorFlow.

Usage::

    # ImageNet: DIR holds ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (image-net.org)
    python -m resnet_jax.data.prepare imagenet2012 --manual_dir DIR --data_dir OUT
    # CIFAR: DIR holds cifar-10-python.tar.gz / cifar-100-python.tar.gz (or pass --archive)
    python -m resnet_jax.data.prepare cifar10 --manual_dir DIR --data_dir OUT
    python -m resnet_jax.data.prepare cifar100 --archive cifar-100-python.tar.gz --data_dir OUT
    # then train on it
    python train.py --config configs/imagenet.py:resnet50 --config.data.data_dir=OUT

The output is what ``tfds build NAME --file_format=array_record`` writes (``OUT/NAME/VERSION/``
with ``dataset_info.json``, ``features.json``, label names and ``NAME-SPLIT.array_record-
0000k-of-0000n`` shards), so ``tfds.data_source(NAME, data_dir=OUT)`` opens it. It is written
with TFDS's own feature encoders and ``tf.train.Example`` serializer (its vendored protos; no
TensorFlow), in TFDS's record order (md5 of the split name and the example key), with TFDS's
shard-count rule unless ``--num_shards`` or ``--max_shard_mb`` say otherwise. JPEGs are stored
as they are in the tar, except that CMYK JPEGs and the PNG named ``.JPEG`` are re-encoded as RGB
JPEG (quality 100), as TFDS's imagenet2012 builder does.

Resuming: shards are written to a temporary file and renamed; a rerun after an interruption keeps
every complete shard (checked by its record count) and writes the rest. The dataset is written
in ``OUT/NAME/incomplete.prepare_VERSION/`` and renamed to ``OUT/NAME/VERSION/`` at the end.
ImageNet shards read their images from the tars by offset (one header-only pass lists them).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import itertools
import os
import re
import sys
import tarfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from resnet_jax.data.sources import (
    CIFAR_LAYOUT,
    CIFAR_URL,
    PREPARED_HERE,
    DataError,
    cifar_archive,
    unpickle_cifar,
)

IMAGENET_URL = "https://image-net.org/download-images"
IMAGENET_TARS = {"train": "ILSVRC2012_img_train.tar", "validation": "ILSVRC2012_img_val.tar"}
DATASETS = PREPARED_HERE
MIN_SHARD_MB, MAX_SHARD_MB = 64, 1024  # TFDS's shard_utils defaults

_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")
# JPEG start-of-frame markers (not DHT C4, JPG C8, DAC CC): the component count follows.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """One split to write: example keys (TFDS hashes them to order the records), an estimate
    of each serialized record's size (for the shard count) and a loader of examples by index."""

    name: str
    keys: Sequence[Any]
    sizes: np.ndarray
    load: Callable[[Sequence[int]], dict[int, dict]]


# ---------------------------------------------------------------------------------------------
# Shard writing (shared by all datasets).


def num_shards_for(total_bytes: int, num_examples: int, min_mb: int = MIN_SHARD_MB,
                   max_mb: int = MAX_SHARD_MB) -> int:
    """TFDS's ``ShardConfig.calculate_number_shards`` with configurable shard sizes."""
    total = total_bytes + 16 * num_examples
    most, least = total // (min_mb << 20), total // (max_mb << 20)
    if least <= 1024 <= most and num_examples >= 1024:
        return 1024
    if least > 1024:
        n = 2048
        while not (n >= least and num_examples >= n):
            n += 1024
        return n
    for n in (512, 256, 128, 64, 32, 16, 8, 4, 2):
        if least <= n <= most and num_examples >= n:
            return n
    return 1


def _write_split(builder: Any, out_dir: str, plan: SplitPlan, num_shards: int | None,
                 max_shard_mb: int) -> Any:
    """Writes one split's shards into ``out_dir`` (skipping complete ones); its SplitInfo."""
    import tqdm
    from tensorflow_datasets.core import example_serializer, file_adapters, hashing, naming
    from tensorflow_datasets.core import splits as splits_lib
    from tensorflow_datasets.core.utils import shard_utils

    n = len(plan.keys)
    if n == 0:
        raise DataError(f"no examples for split {plan.name!r}")
    hasher = hashing.Hasher(plan.name)
    hashed = [hasher.hash_key(k) for k in plan.keys]
    order = sorted(range(n), key=hashed.__getitem__)
    for a, b in itertools.pairwise(order):
        if hashed[a] == hashed[b]:
            raise DataError(f"two examples of split {plan.name!r} have the key {plan.keys[a]!r}")
    total = int(np.sum(plan.sizes))
    shards = num_shards or num_shards_for(total, n, min(MIN_SHARD_MB, max_shard_mb), max_shard_mb)
    shards = min(shards, n)
    template = naming.ShardedFileTemplate(split=plan.name, dataset_name=builder.name,
                                          data_dir=out_dir, filetype_suffix="array_record")
    paths = [os.fspath(template.sharded_filepath(shard_index=i, num_shards=shards))
             for i in range(shards)]
    prefix = f"{builder.name}-{plan.name}.array_record-"
    for stale in os.listdir(out_dir):  # shards of an earlier run with another shard count
        if stale.startswith(prefix) and os.path.join(out_dir, stale) not in paths:
            os.remove(os.path.join(out_dir, stale))
    features = builder.info.features
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    adapter = file_adapters.ArrayRecordFileAdapter
    bounds = [0, *shard_utils.get_shard_boundaries(n, shards)]
    lengths = [b - a for a, b in itertools.pairwise(bounds)]
    bar = tqdm.tqdm(total=n, desc=f"{builder.name} {plan.name}", unit=" img", dynamic_ncols=True,
                    mininterval=1.0)
    with bar:
        for i, path in enumerate(paths):
            if os.path.exists(path) and _num_records(adapter, path) == lengths[i]:
                bar.update(lengths[i])
                continue
            indices = order[bounds[i]:bounds[i + 1]]
            examples = plan.load(indices)
            records = ((None, serializer.serialize_example(features.encode_example(examples[j])))
                       for j in indices)
            _write_shard(adapter, path, records)
            bar.update(lengths[i])
    num_bytes = sum(os.path.getsize(p) for p in paths)
    return splits_lib.SplitInfo(name=plan.name, shard_lengths=lengths, num_bytes=num_bytes,
                                filename_template=template)


def _num_records(adapter: Any, path: str) -> int:
    try:
        return adapter.num_examples(path)
    except Exception:  # an unreadable (partial) shard is rewritten
        return -1


def _write_shard(adapter: Any, path: str, records: Any) -> None:
    """Writes atomically: a temporary file renamed over ``path`` once complete."""
    tmp = f"{path}.tmp"
    try:
        adapter.write_examples(tmp, records)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _prepare(name: str, data_dir: str | None, plans: Callable[[Any], list[SplitPlan]],
             num_shards: int | None, max_shard_mb: int) -> str:
    """Writes every split of ``name`` and its metadata; returns the dataset folder."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import constants
    from tensorflow_datasets.core import splits as splits_lib

    builder = tfds.builder(name, data_dir=data_dir)
    final = os.fspath(builder.data_dir)
    if os.path.exists(os.path.join(final, "dataset_info.json")):
        print(f"{name} is already prepared in {final} (delete it to prepare it again)")
        return final
    builder.info.set_file_format("array_record", override=True)
    parent, version = os.path.split(final)
    work = os.path.join(parent, f"{constants.INCOMPLETE_PREFIX}prepare_{version}")
    os.makedirs(work, exist_ok=True)
    infos = [_write_split(builder, work, plan, num_shards, max_shard_mb)
             for plan in plans(builder)]
    builder.info.set_splits(splits_lib.SplitDict(infos))
    builder.info.write_to_directory(work)
    if os.path.isdir(final) and not os.listdir(final):
        os.rmdir(final)
    os.rename(work, final)
    return final


# ---------------------------------------------------------------------------------------------
# ImageNet (ILSVRC 2012) from the official tars.


def _imagenet_rules() -> tuple[list[str], frozenset[str]]:
    """(synsets in label order, file names TFDS re-encodes) from the tensorflow_datasets package."""
    from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as ib
    from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

    synsets = imagenet_common.label_names_file().read_text().split()
    return synsets, frozenset(ib.CMYK_IMAGES) | frozenset(ib.PNG_IMAGES)


def _validation_synsets() -> list[str]:
    import tensorflow_datasets as tfds

    path = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt")
    return path.read_text().strip().splitlines()


def _member_name(name: str) -> str | None:
    """TFDS's archive name rule: normalised; hidden, absolute and backup files skipped."""
    path = os.path.normpath(name)
    if path.startswith(".") or os.path.isabs(path) or path.endswith("~") or \
            os.path.basename(path).startswith("."):
        return None
    return path


def _tar_error(path: str, e: BaseException) -> DataError:
    return DataError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); download it "
                     f"again from {IMAGENET_URL}")


def _list_tar(path: str, tar: tarfile.TarFile, base: int, limit: int) -> list[tarfile.TarInfo]:
    """Regular-file members of an open tar (headers only: it seeks over the data); each
    member's data must lie within ``limit`` bytes, else the tar is truncated."""
    members = []
    for m in tar:
        if m.isfile():
            if m.offset_data + m.size > limit:
                raise DataError(f"{path} is truncated: {m.name} ends at byte "
                                f"{base + m.offset_data + m.size}, past the end of the "
                                f"{'file' if base == 0 else 'class tar'}; download it again "
                                f"from {IMAGENET_URL}")
            members.append(m)
    if base == 0:  # a whole file: an intact tar ends with a zero block after its last member
        tar.fileobj.seek(tar.offset)
        if tar.fileobj.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
            raise DataError(f"{path} is truncated (no end-of-archive block after its last "
                            f"member, {members[-1].name if members else '-'}); download it "
                            f"again from {IMAGENET_URL}")
    return members


def _is_cmyk_or_not_jpeg(data: bytes) -> bool:
    """True for a PNG (or anything not JPEG) and for a 4-component (CMYK/YCCK) JPEG."""
    if not data.startswith(b"\xff\xd8"):
        return True
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _SOF:
            return data[i + 9] == 4
        if marker == 0xDA:  # start of scan before any frame header: not a JPEG we know
            return False
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return False


def _to_rgb_jpeg(data: bytes) -> bytes:
    """TFDS's fix for CMYK JPEGs and the PNG named .JPEG: decode, encode RGB JPEG quality 100."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        rgb = im.convert("RGB")
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=100)
    return out.getvalue()


@dataclasses.dataclass(frozen=True)
class _TarImages:
    """Images of one tar file, by byte offset: names, offsets, sizes, labels."""

    path: str
    names: list[str]
    offsets: np.ndarray
    sizes: np.ndarray
    labels: np.ndarray
    fix: frozenset[str]

    def load(self, indices: Sequence[int]) -> dict[int, dict]:
        out = {}
        try:
            with open(self.path, "rb") as f:
                for j in sorted(indices, key=lambda j: self.offsets[j]):
                    f.seek(int(self.offsets[j]))
                    data = f.read(int(self.sizes[j]))
                    if len(data) != self.sizes[j]:
                        raise DataError(f"{self.path} is truncated (at {self.names[j]}); "
                                        f"download it again from {IMAGENET_URL}")
                    name = self.names[j]
                    if name in self.fix or _is_cmyk_or_not_jpeg(data):
                        data = _to_rgb_jpeg(data)
                    out[j] = {"image": io.BytesIO(data), "label": int(self.labels[j]),
                              "file_name": name}
        except OSError as e:
            raise _tar_error(self.path, e) from e
        return out

    def plan(self, split: str) -> SplitPlan:
        # A serialized record is the JPEG plus ~80 bytes of names and framing.
        return SplitPlan(split, self.names, self.sizes + 80, self.load)


def _imagenet_train(path: str, synsets: list[str], fix: frozenset[str]) -> _TarImages:
    index = {s: i for i, s in enumerate(synsets)}
    names: list[str] = []
    offsets: list[int] = []
    sizes: list[int] = []
    labels: list[int] = []
    classes = 0
    try:
        with open(path, "rb") as f:
            end = os.fstat(f.fileno()).st_size
            with tarfile.open(fileobj=f, mode="r:") as outer:
                for m in _list_tar(path, outer, 0, end):
                    synset = os.path.basename(m.name)[:-4]
                    if not m.name.endswith(".tar") or synset not in index:
                        raise DataError(f"{path} holds {m.name!r}, not a class tar "
                                        f"(n01440764.tar ...): not {IMAGENET_TARS['train']}")
                    classes += 1
                    with tarfile.open(fileobj=outer.extractfile(m), mode="r:") as inner:
                        listed = _list_tar(path, inner, m.offset_data, m.size)
                    for im in listed:
                        name = _member_name(im.name)
                        if name is None:
                            continue
                        names.append(name)
                        offsets.append(m.offset_data + im.offset_data)
                        sizes.append(im.size)
                        labels.append(index[synset])
    except DataError:
        raise
    except (OSError, EOFError, tarfile.TarError) as e:
        raise _tar_error(path, e) from e
    if classes < len(synsets):
        print(f"warning: {path} has {classes} of the {len(synsets)} class tars; writing "
              f"{len(names)} training images of those classes", file=sys.stderr)
    return _TarImages(path, names, np.asarray(offsets, np.int64), np.asarray(sizes, np.int64),
                      np.asarray(labels, np.int64), fix)


def _imagenet_validation(path: str, synsets: list[str], fix: frozenset[str]) -> _TarImages:
    index = {s: i for i, s in enumerate(synsets)}
    truth = _validation_synsets()
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            members = _list_tar(path, tar, 0, os.fstat(f.fileno()).st_size)
    except DataError:
        raise
    except (OSError, EOFError, tarfile.TarError) as e:
        raise _tar_error(path, e) from e
    members = [m for m in members if _member_name(m.name)]
    names = [_member_name(m.name) for m in members]
    # TFDS zips the sorted file names with the ground truth; by number is the same for the full
    # tar and stays right for a part of it.
    labels = []
    for name in names:
        match = _VAL_NAME.fullmatch(os.path.basename(name))  # type: ignore[arg-type]
        if not match or not 1 <= int(match.group(1)) <= len(truth):
            raise DataError(f"{path} holds {name!r}, not ILSVRC2012_val_<8 digits>.JPEG: not "
                            f"{IMAGENET_TARS['validation']}")
        labels.append(index[truth[int(match.group(1)) - 1]])
    return _TarImages(path, names, np.asarray([m.offset_data for m in members], np.int64),
                      np.asarray([m.size for m in members], np.int64),
                      np.asarray(labels, np.int64), fix)


def prepare_imagenet(manual_dir: str, data_dir: str | None, num_shards: int | None = None,
                     max_shard_mb: int = MAX_SHARD_MB) -> str:
    """Writes imagenet2012 (train, validation) from the official tars in ``manual_dir``."""
    paths = {split: os.path.join(manual_dir, f) for split, f in IMAGENET_TARS.items()}
    for path in paths.values():
        if not os.path.isfile(path):
            raise DataError(f"{path} not found: register at {IMAGENET_URL}, download "
                            f"{' and '.join(IMAGENET_TARS.values())} (ILSVRC 2012) into "
                            f"{manual_dir} (or pass --manual_dir)")
    synsets, fix = _imagenet_rules()

    def plans(builder: Any) -> list[SplitPlan]:
        return [_imagenet_train(paths["train"], synsets, fix).plan("train"),
                _imagenet_validation(paths["validation"], synsets, fix).plan("validation")]

    return _prepare("imagenet2012", data_dir, plans, num_shards, max_shard_mb)


# ---------------------------------------------------------------------------------------------
# CIFAR-10/100 from the official python archives.


def _cifar_extras(path: str, dataset: str) -> tuple[dict[str, list[str]], dict[str, np.ndarray]]:
    """(label names by feature, cifar100 coarse labels by file) from the python archive."""
    top = CIFAR_LAYOUT[dataset][0]
    wanted = {"batches.meta", "meta", "train", "test"}
    raw: dict[str, bytes] = {}
    if os.path.isdir(path):
        root = path if os.path.basename(os.path.normpath(path)) == top else os.path.join(path, top)
        for name in wanted:
            if os.path.isfile(os.path.join(root, name)):
                with open(os.path.join(root, name), "rb") as f:
                    raw[name] = f.read()
    else:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                folder, _, name = member.name.removeprefix("./").rpartition("/")
                if folder == top and name in wanted and member.isfile():
                    if dataset == "cifar10" and name != "batches.meta":
                        continue
                    raw[name] = tar.extractfile(member).read()  # type: ignore[union-attr]
    names: dict[str, list[str]] = {}
    meta = unpickle_cifar(raw["batches.meta" if dataset == "cifar10" else "meta"]) \
        if {"batches.meta", "meta"} & set(raw) else {}
    for feature, key in (("label", b"label_names"), ("label", b"fine_label_names"),
                         ("coarse_label", b"coarse_label_names")):
        if key in meta:
            names[feature] = [v.decode() if isinstance(v, bytes) else str(v) for v in meta[key]]
    coarse = {}
    if dataset == "cifar100":
        for split in ("train", "test"):
            batch = unpickle_cifar(raw[split])
            coarse[split] = np.asarray(batch[b"coarse_labels"], np.int64)
    return names, coarse


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def prepare_cifar(dataset: str, archive: str, data_dir: str | None,
                  num_shards: int | None = None, max_shard_mb: int = MAX_SHARD_MB) -> str:
    """Writes cifar10/cifar100 (train, test) from the official python archive."""
    expected = CIFAR_LAYOUT[dataset][4]
    if not os.path.exists(archive):
        raise DataError(f"{archive} not found: download {expected} (python version) from "
                        f"{CIFAR_URL} (or pass --archive PATH)")
    train, test = cifar_archive(archive, dataset)
    try:
        names, coarse = _cifar_extras(archive, dataset)
    except (OSError, EOFError, tarfile.TarError, KeyError, ValueError) as e:
        raise DataError(f"CIFAR archive {archive!r} is truncated or corrupt "
                        f"({type(e).__name__}: {e})") from e

    def plan(split: str, prefix: str, source: Any) -> SplitPlan:
        def load(indices: Sequence[int]) -> dict[int, dict]:
            out = {}
            for j in indices:
                ex = {"id": f"{prefix}{j:05d}", "image": io.BytesIO(_png(source.images[j])),
                      "label": int(source.labels[j])}
                if dataset == "cifar100":
                    ex["coarse_label"] = int(coarse[split][j])
                out[j] = ex
            return out

        n = len(source)
        return SplitPlan(split, list(range(n)), np.full(n, 3200), load)

    def plans(builder: Any) -> list[SplitPlan]:
        for feature, values in names.items():
            if len(values) == builder.info.features[feature].num_classes:
                builder.info.features[feature].names = values
        return [plan("train", "train_", train), plan("test", "test_", test)]

    return _prepare(dataset, data_dir, plans, num_shards, max_shard_mb)


# ---------------------------------------------------------------------------------------------
# Command line.


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m resnet_jax.data.prepare",
        description="Writes a TFDS-format (array_record) dataset from the official archives, "
                    "without TensorFlow.")
    parser.add_argument("dataset", choices=DATASETS)
    parser.add_argument("--data_dir", default=None,
                        help="TFDS data_dir to write into (default: TFDS's, ~/tensorflow_datasets"
                             " or $TFDS_DATA_DIR); train with --config.data.data_dir=DATA_DIR")
    parser.add_argument("--manual_dir", default=None,
                        help="folder with the official archives (default: DATA_DIR/downloads/"
                             "manual)")
    parser.add_argument("--archive", default=None,
                        help="CIFAR only: the python archive (instead of MANUAL_DIR/<name>)")
    parser.add_argument("--num_shards", type=int, default=None,
                        help="shards per split (default: TFDS's rule, shards of 64 MiB to "
                             "MAX_SHARD_MB)")
    parser.add_argument("--max_shard_mb", type=int, default=MAX_SHARD_MB,
                        help="largest shard in MiB for the default shard count (TFDS: 1024)")
    args = parser.parse_args(argv)
    if args.num_shards is not None and args.num_shards < 1:
        parser.error("--num_shards must be >= 1")
    if args.max_shard_mb < 1:
        parser.error("--max_shard_mb must be >= 1")
    try:
        manual_dir = args.manual_dir
        if manual_dir is None:
            import tensorflow_datasets as tfds

            root = args.data_dir or os.fspath(tfds.core.constants.DATA_DIR)
            manual_dir = os.path.join(os.path.expanduser(root), "downloads", "manual")
        if args.dataset == "imagenet2012":
            out = prepare_imagenet(manual_dir, args.data_dir, args.num_shards, args.max_shard_mb)
        else:
            archive = args.archive or os.path.join(manual_dir, CIFAR_LAYOUT[args.dataset][4])
            out = prepare_cifar(args.dataset, archive, args.data_dir, args.num_shards,
                                args.max_shard_mb)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    print(f"wrote {out}; train with --config.dataset={args.dataset} "
          f"--config.data.data_dir={os.path.dirname(os.path.dirname(out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
