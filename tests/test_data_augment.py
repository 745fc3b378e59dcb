"""§4.2 and §3.4 augmentation and test views, checked against hand-built cases."""

import ml_collections
import numpy as np
import pytest
from helpers import data_config

from resnet_jax import data
from resnet_jax.data import augment

RNG = np.random.default_rng(0)


def config(**fields):
    return data_config(batch_size=8, **{"num_train": 20, "num_eval": 5, **fields})


def test_digits_are_not_flipped_by_default():
    d = data.default_config()
    cfg = ml_collections.ConfigDict(dict(dataset="digits", batch_size=64, eval_batch_size=8,
                                         data=d))
    cfg_pad0 = ml_collections.ConfigDict(cfg.to_dict())
    cfg_pad0.data.pad = 0  # crop = identity, so only a flip could change the image
    batch = next(data.create(cfg_pad0, "train"))
    assert not batch["flip"].any()
    cfg.data.flip = True  # asked for: digits are mirrored too
    assert next(data.create(cfg, "train"))["flip"].any()


def test_imagenet_crop_stays_in_bounds_and_matches_full_resize():
    image = RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    assert augment.resized_shape(40, 60, 30) == (30, 45)
    crop = augment.resize_crop(image, 30, 5, 21, 24)  # bottom-right-most legal: (6, 21)
    full = augment.resize_shorter(image, 30)
    assert full.shape == (30, 45, 3) and crop.shape == (24, 24, 3)
    inner = np.abs(crop[2:-2, 2:-2].astype(int) - full[7:27, 23:43].astype(int))
    assert inner.mean() < 2.0  # only resampling at the crop border differs
    with pytest.raises(ValueError, match="outside the resized 30x45 image"):
        augment.resize_crop(image, 30, 7, 0, 24)


def test_imagenet_train_crops_at_the_sampled_scale_and_position():
    image = RNG.integers(0, 256, (50, 40, 3), dtype=np.uint8)
    x = augment.imagenet_train([image] * 2, np.array([48, 40]), np.array([[0.3, 0.9]] * 2), 32)
    assert x.shape == (2, 32, 32, 3) and x.dtype == np.uint8
    assert augment.resized_shape(50, 40, 48) == (60, 48)  # crop at row 0.3*29, col 0.9*17
    np.testing.assert_array_equal(x[0], augment.resize_crop(image, 48, 8, 15, 32))
    np.testing.assert_array_equal(x[1], augment.resize_crop(image, 40, 5, 8, 32))


def test_ten_crop_and_its_average_on_a_hand_built_image():
    image = RNG.integers(0, 256, (256, 300, 3), dtype=np.uint8)  # shorter side already 256
    views = augment.ten_crop(image, 256, 224)
    x = image
    crops = [x[16:240, 38:262], x[:224, :224], x[:224, 76:], x[32:, :224], x[32:, 76:]]
    assert views.shape == (10, 224, 224, 3) and views.dtype == np.uint8
    for i, crop in enumerate(crops):
        np.testing.assert_array_equal(views[i], crop)
        np.testing.assert_array_equal(views[5 + i], views[i][:, ::-1])
    views, crops = views.astype(np.float32), [c.astype(np.float32) for c in crops]
    # The trainer's contract: softmax averaged over all views of every "image*" key.
    w = RNG.normal(size=(3, 4)).astype(np.float32)
    predict = lambda imgs: imgs.mean(axis=(1, 2)) @ w  # (N, 3) -> (N, 4), linear
    batch = {"image": np.stack([views, views[::-1]]), "label": np.zeros(2)}
    want = np.mean([predict(c[None])[0] for c in crops + [c[:, ::-1] for c in crops]], axis=0)
    got = augment.average_views(predict, batch)
    np.testing.assert_allclose(got, np.stack([want, want]), rtol=1e-5)


def test_average_views_weights_every_view_equally_across_keys():
    predict = lambda imgs: imgs.reshape(len(imgs), -1)[:, :1]
    batch = {"image_4": np.full((2, 4, 4, 1), 1.0), "image_8": np.full((2, 8, 8, 1), 4.0),
             "mask": np.ones(2)}
    np.testing.assert_allclose(augment.average_views(predict, batch), [[2.5], [2.5]])


@pytest.mark.parametrize("protocol,keys", [
    ("center", {"image": (4, 24, 24, 3)}),
    ("ten_crop", {"image": (4, 10, 24, 24, 3)}),
    ("multi_scale", {"image_24": (4, 24, 24, 3), "image_40": (4, 40, 40, 3)}),
])
def test_imagenet_recipe_eval_protocols(protocol, keys):
    cfg = config(pipeline="imagenet", image_size=24, eval_resize=28, scale_range=(24, 36),
                 multi_scale_sizes=(24, 40), eval_protocol=protocol)
    assert data.info(cfg).image_shape == (24, 24, 3)
    train = next(data.create(cfg, "train"))
    assert train["image"].shape == (8, 24, 24, 3) and train["image"].dtype == np.uint8
    assert train["flip"].shape == (8,) and train["pca_alpha"].shape == (8, 3)
    batches = list(data.create(cfg, "eval"))  # 5 examples, batch 4
    assert [b["mask"].tolist() for b in batches] == [[1, 1, 1, 1], [1, 0, 0, 0]]
    for b in batches:
        assert {k: v.shape for k, v in b.items() if k.startswith("image")} == keys
        assert all(not v[1:].any() for k, v in batches[-1].items() if k.startswith("image"))
