"""TFDS sources through tfds.data_source (no TensorFlow), on tfds.testing.mock_data, and the
errors for datasets that are not there. Nothing here may touch the network."""

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from helpers import data_config  # noqa: E402

from resnet_jax import data  # noqa: E402


def config(dataset, tmp_path, **fields):
    return data_config(dataset, data_dir=str(tmp_path), **fields)


@pytest.fixture
def mock():
    # The default policy (AUTO -> USE_CODE, no metadata files) mocks tfds.data_source without
    # TensorFlow; every split has `num_examples` examples.
    with tfds.testing.mock_data(num_examples=6):
        yield


SMALL_IMAGENET = dict(image_size=24, eval_resize=28, scale_range=(28, 40),
                      multi_scale_sizes=(24, 32))


@pytest.mark.parametrize("dataset,fields,protocol,keys", [
    ("cifar10", {}, "center", {"image": (4, 32, 32, 3)}),
    ("cifar100", {}, "center", {"image": (4, 32, 32, 3)}),
    ("cifar10", dict(pipeline="imagenet", **SMALL_IMAGENET), "ten_crop",
     {"image": (4, 10, 24, 24, 3)}),
    ("cifar10", dict(pipeline="imagenet", **SMALL_IMAGENET), "multi_scale",
     {"image_24": (4, 24, 24, 3), "image_32": (4, 32, 32, 3)}),
    ("imagenet2012", {}, "center", {"image": (4, 224, 224, 3)}),
    ("imagenet2012", {}, "ten_crop", {"image": (4, 10, 224, 224, 3)}),
    ("imagenet2012", SMALL_IMAGENET, "multi_scale",
     {"image_24": (4, 24, 24, 3), "image_32": (4, 32, 32, 3)}),
])
def test_mock_tfds_batches(mock, tmp_path, dataset, fields, protocol, keys):
    cfg = config(dataset, tmp_path, eval_protocol=protocol, **fields)
    info = data.info(cfg)
    assert (info.num_train, info.num_eval) == (6, 6)
    assert info.num_classes == {"cifar10": 10, "cifar100": 100, "imagenet2012": 1000}[dataset]
    train = next(data.create(cfg, "train"))
    assert train["image"].shape == (4, *info.image_shape)
    assert train["label"].dtype == np.int32 and (train["label"] < info.num_classes).all()
    batches = list(data.create(cfg, "eval"))
    assert sum(b["mask"].sum() for b in batches) == 6
    for b in batches:
        assert {k: v.shape for k, v in b.items() if k.startswith("image")} == keys


def test_mock_imagenet_full_size_multi_scale(mock, tmp_path):
    (b, _) = data.create(config("imagenet2012", tmp_path, eval_protocol="multi_scale"), "eval")
    assert {k: v.shape for k, v in b.items()} == {
        "image_224": (4, 224, 224, 3), "image_256": (4, 256, 256, 3),
        "image_384": (4, 384, 384, 3), "image_480": (4, 480, 480, 3),
        "image_640": (4, 640, 640, 3), "label": (4,), "mask": (4,)}


def test_mock_tfds_resume_and_validation_split(mock, tmp_path):
    cfg = config("imagenet2012", tmp_path, validation_split=2, **SMALL_IMAGENET)
    assert data.info(cfg)[2:] == (4, 2)
    full = [next(it) for it in [data.create(cfg, "train", seed=7)] for _ in range(3)]
    resumed = next(data.create(cfg, "train", seed=7, start_step=2))
    np.testing.assert_array_equal(full[2]["image"], resumed["image"])


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path):
    with pytest.raises(data.DataError, match=r"'cifar10' is not prepared in .*tfds build cifar10"
                                             r".*--config\.data\.archive"):
        data.info(config("cifar10", tmp_path))


def test_imagenet_error_names_the_manual_dir(tmp_path):
    manual = tmp_path / "tars"
    with pytest.raises(data.DataError, match=f"ILSVRC2012_img_train.tar .* in {manual}"):
        data.info(config("imagenet2012", tmp_path, manual_dir=str(manual)))
    with pytest.raises(data.DataError, match=f"in {tmp_path}/downloads/manual"):
        data.info(config("imagenet2012", tmp_path))


def test_unknown_tfds_dataset(tmp_path):
    with pytest.raises(data.DataError, match="TFDS has no dataset 'cifar11'"):
        data.info(config("cifar11", tmp_path))
