"""The batch executor (``resnet_jax.data.loader``): grain worker processes give the same batches
as the in-process path and on resume, a failing batch raises at its step, ``close`` joins the
workers, Ctrl-C/SIGTERM to the process group leave the workers alone, the workers die with
their parent, ``data.workers=-1`` resolves per recipe, and a training run resumed with worker
processes ends bit-identical to the uninterrupted one.

Worker processes cost about a second each to start (on 2 cores), so each test starts few."""

from __future__ import annotations

import gc
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from helpers import data_config

from resnet_jax import data
from resnet_jax.data import loader, pipeline

ROOT = Path(__file__).resolve().parent.parent

# Tiny versions of the two recipes on synthetic data: the imagenet one (PIL resize of every
# image, the decode-bound kind) and the cifar one (an in-memory gather).
RECIPES = {
    "imagenet": dict(pipeline="imagenet", image_size=32, scale_range=(36, 48), eval_resize=36,
                     num_train=40, num_eval=20),
    "cifar": dict(pipeline="cifar", num_train=40, num_eval=20),
}


def _config(recipe: str, **fields) -> object:
    return data_config("synthetic", batch_size=8, eval_batch_size=8,
                       **{**RECIPES[recipe], **fields})


def _take(stream: data.Batches, n: int) -> list[dict]:
    with stream:
        return [next(stream) for _ in range(n)]


def _assert_same(a: list[dict], b: list[dict], what: str) -> None:
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.keys() == y.keys(), (what, i)
        for k in x:
            assert type(y[k]) is np.ndarray and x[k].dtype == y[k].dtype, (what, i, k)
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"{what}: batch {i} {k!r}")


@pytest.mark.parametrize("recipe", ["imagenet", "cifar"])
def test_worker_processes_give_the_in_process_batches_and_resume_exactly(recipe: str) -> None:
    ref = _take(data.create(_config(recipe, workers=0), "train", seed=3), 6)  # crosses an epoch
    ref_eval = list(data.create(_config(recipe, workers=0), "eval"))
    assert len(ref_eval) == 3  # 20 examples in batches of 8: 2 workers get uneven shares
    for workers in (1, 2):
        train = data.create(_config(recipe, workers=workers), "train", seed=3)
        assert train.workers == workers
        _assert_same(ref, _take(train, 6), f"train, {workers} workers")
    stream = data.create(_config(recipe, workers=2), "eval")
    assert len(stream) == 3
    _assert_same(ref_eval, list(stream), "eval, 2 workers")
    resumed = data.create(_config(recipe, workers=2), "train", seed=3, start_step=4)
    _assert_same(ref[4:], _take(resumed, 2), "resumed at step 4, 2 workers")
    assert multiprocessing.active_children() == []


class _TwoArgError(Exception):
    def __init__(self, a: int, b: int) -> None:  # does not survive pickling (args != (a, b))
        super().__init__(f"{a}/{b}")


def _failing(kind: str):
    def make(k: int) -> dict:
        if k == 3:
            raise ValueError("bad example in batch 3") if kind == "plain" else _TwoArgError(3, 0)
        return {"k": np.full(4, k)}
    return make


@pytest.mark.parametrize("workers,kind,error,match", [
    (0, "plain", ValueError, "bad example in batch 3"),
    (2, "plain", ValueError, "bad example in batch 3"),
    (1, "unpicklable", RuntimeError, r"data batch 3 \(in a worker process\) failed: "
                                     r"_TwoArgError: 3/0"),
])
def test_a_failing_batch_raises_at_its_step_and_closes(workers, kind, error, match) -> None:
    stream = loader.Batches(_failing(kind), range(100), prefetch=2, workers=workers)
    assert [int(next(stream)["k"][0]) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(error, match=match) as info:
        next(stream)
    if error is ValueError:  # the original exception, with a note naming the batch
        notes = "\n".join(getattr(info.value, "__notes__", []))
        assert "raised computing data batch 3" in notes
        if workers:  # and the worker's traceback
            assert "Traceback" in notes and "in make" in notes
    with pytest.raises(StopIteration):  # closed after the error, not silently continuing
        next(stream)
    assert multiprocessing.active_children() == []


def _square(k: int) -> dict:
    return {"k": np.array(k * k)}


def test_close_context_manager_and_gc_stop_the_workers() -> None:
    def workers_of(stream: loader.Batches) -> list[psutil.Process]:
        next(stream)
        procs = [psutil.Process(p.pid) for p in multiprocessing.active_children()]
        assert len(procs) == stream.workers == 2
        return procs

    def gone(procs: list[psutil.Process]) -> bool:
        return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)

    stream = loader.Batches(_square, range(sys.maxsize), prefetch=1, workers=2)
    procs = workers_of(stream)
    stream.close()
    assert gone(procs) and multiprocessing.active_children() == []
    stream.close()  # idempotent
    with pytest.raises(StopIteration):
        next(stream)

    with loader.Batches(_square, range(sys.maxsize), prefetch=1, workers=2) as stream:
        procs = workers_of(stream)
    assert gone(procs) and multiprocessing.active_children() == []

    stream = loader.Batches(_square, range(sys.maxsize), prefetch=1, workers=2)
    procs = workers_of(stream)
    del stream  # __del__ does not block: the pump stops and joins the workers by itself
    gc.collect()
    deadline = time.time() + 30  # the pump joins them in the background: wait for the reaping
    while not (gone(procs) and multiprocessing.active_children() == []) and time.time() < deadline:
        time.sleep(0.1)
    assert gone(procs) and multiprocessing.active_children() == []

    # A finite stream never starts more workers than it has batches, and ends by itself.
    short = loader.Batches(_square, range(1), prefetch=1, workers=2)
    assert short.workers == 1 and [int(b["k"]) for b in short] == [0]
    assert multiprocessing.active_children() == []


def test_in_process_path_runs_off_the_consumer_thread_with_bounded_prefetch() -> None:
    import threading

    threads, started = set(), []

    def make(k: int) -> dict:
        threads.add(threading.get_ident())
        started.append(k)
        return {"k": np.array(k)}

    with loader.Batches(make, range(100), prefetch=3, workers=0) as stream:
        next(stream)
        time.sleep(0.3)
    assert threading.get_ident() not in threads
    assert max(started) == 3  # at most `prefetch` batches ahead of the one consumed


_SIGNAL_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, threading, time
    import numpy as np
    from resnet_jax.data.loader import Batches

    got = []
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda signum, frame: got.append(signum))

    def make(k):
        time.sleep(0.02)
        return {"k": np.array(k)}

    def barrage():  # Ctrl-C / SIGTERM to the whole group while the workers start and run
        end = time.time() + 4
        while time.time() < end:
            os.killpg(0, signal.SIGINT if len(got) % 2 else signal.SIGTERM)
            time.sleep(0.02)

    stream = Batches(make, range(10**9), prefetch=2, workers=2)
    sender = threading.Thread(target=barrage)
    sender.start()
    batches = [int(next(stream)["k"]) for _ in range(8)]
    sender.join()
    batches += [int(next(stream)["k"]) for _ in range(4)]
    import multiprocessing
    pids = [p.pid for p in multiprocessing.active_children()]
    print(json.dumps(dict(batches=batches, signals=len(got), pids=pids)), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # the workers must not outlive their parent
""")


def test_workers_ignore_group_signals_and_die_with_their_parent() -> None:
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_SCRIPT], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, start_new_session=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["batches"] == list(range(12))
    assert out["signals"] > 10 and len(out["pids"]) == 2
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr, proc.stderr
    deadline = time.time() + 30
    alive = out["pids"]
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"worker processes {alive} outlived their parent"


def test_resolve_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert loader.resolve_workers(-1, "imagenet") == 7  # all cores but one
    assert loader.resolve_workers(-1, "cifar") == 0  # in-process
    assert loader.resolve_workers(0, "imagenet") == 0
    assert loader.resolve_workers(3, "cifar") == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert loader.resolve_workers(-1, "imagenet") == 1
    assert data.default_config().workers == -1
    with pytest.raises(ValueError, match=r"^data\.workers=-2: use -1 \(auto\), 0 \(in-process\)"):
        data.create(_config("cifar", workers=-2), "train")
    with pytest.raises(ValueError, match=r"^data\.prefetch=0 must be >= 1 .*data\.prefetch=2"):
        data.create(_config("cifar", prefetch=0), "train")
    with pytest.raises(TypeError, match=r"range\(k, sys\.maxsize\)"):
        import itertools

        loader.Batches(_square, itertools.count(), prefetch=1, workers=0)
    assert pipeline.Batches is loader.Batches is data.Batches


# -- a TFDS array_record source (JPEG, variable size) pickles to the workers ------------------


@pytest.fixture(scope="module")
def jpeg_tfds(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny TFDS dataset of variable-size JPEGs as array_record, written without TensorFlow."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from PIL import Image

    class ResnetJaxLoaderJpegs(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=5)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(24), "test": self._generate_examples(8)}

        def _generate_examples(self, n):
            rng = np.random.default_rng(n)
            for i in range(n):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (40 + i, 50 - i, 3), np.uint8)).save(
                    buf, "JPEG")
                yield i, {"image": io.BytesIO(buf.getvalue()), "label": i % 5}

    path = str(tmp_path_factory.mktemp("tfds"))
    ResnetJaxLoaderJpegs(data_dir=path, file_format="array_record").download_and_prepare()
    return path


def test_tfds_source_streams_through_worker_processes(jpeg_tfds: str) -> None:
    def config(workers: int) -> object:
        return data_config("resnet_jax_loader_jpegs", batch_size=8, data_dir=jpeg_tfds,
                           image_size=32, scale_range=(36, 48), eval_resize=36, workers=workers)

    ref = _take(data.create(config(0), "train", seed=1), 4)
    _assert_same(ref, _take(data.create(config(2), "train", seed=1), 4), "tfds, 2 workers")
    assert multiprocessing.active_children() == []
