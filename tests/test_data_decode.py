"""Encoded images in the §3.4 recipe: bytes decode to exactly the array path's crops, libjpeg's
DCT scaling (``Image.draft``) stays close to a full decode, grey/CMYK/1-channel images, and TFDS
sources that hand the recipe the stored JPEG bytes (no TensorFlow)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from helpers import data_config
from PIL import Image

from resnet_jax import data
from resnet_jax.data import augment, pipeline, sources

RNG = np.random.default_rng(0)
# Measured mean absolute difference from the full decode, in 0..255 units: 0.59 over the crops
# below (400x300 photo-like JPEGs, DCT scales 1/2..1/8; worst crop 1.57); 0.89 on crops of
# scikit-learn's two photos at 1000x750, shorter side in [256, 375] (worst image 2.0).
DRAFT_MEAN_ABS_DIFF = 1.5


def photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth gradients, a few flat shapes and mild noise: JPEG-typical content."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    a = np.stack([200 * x + 30, 180 * y + 40, 120 * (1 - x * y) + 60], axis=-1)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.3) * min(h, w)
        a[(np.mgrid[0:h, 0:w][0] - cy) ** 2 + (np.mgrid[0:h, 0:w][1] - cx) ** 2 < r * r] = (
            rng.uniform(0, 255, 3))
    a += rng.normal(0, 2, a.shape)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def encode(a: np.ndarray, mode: str | None = None, fmt: str = "JPEG") -> bytes:
    img = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
    if mode:
        img = img.convert(mode)
    out = io.BytesIO()
    img.save(out, format=fmt, quality=90)
    return out.getvalue()


def full_decode(b: bytes, mode: str = "RGB") -> np.ndarray:
    a = np.asarray(Image.open(io.BytesIO(b)).convert(mode))
    return a[..., None] if a.ndim == 2 else a


@pytest.fixture(scope="module")
def jpegs():
    return [encode(photo(RNG, 300, 400)) for _ in range(4)]  # stored shorter side 300


def test_bytes_give_exactly_the_array_crops_when_no_draft_applies(jpegs):
    pos = np.array([0.3, 0.8])
    for b in jpegs:
        a = full_decode(b)
        assert augment._decoded(b, 3, 151).scale == 1.0  # 151 > 300 / 2: full-size decode
        np.testing.assert_array_equal(augment.decode(b), a)
        for s in (151, 224, 300, 480):
            np.testing.assert_array_equal(augment.train_crop(b, s, pos, 128),
                                          augment.train_crop(a, s, pos, 128))
            np.testing.assert_array_equal(augment.center_crop(b, s, 96),
                                          augment.center_crop(a, s, 96))
            np.testing.assert_array_equal(augment.resize_shorter(b, s),
                                          augment.resize_shorter(a, s))
        np.testing.assert_array_equal(augment.ten_crop(b, 256, 224), augment.ten_crop(a, 256, 224))
        mb, ma = augment.multi_scale(b, (160, 224)), augment.multi_scale(a, (160, 224))
        for k in ma:
            np.testing.assert_array_equal(mb[k], ma[k])
    shorter, poss = np.array([200, 300, 256, 480]), RNG.random((4, 2))
    np.testing.assert_array_equal(
        augment.imagenet_train(jpegs, shorter, poss, 128),
        augment.imagenet_train([full_decode(b) for b in jpegs], shorter, poss, 128))


def test_draft_decodes_at_a_reduced_scale_close_to_the_full_decode(jpegs):
    diffs = []
    for b in jpegs:
        a = full_decode(b)
        for s, scale in ((150, 2), (100, 2), (74, 4), (37, 8)):
            assert augment._decoded(b, 3, s).scale == scale
            size = min(s, 64)
            for pos in (np.array([0.0, 0.0]), np.array([0.99, 0.99]), RNG.random(2)):
                got = augment.train_crop(b, s, pos, size)
                want = augment.train_crop(a, s, pos, size)
                assert got.shape == want.shape == (size, size, 3) and got.dtype == np.uint8
                diffs.append(np.abs(got.astype(np.int16) - want).mean())
        d = augment.resize_shorter(b, 100)
        assert d.shape == (100, 133, 3)
        assert np.abs(d.astype(np.int16) - augment.resize_shorter(a, 100)).mean() < 3.0
    assert np.mean(diffs) < DRAFT_MEAN_ABS_DIFF, np.mean(diffs)
    assert max(diffs) < 2 * DRAFT_MEAN_ABS_DIFF, max(diffs)


@pytest.mark.parametrize("s", [256, 100])  # full-size decode, then DCT scale 1/2
def test_grey_and_cmyk_jpegs_decode_to_rgb(s):
    rgb = photo(RNG, 240, 320)
    pos = np.array([0.5, 0.25])
    grey = encode(rgb, "L")
    out = augment.train_crop(grey, s, pos, 64)
    assert out.shape == (64, 64, 3)
    np.testing.assert_array_equal(out[..., 0], out[..., 1])  # TFDS repeats the grey plane
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    if s == 256:
        g = full_decode(grey, "L")
        np.testing.assert_array_equal(out, augment.train_crop(np.repeat(g, 3, -1), s, pos, 64))
    cmyk = encode(rgb, "CMYK")
    assert Image.open(io.BytesIO(cmyk)).mode == "CMYK"
    out = augment.train_crop(cmyk, s, pos, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    ref = augment.train_crop(rgb, s, pos, 64)  # the pixels before CMYK encoding
    assert np.abs(out.astype(np.int16) - ref).mean() < 4.0
    png = encode(rgb, "RGBA", fmt="PNG")  # not a JPEG: no draft; alpha dropped
    np.testing.assert_array_equal(augment.train_crop(png, s, pos, 64), ref)


def recipe(channels: int, size: int = 32) -> pipeline.Recipe:
    return pipeline.Recipe(kind="imagenet", size=size, channels=channels,
                           mean=augment.IMAGENET_MEAN_RGB[:channels], augment=True, flip=True,
                           pad=4, scale_range=(size, 2 * size), eval_resize=size,
                           eval_protocol="center", multi_scale_sizes=(size,), pca_std=0.0)


def test_one_channel_encoded_dataset():
    rgb = [photo(RNG, 90, 120) for _ in range(5)]
    grey = [encode(a, "L") for a in rgb[:3]] + [encode(a) for a in rgb[3:]]  # mixed files
    src = sources.EncodedSource(grey, [0, 1, 2, 3, 4], 5, channels=1)
    assert src.image_shape == (None, None, 1) and len(src) == 5
    plan = pipeline.Plan(src, recipe(1), 4, 0, 1, seed=3)
    b = plan.train_batch(0)
    assert b["image"].shape == (4, 32, 32, 1) and b["image"].dtype == np.uint8
    e = plan.eval_batch(1)
    assert e["image"].shape == (4, 32, 32, 1) and e["mask"].tolist() == [1, 0, 0, 0]
    luma = np.asarray(Image.fromarray(rgb[4]).convert("L"))  # an RGB file read as grey
    got = augment.center_crop(grey[4], 64, 48, channels=1)
    want = augment.center_crop(luma[..., None], 64, 48)
    assert got.shape == (48, 48, 1) and np.abs(got.astype(np.int16) - want).mean() < 2.0


def test_encoded_source_reads_bytes_and_splits():
    files = [encode(photo(RNG, 40, 50)) for _ in range(4)]
    src = sources.EncodedSource(files, np.array([3, 1, 2, 0]), 4)
    images, labels = src.read(np.array([2, 0]))
    assert images == [files[2], files[0]] and labels.tolist() == [2, 3]
    assert labels.dtype == np.int32
    train, held = src.split(1)
    assert (len(train), len(held)) == (3, 1) and held.read(np.array([0]))[0] == [files[3]]
    with pytest.raises(ValueError, match="bytes"):
        sources.EncodedSource([np.zeros((2, 2, 3), np.uint8)], [0], 1)
    # The RGB recipe's batch from bytes equals the batch from the decoded arrays.
    arrays = sources.ArraySource(np.stack([full_decode(f) for f in files]), src.labels, 4)
    for s in (src, arrays):
        assert s.image_shape[2] == 3
    a = pipeline.Plan(src, recipe(3), 2, 0, 1, seed=1).train_batch(5)
    b = pipeline.Plan(arrays, recipe(3), 2, 0, 1, seed=1).train_batch(5)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


# -- TFDS: a real (tiny) imagenet2012 array_record dataset, written without TensorFlow --------


@pytest.fixture(scope="module")
def tfds_imagenet(tmp_path_factory):
    pytest.importorskip("tensorflow_datasets")
    from resnet_jax.data import prepare

    out = str(tmp_path_factory.mktemp("tfds"))
    rng = np.random.default_rng(1)
    files = {"train": [encode(photo(rng, 300, 400)) for _ in range(6)],
             "validation": [encode(photo(rng, 400, 300)) for _ in range(3)]}

    def plans(builder):
        def plan(split):
            def load(indices):
                return {j: {"file_name": f"{split}_{j}.JPEG", "image": io.BytesIO(files[split][j]),
                            "label": j} for j in indices}
            n = len(files[split])
            return prepare.SplitPlan(split, list(range(n)), np.full(n, 30_000), load)
        return [plan("train"), plan("validation")]

    prepare._prepare("imagenet2012", out, plans, None, prepare.MAX_SHARD_MB)
    return out, files


def test_tfds_imagenet_recipe_reads_the_stored_jpeg_bytes(tfds_imagenet):
    out, files = tfds_imagenet
    train, test = sources.tfds_splits("imagenet2012", out, None, False, None)
    assert isinstance(train.read(np.array([0]))[0][0], np.ndarray)  # TFDS decodes by default
    enc_train, enc_test = train.encoded(), test.encoded()
    images, labels = enc_train.read(np.arange(6))
    assert all(isinstance(b, bytes) for b in images)
    assert images == [files["train"][k] for k in labels]  # the stored files, byte for byte
    assert sorted(labels.tolist()) == list(range(6))
    np.testing.assert_array_equal(full_decode(images[0]), train.read(np.array([0]))[0][0])
    assert enc_test.read(np.array([2]))[0][0] in files["validation"]
    cfg = data_config("imagenet2012", data_dir=out)
    _, r, src, ev = data._open(cfg)
    assert r.kind == "imagenet"
    assert isinstance(src.read(np.array([0]))[0][0], bytes)
    assert isinstance(ev.read(np.array([0]))[0][0], bytes)


def test_tfds_imagenet_batches_from_bytes(tfds_imagenet):
    out, _ = tfds_imagenet
    cfg = data_config("imagenet2012", data_dir=out, validation_split=2)
    info = data.info(cfg)
    assert info.image_shape == (224, 224, 3) and (info.num_train, info.num_eval) == (4, 2)
    b = next(data.create(cfg, "train", seed=2))
    assert b["image"].shape == (4, 224, 224, 3) and b["image"].dtype == np.uint8
    assert b["flip"].shape == (4,) and b["pca_alpha"].shape == (4, 3)
    (e,) = list(data.create(data_config("imagenet2012", data_dir=out, eval_batch_size=4),
                            "eval"))
    assert e["image"].shape == (4, 224, 224, 3) and e["mask"].tolist() == [1, 1, 1, 0]
    # The same batch as from TFDS's decoded arrays: no draft applies at these scales.
    train, _ = sources.tfds_splits("imagenet2012", out, None, False, None)
    _, r, enc, _ = data._open(cfg)
    decoded = train.split(2)[0]
    for step in (0, 1):
        x = pipeline.Plan(enc, r, 4, 0, 1, seed=2).train_batch(step)
        y = pipeline.Plan(decoded, r, 4, 0, 1, seed=2).train_batch(step)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
