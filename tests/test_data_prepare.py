"""python -m resnet_jax.data.prepare: official-layout ImageNet tars and CIFAR archives built here
from known pixels, written as TFDS array_record without TensorFlow, read back through TFDS and
through data.create. Nothing here touches the network."""

import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from helpers import data_config  # noqa: E402
from test_data_archive import known, write_archive  # noqa: E402

from resnet_jax import data  # noqa: E402
from resnet_jax.data import prepare, sources  # noqa: E402
from resnet_jax.data.prepare import _imagenet_rules  # noqa: E402

SYNSETS, _ = _imagenet_rules()
VAL_TRUTH = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt").read_text().split()
FIXED = ("n01739381_1309.JPEG", "n02105855_2933.JPEG")  # TFDS's CMYK and PNG lists
SMALL = dict(image_size=16, eval_resize=20, scale_range=(20, 24), multi_scale_sizes=(16,),
             pca_std=0.0, workers=1)


def smooth(rng, h, w):
    """A smooth random picture (re-encoding it as JPEG changes it little)."""
    small = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8))
    return small.resize((w, h), Image.BILINEAR)


def jpeg(rng, h, w, mode="RGB"):
    out = io.BytesIO()
    smooth(rng, h, w).convert(mode).save(out, format="JPEG", quality=90)
    return out.getvalue()


def png(rng, h, w):
    out = io.BytesIO()
    smooth(rng, h, w).save(out, format="PNG")
    return out.getvalue()


def add(tar, name, blob):
    info = tarfile.TarInfo(name)
    info.size = len(blob)
    tar.addfile(info, io.BytesIO(blob))


def tar_bytes(files):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, blob in files.items():
            add(tar, name, blob)
    return out.getvalue()


def decode(blob):
    with Image.open(io.BytesIO(blob)) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    """3 class tars (one CMYK JPEG and the PNG named .JPEG under TFDS's own file names) and
    6 validation images; returns (dir, {file_name: (label, expected pixels)} per split)."""
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("manual")
    classes = {
        "n01440764": {"n01440764_10026.JPEG": jpeg(rng, 12, 17),
                      "n01440764_10027.JPEG": jpeg(rng, 20, 9),
                      "n01440764_7.JPEG": jpeg(rng, 8, 8, "L")},
        "n01739381": {"n01739381_1309.JPEG": jpeg(rng, 10, 14, "CMYK"),
                      "n01739381_2.JPEG": jpeg(rng, 15, 11)},
        "n02105855": {"n02105855_2933.JPEG": png(rng, 9, 13),
                      "n02105855_3.JPEG": jpeg(rng, 16, 16)},
    }
    want = {"train": {}, "validation": {}}
    with tarfile.open(d / "ILSVRC2012_img_train.tar", "w") as tar:
        for synset, files in classes.items():
            add(tar, f"{synset}.tar", tar_bytes(files))
            for name, blob in files.items():
                pixels = decode(blob)
                if name in FIXED:  # TFDS's rule: re-encoded as RGB JPEG (quality 100)
                    fixed = decode(prepare._to_rgb_jpeg(blob))
                    assert np.abs(fixed.astype(int) - pixels).mean() < 8  # near the original
                    pixels = fixed
                want["train"][name] = (SYNSETS.index(synset), pixels)
    val = {f"ILSVRC2012_val_{i:08d}.JPEG": jpeg(rng, 10 + i, 14) for i in range(1, 7)}
    with tarfile.open(d / "ILSVRC2012_img_val.tar", "w") as tar:
        for name, blob in reversed(val.items()):  # tar order does not matter
            add(tar, name, blob)
            i = int(name[15:23])
            want["validation"][name] = (SYNSETS.index(VAL_TRUTH[i - 1]), decode(blob))
    return d, want


def run(*argv):
    return prepare.main([str(a) for a in argv])


def read_all(out, split):
    ds = tfds.data_source("imagenet2012", data_dir=str(out), split=split)
    return [ds[i] for i in range(len(ds))]


def check_imagenet(out, want):
    for split in ("train", "validation"):
        got = read_all(out, split)
        assert len(got) == len(want[split])
        by_name = {e["file_name"].decode() if isinstance(e["file_name"], bytes)
                   else e["file_name"]: e for e in got}
        assert set(by_name) == set(want[split])
        for name, (label, pixels) in want[split].items():
            e = by_name[name]
            assert int(e["label"]) == label
            assert e["image"].dtype == np.uint8 and e["image"].shape == pixels.shape
            np.testing.assert_array_equal(e["image"], pixels)


def test_imagenet_round_trip(tars, tmp_path, capsys):
    manual, want = tars
    assert run("imagenet2012", "--manual_dir", manual, "--data_dir", tmp_path) == 0
    assert "warning: " in capsys.readouterr().err  # 3 of the 1000 class tars
    folder = tmp_path / "imagenet2012" / "5.1.0"
    files = sorted(os.listdir(folder))
    assert {"dataset_info.json", "features.json", "label.labels.txt",
            "imagenet2012-train.array_record-00000-of-00001",
            "imagenet2012-validation.array_record-00000-of-00001"} <= set(files)
    check_imagenet(tmp_path, want)
    builder = tfds.builder("imagenet2012", data_dir=str(tmp_path))
    assert builder.info.splits["train"].num_examples == 7
    assert builder.info.splits["validation"].num_examples == 6
    assert len(builder.as_data_source("validation")) == 6
    assert builder.info.features["label"].names == SYNSETS
    # TFDS's record order: md5(split name + key)
    hasher = tfds.core.hashing.Hasher("train")
    names = [e["file_name"] for e in read_all(tmp_path, "train")]
    names = [n.decode() if isinstance(n, bytes) else n for n in names]
    assert names == sorted(names, key=hasher.hash_key)
    # and the project's pipeline reads it
    cfg = data_config("imagenet2012", data_dir=str(tmp_path), **SMALL)
    info = data.info(cfg)
    assert (info.num_classes, info.num_train, info.num_eval) == (1000, 7, 6)
    batch = next(data.create(cfg, "train"))
    assert batch["image"].shape == (4, 16, 16, 3)
    assert set(batch["label"].tolist()) <= {v[0] for v in want["train"].values()}
    evals = list(data.create(cfg, "eval"))
    labels = np.concatenate([b["label"][b["mask"] > 0] for b in evals])
    assert sorted(labels.tolist()) == sorted(v[0] for v in want["validation"].values())
    # a second run says it is there
    assert run("imagenet2012", "--manual_dir", manual, "--data_dir", tmp_path) == 0
    assert "already prepared" in capsys.readouterr().out


def test_imagenet_resumes_after_an_interruption(tars, tmp_path, monkeypatch):
    manual, want = tars
    adapter = tfds.core.file_adapters.ArrayRecordFileAdapter
    real = adapter.write_examples.__func__
    calls = []

    def fail_after_one(cls, path, iterator):
        calls.append(os.path.basename(path))
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(cls, path, iterator)

    monkeypatch.setattr(adapter, "write_examples", classmethod(fail_after_one))
    argv = ("imagenet2012", "--manual_dir", manual, "--data_dir", tmp_path, "--num_shards", 3)
    assert run(*argv) == 130
    work = tmp_path / "imagenet2012" / "incomplete.prepare_5.1.0"
    first = work / "imagenet2012-train.array_record-00000-of-00003"
    assert sorted(os.listdir(work)) == [first.name]  # no partial file left behind
    stamp = first.stat().st_mtime_ns
    monkeypatch.setattr(adapter, "write_examples", classmethod(real))
    os.utime(first, ns=(stamp - 10**9, stamp - 10**9))
    assert run(*argv) == 0
    final = tmp_path / "imagenet2012" / "5.1.0"
    assert (final / first.name).stat().st_mtime_ns == stamp - 10**9  # kept, not rewritten
    assert not work.exists()
    check_imagenet(tmp_path, want)
    assert tfds.builder("imagenet2012", data_dir=str(tmp_path)).info.splits[
        "train"].shard_lengths == [2, 3, 2]


def test_missing_tar_is_one_line(tmp_path, capsys):
    assert run("imagenet2012", "--manual_dir", tmp_path, "--data_dir", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ILSVRC2012_img_train.tar not found" in err
    assert "image-net.org" in err


@pytest.mark.parametrize("cut", ["inside a member", "after a member"])
def test_truncated_tar_is_one_line(tars, tmp_path, capsys, cut):
    manual, _ = tars
    broken = tmp_path / "manual"
    broken.mkdir()
    blob = (manual / "ILSVRC2012_img_train.tar").read_bytes()
    with tarfile.open(manual / "ILSVRC2012_img_train.tar") as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512
    size = len(blob) // 2 if cut == "inside a member" else end
    (broken / "ILSVRC2012_img_train.tar").write_bytes(blob[:size])
    (broken / "ILSVRC2012_img_val.tar").write_bytes((manual / "ILSVRC2012_img_val.tar")
                                                    .read_bytes())
    assert run("imagenet2012", "--manual_dir", broken, "--data_dir", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "ILSVRC2012_img_train.tar is truncated" in err


def test_not_a_tar_is_one_line(tmp_path, capsys):
    for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
        (tmp_path / name).write_bytes(b"x" * 2000)
    assert run("imagenet2012", "--manual_dir", tmp_path, "--data_dir", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ILSVRC2012_img_train.tar is truncated or corrupt" in err


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_round_trip(tmp_path, dataset):
    classes = 10 if dataset == "cifar10" else 100
    train, test = known(12, classes, 0), known(5, classes, 1)
    name = sources.CIFAR_LAYOUT[dataset][4]
    write_archive(tmp_path / name, dataset, train, test)
    out = tmp_path / "out"
    assert run(dataset, "--manual_dir", tmp_path, "--data_dir", out) == 0
    for split, (images, labels) in (("train", train), ("test", test)):
        ds = tfds.data_source(dataset, data_dir=str(out), split=split)
        got = sorted((ds[i] for i in range(len(ds))), key=lambda e: e["id"])
        assert [e["id"] if isinstance(e["id"], str) else e["id"].decode() for e in got] == \
            [f"{split}_{i:05d}" for i in range(len(labels))]
        np.testing.assert_array_equal(np.stack([e["image"] for e in got]), images)
        np.testing.assert_array_equal([e["label"] for e in got], labels)
        if dataset == "cifar100":
            np.testing.assert_array_equal([e["coarse_label"] for e in got], labels // 5)
    assert tfds.builder(dataset, data_dir=str(out)).info.features["label"].names[:2] == \
        ["c0", "c1"]
    # through the project's TFDS source (fixed-size images are read into memory)
    cfg = data_config(dataset, data_dir=str(out), augment=False)
    assert data.info(cfg)[2:] == (12, 5)
    tr, te = sources.tfds_splits(dataset, str(out), None, False, None)
    for src, (images, labels) in ((tr, train), (te, test)):
        mem = src.to_memory()  # TFDS's record order: compare as multisets
        pairs = zip(mem.images, mem.labels, strict=True)
        assert sorted((i.tobytes(), int(lb)) for i, lb in pairs) == \
            sorted((i.tobytes(), int(lb)) for i, lb in zip(images, labels, strict=True))
    assert next(data.create(cfg, "train"))["image"].shape == (4, 32, 32, 3)


def test_cifar_missing_archive(tmp_path, capsys):
    assert run("cifar10", "--manual_dir", tmp_path, "--data_dir", tmp_path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cifar-10-python.tar.gz not found" in err


def test_num_shards_rule_matches_tfds():
    rule = tfds.core.utils.shard_utils.ShardConfig.calculate_number_shards
    for total, n in [(10, 3), (147 << 30, 1_281_167), (6 << 30, 50_000), (5 << 40, 10**8),
                     (300 << 20, 60_000), (200 << 20, 3)]:
        assert prepare.num_shards_for(total, n) == rule(total, n)


def test_remote_data_dir_says_what_to_do():
    with pytest.raises(data.DataError, match=r"gs://bucket/tfds.*(local|mounted|gcsfs)"):
        sources.tfds_splits("cifar10", "gs://bucket/tfds", None, False, None)


def test_unprepared_names_the_prepare_command(tmp_path):
    with pytest.raises(data.DataError, match=r"python -m resnet_jax\.data\.prepare imagenet2012"):
        data.info(data_config("imagenet2012", data_dir=str(tmp_path)))
    with pytest.raises(data.DataError, match=r"python -m resnet_jax\.data\.prepare cifar10"):
        data.info(data_config("cifar10", data_dir=str(tmp_path)))


def test_download_error_says_the_true_cause(tmp_path, monkeypatch):
    def no_module(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'importlib_resources'",
                                  name="importlib_resources")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_module)
    with pytest.raises(data.DataError, match=r"importlib_resources.*resnet_jax\.data\.prepare"):
        data.info(data_config("cifar10", data_dir=str(tmp_path), download=True))
