"""Input failures (issue 22 item 6): a worker process killed with SIGKILL (the out-of-memory
killer) is replaced and the stream goes on bit-identical; workers that keep dying, and a damaged
or missing array_record shard, raise one-line ``DataError``s naming the worker (pid, signal) or
the shard file, from ``next``, in worker processes and in-process alike; train.py stops on a
damaged shard with exit 2, that line, and a checkpoint of the last completed step."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import data_config

from resnet_jax import data, errors
from resnet_jax.data import loader, pipeline

ROOT = Path(__file__).resolve().parent.parent
# The imagenet recipe streams from the TFDS source (reads at each batch), shrunk to 16 px.
STREAMING = dict(pipeline="imagenet", image_size=16, scale_range=(16, 20), eval_resize=16,
                 pca_std=0.0)


# -- a worker killed mid-stream --------------------------------------------------------------


def _pixels(k: int) -> dict:
    """Batch k: big enough (> 64 KiB) to come back through shared memory."""
    rng = np.random.default_rng(k)
    return {"image": rng.integers(0, 256, (8, 48, 48, 3), dtype=np.uint8), "k": np.array(k)}


def _wait_for_pids(stream: loader.Batches, n: int) -> dict[int, int]:
    deadline = time.monotonic() + 60
    while len(pids := stream.worker_pids()) < n:
        assert time.monotonic() < deadline, pids
        time.sleep(0.05)
    return pids


def test_a_killed_worker_is_replaced_and_the_stream_is_unchanged() -> None:
    killed = r"data worker 1 \(pid \d+\) was killed by SIGKILL; restarting the 2 data worker"
    with pytest.warns(RuntimeWarning, match=killed), \
            loader.Batches(_pixels, range(sys.maxsize), prefetch=2, workers=2) as stream:
        got = [next(stream) for _ in range(3)]
        pids = _wait_for_pids(stream, 2)
        os.kill(pids[1], signal.SIGKILL)
        got += [next(stream) for _ in range(9)]
        assert stream.restarts == 1
        assert set(_wait_for_pids(stream, 2).values()).isdisjoint(pids.values())
    for k, batch in enumerate(got):  # bit-identical to the undisturbed stream
        want = _pixels(k)
        assert int(batch["k"]) == k
        np.testing.assert_array_equal(batch["image"], want["image"], err_msg=f"batch {k}")
    assert multiprocessing.active_children() == []


@dataclasses.dataclass(frozen=True)
class _DiesFromBatch2:
    """Batches 0 and 1, then the worker kills itself (once ``released`` exists: a worker
    computes ahead, and its death must not lose batch 1 before the pipe has it)."""

    released: str

    def __call__(self, k: int) -> dict:
        if k >= 2:
            while not os.path.exists(self.released):
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)
        return {"k": np.array(k)}


def test_workers_that_keep_dying_raise_one_line_naming_the_worker(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(loader, "_MAX_RESTARTS", 1)  # one fresh pool, then give up
    released = tmp_path / "released"
    stream = loader.Batches(_DiesFromBatch2(str(released)), range(100), prefetch=1, workers=1)
    assert [int(next(stream)["k"]) for _ in range(2)] == [0, 1]
    released.touch()
    with pytest.warns(RuntimeWarning, match=r"was killed by SIGKILL; restarting the 1 data "
                                            r"worker\(s\) at data batch 2 \(attempt 1 of 1"), \
            pytest.raises(errors.DataError) as info:
        next(stream)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("data worker 0 (pid ")
    assert "was killed by SIGKILL at data batch 2, and 1 fresh worker pool(s) in a row died " \
           "before making a batch; SIGKILL is what the kernel's out-of-memory killer" in message
    assert "--config.data.workers (now 1;" in message and "more memory" in message
    assert errors.exit_code(info.value) == errors.EXIT_CONFIG
    assert stream.restarts == 1
    with pytest.raises(StopIteration):  # closed, not silently continuing
        next(stream)
    assert multiprocessing.active_children() == []


def _fails(k: int) -> dict:
    if k == 1:
        raise errors.DataError("shard x is damaged; restore it")
    return {"k": np.array(k)}


@pytest.mark.parametrize("workers", [0, 1])
def test_an_expected_error_from_a_worker_carries_no_traceback(workers: int) -> None:
    stream = loader.Batches(_fails, range(10), prefetch=1, workers=workers)
    assert int(next(stream)["k"]) == 0
    with pytest.raises(errors.DataError) as info:
        next(stream)
    assert str(info.value) == "shard x is damaged; restore it"  # what the CLI prints
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "data batch 1" in notes and "Traceback" not in notes
    assert multiprocessing.active_children() == []


# -- damaged array_record shards ---------------------------------------------------------------


def _prepare_cifar10(out: Path, num_train: int, num_test: int) -> Path:
    """A TFDS-format cifar10 (array_record, 2 shards per split) written by
    ``python -m resnet_jax.data.prepare`` from a CIFAR archive built here; its data_dir."""
    from test_data_archive import known, write_archive

    from resnet_jax.data import prepare

    out.mkdir(parents=True, exist_ok=True)
    write_archive(out / "cifar-10-python.tar.gz", "cifar10", known(num_train, 10, 0),
                  known(num_test, 10, 1))
    assert prepare.main(["cifar10", "--manual_dir", str(out), "--data_dir", str(out / "tfds"),
                         "--num_shards", "2"]) == 0
    return out / "tfds"


def _shard_of(data_dir: Path, example: int) -> tuple[str, int]:
    """(shard file, record in it) holding training example ``example``."""
    from resnet_jax.data import sources

    train, _ = sources.tfds_splits("cifar10", str(data_dir), None, False, None)
    for path, first, count in train.shards:
        if example < count:
            return path, first + example
        example -= count
    raise AssertionError("no such example")


def _damage_record(path: str, record: int) -> None:
    """Overwrites 64 bytes of ``path`` so that ``record``, and only it, no longer reads."""
    from array_record.python import array_record_module

    blob = Path(path).read_bytes()
    trial = f"{path}.trial"
    for offset in range(0, len(blob) - 64, 256):
        Path(trial).write_bytes(blob[:offset] + b"\xa5" * 64 + blob[offset + 64:])
        reader = array_record_module.ArrayRecordReader(trial)
        broken = set()
        for i in range(reader.num_records()):
            try:
                reader.read([i])
            except RuntimeError:
                broken.add(i)
        reader.close()
        if broken == {record}:
            os.replace(trial, path)
            return
    raise AssertionError(f"no 64 bytes of {path} break record {record} alone")


def _first_batch_with(data_dir: Path, batch: int, seed: int, step: int) -> int:
    """A training example first read by batch ``step`` (the stream's epoch-0 permutation)."""
    from resnet_jax.data import sources

    train, _ = sources.tfds_splits("cifar10", str(data_dir), None, False, None)
    plan = pipeline.Plan(train, None, batch, 0, 1, seed)  # type: ignore[arg-type]
    assert (step + 1) * batch <= len(train)  # inside epoch 0: no earlier batch has it
    return int(plan.train_indices(step)[0])


@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("tensorflow_datasets")
    return _prepare_cifar10(tmp_path_factory.mktemp("c10"), 40, 8)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_damaged_shard_raises_one_line_naming_the_file(cifar10_dir: Path, tmp_path: Path,
                                                         workers: int) -> None:
    data_dir = tmp_path / "tfds"
    shutil.copytree(cifar10_dir, data_dir)
    example = _first_batch_with(data_dir, 8, seed=5, step=3)
    path, record = _shard_of(data_dir, example)
    _damage_record(path, record)
    cfg = data_config("cifar10", batch_size=8, data_dir=str(data_dir), workers=workers,
                      **STREAMING)
    stream = data.create(cfg, "train", seed=5)
    assert [next(stream)["image"].shape for _ in range(3)] == [(8, 16, 16, 3)] * 3
    with pytest.raises(data.DataError) as info:
        next(stream)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"data shard {path} is damaged (record {record} of the file, "
                              f"example {example} of split 'train': RuntimeError: ")
    assert f"prepare the dataset again: `python -m resnet_jax.data.prepare cifar10 " \
           f"--data_dir={data_dir} ...`" in message
    assert "Traceback" not in "\n".join(getattr(info.value, "__notes__", []))
    with pytest.raises(StopIteration):
        next(stream)
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("how", ["truncated", "deleted"])
def test_a_broken_shard_of_an_in_memory_dataset_fails_at_create(cifar10_dir: Path,
                                                                tmp_path: Path, how: str) -> None:
    data_dir = tmp_path / "tfds"
    shutil.copytree(cifar10_dir, data_dir)
    path, _ = _shard_of(data_dir, 39)  # the last shard of the training split
    if how == "truncated":
        blob = Path(path).read_bytes()
        Path(path).write_bytes(blob[:len(blob) // 2])
    else:
        os.remove(path)
    what = "is damaged" if how == "truncated" else "is missing"
    cfg = data_config("cifar10", batch_size=8, data_dir=str(data_dir))  # cifar recipe: in memory
    with pytest.raises(data.DataError, match=f"^data shard {path} {what} \\(record 0 of the "
                                             "file, example 20 of split 'train': "):
        data.create(cfg, "train")


# -- end to end: train.py stops on a damaged shard, keeping the last completed step ----------


def test_train_py_on_a_damaged_shard_exits_2_with_the_last_step_saved(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow_datasets")
    from resnet_jax import checkpoint

    data_dir = _prepare_cifar10(tmp_path / "ds", 64, 8)
    failing = 6  # batch 6 fails: steps 0-5 done, the policy's checkpoint is 4
    example = _first_batch_with(data_dir, 8, seed=0, step=failing)
    path, record = _shard_of(data_dir, example)
    _damage_record(path, record)
    workdir = tmp_path / "run"
    overrides = {"dataset": "cifar10", "data.data_dir": data_dir, "data.workers": 0,
                 **{f"data.{k}": v for k, v in STREAMING.items()},
                 "seed": 0, "model": "cifar_resnet", "model_kwargs.depth": 8,
                 "model_kwargs.width": 4, "batch_size": 8, "eval_batch_size": 8,
                 "num_train_steps": 8, "lr_boundaries": (7,), "eval_every_steps": 1000,
                 "log_every_steps": 2, "checkpoint_every_steps": 4}
    args = [f"--config.{k}={v}".replace(" ", "") for k, v in overrides.items()]
    proc = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/digits.py", "--workdir", str(workdir),
         *args], cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
        text=True, timeout=180)
    assert proc.returncode == errors.EXIT_CONFIG, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: data shard {path} is damaged (record {record} "), last
    store = checkpoint.CheckpointStore(checkpoint.checkpoint_dir(str(workdir)))
    try:
        assert store.steps()[-1] == failing, store.steps()  # the last completed step
    finally:
        store.close()
