"""The device half of the recipe: uint8 host batches + ``preprocess`` in the step equal the old
float host pipeline on the same draws; ``data.on_device`` equals host batches exactly."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import data_config, override

import resnet_jax
from resnet_jax import data
from resnet_jax.data import augment, pipeline
from resnet_jax.train import config as config_lib
from resnet_jax.train import preprocess as preprocess_lib
from resnet_jax.train.loop import make_preprocess, train_and_evaluate

# -- the float host pipeline as it was before issue 11 (the reference) -------------------------


def old_normalize(images, mean):
    x = np.subtract(images, mean, dtype=np.float32)
    x *= np.float32(1.0 / 255.0)
    return x


def old_pad_crop_flip(x, offsets, flips, pad):
    b, h, w, c = x.shape
    padded = np.zeros((b, h + 2 * pad, w + 2 * pad, c), x.dtype)
    padded[:, pad:pad + h, pad:pad + w] = x
    out = np.empty_like(x)
    for i, ((top, left), flip) in enumerate(zip(offsets, flips, strict=True)):
        view = padded[i, top:top + h, left:left + w]
        out[i] = view[:, ::-1] if flip else view
    return out


def old_imagenet_train(images, shorter, pos, flips, alpha, size, mean):
    crops = []
    for im, s, p, f in zip(images, shorter, pos, flips, strict=True):
        rh, rw = augment.resized_shape(*im.shape[:2], int(s))
        crop = augment.resize_crop(im, int(s), int(p[0] * (rh - size + 1)),
                                   int(p[1] * (rw - size + 1)), size)
        crops.append(crop[:, ::-1] if f else crop)
    crops = np.stack(crops)
    offset = np.broadcast_to(np.asarray(mean, np.float32), (len(crops), crops.shape[-1]))
    if np.any(alpha):
        offset = offset - np.float32(255.0) * augment.pca_shift(alpha).astype(np.float32)
    return old_normalize(crops, offset[:, None, None, :])


def old_train_batch(plan: pipeline.Plan, step: int) -> np.ndarray:
    """The float images the host pipeline produced for batch ``step`` (same draws, same order)."""
    r = plan.recipe
    images, _ = plan.source.read(plan.train_indices(step))
    rng = pipeline._rng(plan.seed, step, pipeline._AUGMENT)
    g = plan.global_batch
    if r.kind == "cifar":
        offsets = plan._mine(rng.integers(0, 2 * r.pad + 1, size=(g, 2)))
        flips = plan._mine(rng.random(g) < 0.5)
        return old_pad_crop_flip(old_normalize(images, r.mean), offsets, flips & r.flip, r.pad)
    lo, hi = r.scale_range
    shorter = plan._mine(rng.integers(lo, hi + 1, size=g))
    pos = plan._mine(rng.random((g, 2)))
    flips = plan._mine(rng.random(g) < 0.5) & r.flip
    alpha = plan._mine(rng.normal(0.0, 1.0, size=(g, 3))).astype(np.float32) * r.pca_std
    return old_imagenet_train(images, shorter, pos, flips, alpha, r.size, r.mean)


def plan_of(cfg, process_index=0, process_count=1, seed=0) -> pipeline.Plan:
    _, recipe, train, _ = data._open(cfg)
    return pipeline.Plan(train, recipe, cfg.batch_size // process_count, process_index,
                         process_count, seed)


IMAGENET = dict(pipeline="imagenet", image_size=24, eval_resize=28, scale_range=(24, 40),
                num_train=40, num_eval=6)


@pytest.mark.parametrize("fields", [dict(num_train=40, num_eval=6), IMAGENET],
                         ids=["cifar", "imagenet"])
@pytest.mark.parametrize("process_index", [0, 1])
def test_device_preprocess_equals_the_old_host_float_pipeline(fields, process_index):
    cfg = data_config(batch_size=16, **fields)
    pre = jax.jit(make_preprocess(cfg))
    plan = plan_of(cfg, process_index, 2, seed=3)
    stream = data.create(cfg, "train", seed=3, process_index=process_index, process_count=2)
    for step in range(4):  # 40 examples, global batch 16: crosses an epoch
        batch = next(stream)
        assert batch["image"].dtype == np.uint8
        got = pre(batch)
        assert set(got) == {"image", "label"}  # the draws are consumed
        np.testing.assert_allclose(np.asarray(got["image"]), old_train_batch(plan, step),
                                   atol=1e-5, rtol=0)
    stream.close()


def test_pca_colour_shift_and_flip_on_the_device():
    mean = augment.IMAGENET_MEAN_RGB
    image = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    image[1] = image[0]
    image[2] = image[0]
    alpha = np.array([[0, 0, 0], [0, 0, 0], [1, -2, 0.5]], np.float32)
    out = preprocess_lib.preprocess(
        {"image": image, "flip": np.array([False, True, False]), "pca_alpha": alpha,
         "label": np.zeros(3, np.int32)}, mean=mean)
    x = np.asarray(out["image"])
    np.testing.assert_allclose(x[0], (image[0] - mean) / 255.0, atol=1e-6)
    np.testing.assert_array_equal(x[1], x[0][:, ::-1])  # an exact mirror
    shift = augment.PCA_EIGVEC @ (alpha[2] * augment.PCA_EIGVAL)  # AlexNet: one RGB offset
    np.testing.assert_allclose(x[2] - x[0], np.broadcast_to(shift, x[0].shape), atol=1e-6)


def test_pad_crop_is_a_slice_of_the_zero_padded_normalized_image():
    x = np.random.default_rng(1).integers(0, 256, (3, 6, 5, 2), dtype=np.uint8)
    mean = np.full((6, 5, 2), 7.0, np.float32)
    out = np.asarray(preprocess_lib.preprocess(
        {"image": x, "crop": np.array([[0, 0], [4, 3], [8, 8]], np.int32),
         "flip": np.array([False, True, False])}, mean=mean, pad=4)["image"])
    padded = np.pad((x - mean) / 255.0, ((0, 0), (4, 4), (4, 4), (0, 0)))
    np.testing.assert_allclose(out[0], padded[0, 0:6, 0:5], atol=1e-7)  # top-left: padding
    np.testing.assert_allclose(out[1], padded[1, 4:10, 3:8][:, ::-1], atol=1e-7)
    np.testing.assert_allclose(out[2], padded[2, 8:14, 8:13], atol=1e-7)
    assert not out[0][:4].any() and not out[0][:, :4].any()


@pytest.mark.parametrize("protocol", ["center", "ten_crop", "multi_scale"])
def test_eval_views_are_normalized_on_the_device(protocol):
    cfg = data_config(batch_size=8, eval_batch_size=4, eval_protocol=protocol,
                      multi_scale_sizes=(24, 32), **IMAGENET)
    (batch, *_) = list(data.create(cfg, "eval"))
    out = jax.jit(make_preprocess(cfg))(batch)
    for key in [k for k in batch if k.startswith("image")]:
        np.testing.assert_allclose(np.asarray(out[key]),
                                   old_normalize(batch[key], augment.IMAGENET_MEAN_RGB),
                                   atol=1e-6)
    np.testing.assert_array_equal(out["mask"], batch["mask"])


def test_on_device_batches_equal_host_batches():
    cfg = data_config(batch_size=16, num_train=40, num_eval=6)
    dev = data_config(batch_size=16, num_train=40, num_eval=6, on_device=True)
    table = jax.device_put(data.device_table(dev))
    pre = jax.jit(make_preprocess(cfg))
    gather = jax.jit(preprocess_lib.gather)
    host, ondev = data.create(cfg, "train", seed=2), data.create(dev, "train", seed=2)
    for _ in range(4):
        a, b = next(host), next(ondev)
        assert "image" not in b and b["index"].dtype == np.int32
        assert b["index"].nbytes + b["crop"].nbytes + b["flip"].nbytes < 16 * 16
        np.testing.assert_array_equal(np.asarray(gather(table, b)["image"]), a["image"])
        np.testing.assert_array_equal(np.asarray(pre(gather(table, b))["image"]),
                                      np.asarray(pre(a)["image"]))
    host.close()
    ondev.close()


def test_on_device_needs_the_in_memory_cifar_recipe():
    with pytest.raises(ValueError, match=r"data\.on_device=True needs the cifar recipe"):
        data.create(data_config(batch_size=8, on_device=True, **IMAGENET), "train")
    with pytest.raises(ValueError, match=r"set --config\.data\.on_device=True"):
        data.device_table(data_config())


def tiny_run_config(**overrides):
    c = config_lib.default_config()
    c.model, c.model_kwargs.depth, c.model_kwargs.width = "cifar_resnet", 8, 4
    c.dataset = "synthetic"
    c.data.num_train, c.data.num_eval, c.data.image_size = 64, 16, 16
    c.batch_size, c.eval_batch_size = 16, 16
    c.num_train_steps, c.lr_boundaries = 6, (4,)
    c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 3, 6, 6
    return override(c, **overrides)


def _params(workdir: str):
    _, variables = resnet_jax.load(workdir)
    return jax.tree.map(np.asarray, variables)


def test_training_on_device_equals_training_from_host_batches(tmp_path):
    host = train_and_evaluate(tiny_run_config(), str(tmp_path / "host"))
    ondev = train_and_evaluate(tiny_run_config(**{"data.on_device": True}),
                               str(tmp_path / "dev"))
    for key in ("train_loss", "test_loss", "test_error", "grad_norm"):
        assert host[key] == ondev[key], key
    jax.tree.map(np.testing.assert_array_equal, _params(str(tmp_path / "host")),
                 _params(str(tmp_path / "dev")))
