"""resnet_jax.data: the iterator contract (DESIGN.md seam 5) on the digits and synthetic sources."""

import numpy as np
import pytest
from helpers import data_config
from sklearn.datasets import load_digits

from resnet_jax import data
from resnet_jax.data import pipeline, sources


def make_config(dataset="synthetic", batch_size=16, eval_batch_size=10, **data_fields):
    return data_config(dataset, batch_size=batch_size, eval_batch_size=eval_batch_size,
                       **{"num_train": 50, "num_eval": 23, **data_fields})


def take(it, n):
    return [next(it) for _ in range(n)]


def synthetic_arrays(cfg):
    d = cfg.data
    return sources.synthetic(d.num_train, d.num_eval, d.image_size or 32, d.num_classes,
                             d.synthetic_seed)


def test_info_synthetic_and_digits():
    assert data.info(make_config(num_classes=7)) == data.DatasetInfo(7, (32, 32, 3), 50, 23)
    assert data.info(make_config("digits")) == data.DatasetInfo(10, (32, 32, 3), 1437, 360)
    assert data.info(make_config(validation_split=5)) == data.DatasetInfo(10, (32, 32, 3), 45, 5)


def test_digits_are_the_real_scans_upsampled():
    train, test = sources.digits()
    d = load_digits()
    grey = np.rint(d.images * 255 / 16).astype(np.uint8)
    assert len(train) == 1437 and len(test) == 360
    np.testing.assert_array_equal(train.images[5, ::4, ::4, 1], grey[5])
    np.testing.assert_array_equal(test.images[0, 3::4, 2::4, 0], grey[1437])  # 4x4 blocks
    np.testing.assert_array_equal(np.concatenate([train.labels, test.labels]), d.target)


def test_batches_have_fixed_shapes_and_dtypes():
    cfg = make_config()
    for b in take(data.create(cfg, "train"), 4):  # 50 examples, batch 16: crosses epochs
        assert b["image"].shape == (16, 32, 32, 3) and b["image"].dtype == np.uint8
        assert b["label"].shape == (16,) and b["label"].dtype == np.int32
        assert b["crop"].shape == (16, 2) and b["crop"].dtype == np.int32  # §4.2 draws
        assert b["flip"].shape == (16,) and b["flip"].dtype == bool
    for b in data.create(cfg, "eval"):
        assert b["image"].shape == (10, 32, 32, 3) and b["image"].dtype == np.uint8
        assert b["mask"].dtype == np.float32
        assert set(b) == {"image", "label", "mask"}


def test_train_stream_is_seeded():
    cfg = make_config()
    a, b, c = (take(data.create(cfg, "train", seed=s), 3) for s in (1, 1, 2))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_resumed_train_stream_equals_uninterrupted():
    cfg = make_config()
    full = take(data.create(cfg, "train", seed=3), 9)
    resumed = take(data.create(cfg, "train", seed=3, start_step=5), 4)
    for x, y in zip(full[5:], resumed, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_every_epoch_is_a_permutation():
    cfg = make_config(augment=False, num_train=48)  # 3 batches of 16 per epoch
    train, _ = synthetic_arrays(cfg)
    batches = take(data.create(cfg, "train", seed=0), 6)
    for epoch in (batches[:3], batches[3:]):
        seen = np.concatenate([b["image"] for b in epoch])
        order = np.lexsort(seen.reshape(48, -1).T)
        np.testing.assert_array_equal(seen[order],
                                      train.images[np.lexsort(train.images.reshape(48, -1).T)])


def test_processes_split_the_global_train_batch():
    cfg = make_config()
    whole = take(data.create(cfg, "train", seed=4), 4)
    parts = [take(data.create(cfg, "train", seed=4, process_index=p, process_count=2), 4)
             for p in (0, 1)]
    for k in range(4):
        assert parts[0][k]["image"].shape == (8, 32, 32, 3)
        for key in ("image", "label"):
            np.testing.assert_array_equal(
                np.concatenate([parts[0][k][key], parts[1][k][key]]), whole[k][key])


def test_processes_see_disjoint_examples_and_together_every_example_once_per_epoch():
    cfg = make_config(augment=False, num_train=48)  # 3 global batches of 16 per epoch
    train, _ = synthetic_arrays(cfg)
    key = lambda images: {im.tobytes() for im in images}
    seen = [key(np.concatenate([b["image"] for b in take(data.create(
        cfg, "train", seed=6, process_index=p, process_count=2), 3)])) for p in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 24 and not seen[0] & seen[1]
    assert seen[0] | seen[1] == key(train.images)


def test_sources_are_grain_random_access_sources():
    train, _ = synthetic_arrays(make_config())
    assert len(train) == 50
    np.testing.assert_array_equal(train[3]["image"], train.images[3])
    assert train[-1]["label"] == train.labels[49]
    with pytest.raises(IndexError):
        train[50]


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_visits_every_example_once(process_count):
    cfg = make_config(eval_batch_size=10)  # 23 examples, not a multiple of 10
    _, test = synthetic_arrays(cfg)
    streams = [list(data.create(cfg, "eval", process_index=p, process_count=process_count))
               for p in range(process_count)]
    assert {len(s) for s in streams} == {3}  # every process runs the same number of batches
    images, labels = [], []
    for k in range(3):
        for s in streams:  # batch k of process 0, then process 1: the global batch
            keep = s[k]["mask"] == 1
            assert set(np.unique(s[k]["mask"])) <= {0.0, 1.0}
            assert not s[k]["image"][~keep].any() and not s[k]["label"][~keep].any()
            images.append(s[k]["image"][keep])
            labels.append(s[k]["label"][keep])
    np.testing.assert_array_equal(np.concatenate(images), test.images)
    np.testing.assert_array_equal(np.concatenate(labels), test.labels)


def test_validation_split_holds_out_the_last_training_examples():
    cfg = make_config(validation_split=5, eval_batch_size=5)
    train, _ = synthetic_arrays(cfg)
    (batch,) = list(data.create(cfg, "eval"))
    np.testing.assert_array_equal(batch["image"], train.images[45:])
    # §4.2: the mean subtracted on the device is that of the 45 examples trained on.
    np.testing.assert_allclose(data.device_recipe(cfg).mean,
                               train.images[:45].mean(0, dtype=np.float64), rtol=1e-6)


def test_batch_size_must_divide_by_process_count():
    with pytest.raises(ValueError, match="batch_size=16 is not divisible by process_count=3"):
        data.create(make_config(), "train", process_count=3)
    with pytest.raises(ValueError, match="eval_batch_size=10 is not divisible"):
        data.create(make_config(), "eval", process_count=4)


def test_bad_config_fields_are_errors():
    cfg = make_config()
    cfg.data.unlock()
    cfg.data.shufle = True
    with pytest.raises(ValueError, match=r"unknown field data\.shufle"):
        data.info(cfg)
    with pytest.raises(ValueError, match="eval_protocol='ten_crop' is an ImageNet protocol"):
        data.create(make_config(eval_protocol="ten_crop"), "eval")
    with pytest.raises(ValueError, match="split='test'"):
        data.create(make_config(), "test")


def test_worker_errors_reach_the_consumer():
    def make(k):
        if k == 3:
            raise ZeroDivisionError("bad example 3")
        return {"k": np.array(k)}

    it = pipeline.Batches(make, range(10), prefetch=2, workers=2)
    assert [int(next(it)["k"]) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ZeroDivisionError, match="bad example 3"):
        next(it)
    with pytest.raises(StopIteration):  # closed after the error, not silently continuing
        next(it)
