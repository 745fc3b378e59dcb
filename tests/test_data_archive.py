"""The official CIFAR-10/100 python archives, written here from known arrays, read back exactly."""

import io
import pickle
import tarfile

import numpy as np
import pytest
from helpers import data_config

from resnet_jax import data
from resnet_jax.data import sources


def rows(images):
    """Official row layout: 1024 R values, 1024 G, 1024 B, each plane row-major."""
    return np.concatenate([images[..., c].reshape(len(images), -1) for c in range(3)], axis=1)


def write_archive(path, dataset, train, test, protocol=2):
    """train/test: (images (N,32,32,3) uint8, labels). CIFAR-10 spreads train over 5 batches."""
    if dataset == "cifar10":
        top, key = "cifar-10-batches-py", b"labels"
        chunks = np.array_split(np.arange(len(train[0])), 5)
        files = {f"data_batch_{i + 1}": (train[0][c], train[1][c]) for i, c in enumerate(chunks)}
        files["test_batch"] = test
        meta = ("batches.meta", {b"label_names": [b"c%d" % i for i in range(10)]})
    else:
        top, key = "cifar-100-python", b"fine_labels"
        files = {"train": train, "test": test}
        meta = ("meta", {b"fine_label_names": [b"c%d" % i for i in range(100)]})
    with tarfile.open(path, "w:gz") as tar:
        def add(name, obj):
            blob = pickle.dumps(obj, protocol=protocol)
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))

        for name, (images, labels) in files.items():
            batch = {b"data": rows(images), key: [int(v) for v in labels],
                     b"batch_label": name.encode()}
            if dataset == "cifar100":
                batch[b"coarse_labels"] = [int(v) // 5 for v in labels]
            add(name, batch)
        add(*meta)
    return path


def known(n, num_classes, seed):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, num_classes, n).astype(np.int32))


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    train, test = known(15, 10, 0), known(7, 10, 1)
    path = write_archive(tmp_path_factory.mktemp("c10") / "cifar-10-python.tar.gz", "cifar10",
                         train, test)
    return path, train, test


def run_config(dataset, archive, **fields):
    return data_config(dataset, archive=str(archive), **fields)


def test_row_layout_is_rgb_planes():
    img = np.zeros((1, 32, 32, 3), np.uint8)
    img[0, 1, 2] = (7, 8, 9)  # pixel at row 1, column 2
    r = rows(img)[0]
    assert (r[1 * 32 + 2], r[1024 + 1 * 32 + 2], r[2048 + 1 * 32 + 2]) == (7, 8, 9)


def test_cifar10_archive_reads_back_exact_pixels_and_labels(cifar10):
    path, train, test = cifar10
    got_train, got_test = sources.cifar_archive(str(path), "cifar10")
    for got, want in ((got_train, train), (got_test, test)):
        np.testing.assert_array_equal(got.images, want[0])  # HWC, RGB, file order
        np.testing.assert_array_equal(got.labels, want[1])
        assert got.num_classes == 10


def test_cifar100_archive_uses_fine_labels(tmp_path):
    train, test = known(6, 100, 2), known(3, 100, 3)
    path = write_archive(tmp_path / "cifar-100-python.tar.gz", "cifar100", train, test,
                         protocol=pickle.HIGHEST_PROTOCOL)
    got_train, got_test = sources.cifar_archive(str(path), "cifar100")
    np.testing.assert_array_equal(got_train.images, train[0])
    np.testing.assert_array_equal(got_train.labels, train[1])
    np.testing.assert_array_equal(got_test.labels, test[1])
    assert data.info(run_config("cifar100", path)) == data.DatasetInfo(100, (32, 32, 3), 6, 3)


def test_extracted_folder_reads_the_same(cifar10, tmp_path):
    path, train, _ = cifar10
    with tarfile.open(path) as tar:
        tar.extractall(tmp_path, filter="data")
    for folder in (tmp_path, tmp_path / "cifar-10-batches-py"):
        np.testing.assert_array_equal(sources.cifar_archive(str(folder), "cifar10")[0].images,
                                      train[0])


def test_pipeline_subtracts_the_training_mean(cifar10):
    path, train, test = cifar10
    mean = train[0].mean(0, dtype=np.float64)  # §4.2 per-pixel mean of the training split
    cfg = run_config("cifar10", path)
    images = np.concatenate([b["image"] for b in data.create(cfg, "eval")])[:7]
    np.testing.assert_array_equal(images, test[0])  # uint8: the mean is subtracted on device
    np.testing.assert_allclose(data.device_recipe(cfg).mean, mean, rtol=1e-6)


def test_validation_split_mean_excludes_the_heldout_examples(cifar10):
    path, train, _ = cifar10
    cfg = run_config("cifar10", path, validation_split=5)
    assert data.info(cfg) == data.DatasetInfo(10, (32, 32, 3), 10, 5)
    mean = train[0][:10].mean(0, dtype=np.float64)
    images = np.concatenate([b["image"] for b in data.create(cfg, "eval")])[:5]
    np.testing.assert_array_equal(images, train[0][10:])
    np.testing.assert_allclose(data.device_recipe(cfg).mean, mean, rtol=1e-6)


def test_missing_archive_is_a_clear_error(tmp_path):
    with pytest.raises(data.DataError, match=r"not found; download cifar-10-python\.tar\.gz"):
        data.info(run_config("cifar10", tmp_path / "nope.tar.gz"))
    with pytest.raises(data.DataError, match=r"not found; download cifar-100-python\.tar\.gz"):
        data.info(run_config("cifar100", tmp_path / "nope.tar.gz"))


def test_truncated_archive_is_a_clear_error(cifar10, tmp_path):
    blob = cifar10[0].read_bytes()
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(data.DataError, match=r"is truncated or corrupt .*cifar-10-python\.tar\.gz"):
        data.info(run_config("cifar10", bad))


def test_wrong_archive_is_not_silently_used(cifar10):
    with pytest.raises(data.DataError, match="not the cifar100 python archive"):
        data.info(run_config("cifar100", cifar10[0]))
    with pytest.raises(data.DataError, match="dataset='digits'"):
        data.info(run_config("digits", cifar10[0]))


def test_folder_without_the_batches_is_a_clear_error(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(data.DataError, match=r"has no cifar-10-batches-py/data_batch_1, "):
        data.info(run_config("cifar10", tmp_path))
