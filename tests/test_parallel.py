"""jit (global view) == pmap (synced BN) == one device, on 8 simulated CPU devices and on
2 processes x 4 devices joined by jax.distributed; per-device ("ghost") BN agrees between jit
(bn_groups) and pmap (bn_sync=False).

The multi-device work runs in subprocesses (this file doubles as the worker script) so the
pytest process keeps its single CPU device.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

STEPS, BATCH, IMAGE = 3, 16, (12, 12, 3)
VARIANTS = ("single", "jit", "pmap", "single_ghost", "jit_ghost", "pmap_ghost")


def _worker(out: Path, process_id: int, num_processes: int, port: int, variants: list[str]) -> None:
    import functools

    import jax
    import ml_collections

    if num_processes > 1:
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)

    from resnet_jax import models, parallel
    from resnet_jax.train import create_train_state, train_step

    config = ml_collections.ConfigDict(
        dict(learning_rate=0.1, scale_lr_by_batch=False, batch_size=BATCH, momentum=0.9,
             nesterov=False, weight_decay=1e-4, weight_decay_mask="kernels",
             schedule="piecewise", lr_boundaries=(2,), lr_boundaries_unit="steps",
             lr_decay_factor=0.1, warmup_steps=0, warmup_type="constant", warmup_lr=0.01,
             num_train_steps=STEPS)
    )
    model = models.create("cifar_resnet", depth=8, width=4, num_classes=10)
    rs = np.random.RandomState(0)
    batches = [
        {"image": rs.randn(BATCH, *IMAGE).astype(np.float32),
         "label": rs.randint(0, 10, BATCH).astype(np.int32)}
        for _ in range(STEPS)
    ]
    per = BATCH // jax.process_count()
    lo = jax.process_index() * per
    base_rng = jax.random.PRNGKey(1)
    n = jax.device_count()

    state0 = create_train_state(config, model, jax.random.PRNGKey(0), image_shape=IMAGE)
    results = {}
    for variant in variants:
        state = state0  # not donated: replicate() copies, the single-device jit does not donate
        mode, _, ghost = variant.partition("_")
        if mode == "single":
            step = jax.jit(functools.partial(train_step, bn_groups=n if ghost else 1))
            for i, b in enumerate(batches):
                state, metrics = step(state, b, jax.random.fold_in(base_rng, i))
            fetched = jax.device_get((state.params, state.batch_stats, metrics))
        else:
            step = parallel.compile(train_step, mode, bn_sync=not ghost)
            state = step.replicate(state)
            for i, b in enumerate(batches):
                local = {k: v[lo : lo + per] for k, v in b.items()}
                state, metrics = step(state, local, jax.random.fold_in(base_rng, i))
            fetched = step.fetch((state.params, state.batch_stats, metrics))
        leaves = jax.tree_util.tree_flatten_with_path(fetched)[0]
        for path, leaf in leaves:
            results[f"{variant}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    np.savez(out / f"process{process_id}.npz", **results)


def _run_workers(tmp: Path, devices: int, processes: int, variants: tuple[str, ...]) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--out", str(tmp), "--process-id", str(i),
             "--num-processes", str(processes), "--port", str(port), *variants],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(processes)
    ]
    for p in procs:
        output, _ = p.communicate(timeout=300)
        assert p.returncode == 0, output[-3000:]
    return [dict(np.load(tmp / f"process{i}.npz")) for i in range(processes)]


def _variant(results: dict, variant: str) -> dict:
    prefix = f"{variant}["
    return {k[len(variant):]: v for k, v in results.items() if k.startswith(prefix)}


def _assert_same(a: dict, b: dict, what: str, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys() and a, what
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=f"{what}: {k}")


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _run_workers(tmp_path_factory.mktemp("p8"), 8, 1, VARIANTS)[0]


def test_jit_pmap_single_device_agree(eight_devices: dict) -> None:
    single = _variant(eight_devices, "single")
    _assert_same(single, _variant(eight_devices, "jit"), "jit vs single device")
    _assert_same(single, _variant(eight_devices, "pmap"), "pmap (synced BN) vs single device")


def test_ghost_bn_jit_equals_pmap_and_differs_from_synced(eight_devices: dict) -> None:
    ghost = _variant(eight_devices, "single_ghost")
    _assert_same(ghost, _variant(eight_devices, "jit_ghost"), "jit bn_groups vs single")
    _assert_same(ghost, _variant(eight_devices, "pmap_ghost"), "pmap per-device BN vs single")
    synced = _variant(eight_devices, "single")
    mean_key = next(k for k in ghost if k.startswith("[1]") and k.endswith("['mean']"))
    assert not np.allclose(ghost[mean_key], synced[mean_key], rtol=1e-3), (
        "per-device BN statistics should differ from the global ones"
    )


def test_two_processes_match_one_process(eight_devices: dict, tmp_path: Path) -> None:
    p0, p1 = _run_workers(tmp_path, 4, 2, ("jit", "pmap"))
    for variant in ("jit", "pmap"):
        _assert_same(_variant(p0, variant), _variant(p1, variant), f"{variant}: process 0 vs 1")
        _assert_same(
            _variant(p0, variant), _variant(eight_devices, variant),
            f"{variant}: 2 processes x 4 devices vs 1 process x 8 devices",
        )


def test_prefetch_places_batches_ahead_in_order_and_defers_an_error_to_its_batch() -> None:
    from resnet_jax import parallel
    from resnet_jax.errors import ConfigError, DataError

    placed: list[int] = []

    def source(n: int, fail_at: int | None = None):
        for i in range(n):
            if i == fail_at:
                raise DataError(f"batch {i} is damaged")
            yield i

    def put(i: int) -> int:
        placed.append(i)
        return 10 * i

    for size in (0, 1, 2):
        placed.clear()
        seen = []
        for got in parallel.prefetch(source(5), put, size):
            # when batch k is handed over, the next `size` ones are on their way already
            assert placed == list(range(min(len(seen) + 1 + size, 5))), (size, placed)
            seen.append(got)
        assert seen == [0, 10, 20, 30, 40]
    placed.clear()
    stream = parallel.prefetch(source(5, fail_at=3), put, 2)
    assert [next(stream) for _ in range(3)] == [0, 10, 20]  # the batches before it are used
    with pytest.raises(DataError, match="batch 3 is damaged"):
        next(stream)
    with pytest.raises(ConfigError, match="device_prefetch=-1"):
        next(parallel.prefetch(source(1), put, -1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("variants", nargs="+", choices=VARIANTS)
    a = parser.parse_args()
    _worker(a.out, a.process_id, a.num_processes, a.port, a.variants)


class _Output:
    """Stands in for a step's output: records when the loop blocks on it."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def block_until_ready(self) -> _Output:
        self.log.append(self.name)
        return self


def test_in_flight_keeps_at_most_limit_steps_unfinished(monkeypatch) -> None:
    from resnet_jax import parallel

    settled = []
    monkeypatch.setattr(parallel, "settle_heap", lambda: settled.append(1))
    log: list[str] = []
    bounded = parallel.InFlight(2)
    for i in range(5):
        bounded.wait()
        bounded.add(_Output(f"s{i}", log))
    # before step k is dispatched, step k-2 is waited for: two at most are ever queued
    assert log == ["s0", "s1", "s2"] and settled == [1]  # settled once, after the first
    unbounded = parallel.InFlight(0)
    for i in range(5):
        unbounded.wait()
        unbounded.add(_Output(f"u{i}", log))
    assert log == ["s0", "s1", "s2"]


def test_steps_in_flight_resolves_auto_and_rejects_bad_values() -> None:
    from resnet_jax import parallel
    from resnet_jax.errors import ConfigError

    assert parallel.steps_in_flight(-1) == 1  # the tests run on CPU: one step at a time
    assert parallel.steps_in_flight(0) == 0 and parallel.steps_in_flight(3) == 3
    for bad in (-2, 1.5, True, "auto"):
        with pytest.raises(ConfigError, match=r"steps_in_flight=.*--config.steps_in_flight=1"):
            parallel.steps_in_flight(bad)


_STRANDED = """
import ctypes, sys
from resnet_jax import parallel
if sys.argv[1] == "off":
    print(parallel.settle_heap())  # never asked to keep freed memory: nothing to do
    raise SystemExit
assert parallel.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t]
libc.malloc.restype = libc.memset.restype = ctypes.c_void_p
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
size = 256 << 20
block = ctypes.c_void_p()
assert libc.posix_memalign(ctypes.byref(block), 64, size) == 0  # as XLA:CPU's temporaries
libc.memset(block, 1, size)
small = libc.malloc(1 << 20)  # a long-lived allocation above it
libc.memset(small, 1, 1 << 20)
libc.free(block)
kept = rss()
assert parallel.settle_heap()
print(kept - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_settle_heap_returns_a_stranded_block_to_the_os() -> None:
    """A freed 256 MiB aligned block below a live allocation stays resident under
    keep_freed_memory (nothing trims) until settle_heap hands its pages back."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root)}
    out = {}
    for mode in ("keep", "off"):
        done = subprocess.run([sys.executable, "-c", _STRANDED, mode], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        out[mode] = done.stdout.split()[-1]
    assert int(out["keep"]) > 200 << 20 and out["off"] == "False", out


_FAULTS = """
import resource, sys
from resnet_jax import parallel
if sys.argv[1] == "keep":
    assert parallel.keep_freed_memory()
import jax, numpy as np
from resnet_jax import models
from resnet_jax.train import config as config_lib
from resnet_jax.train.state import create_train_state
from resnet_jax.train.step import train_step
model = models.create("cifar_resnet", depth=8)  # compiles in a third of ResNet-20's time
state = create_train_state(config_lib.default_config(), model, jax.random.key(0),
                           image_shape=(32, 32, 3))
step = parallel.compile(train_step, "jit", donate_state=True)
state = step.replicate(state)
rng = np.random.default_rng(0)
batch = step.shard({"image": rng.standard_normal((128, 32, 32, 3), dtype=np.float32),
                    "label": rng.integers(0, 10, (128,), dtype=np.int32)})
faults = []
for i in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    state, metrics = step(state, batch, jax.random.PRNGKey(i))
    jax.block_until_ready(metrics)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[2:]))  # the quietest step after warm-up
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_keep_freed_memory_stops_the_per_step_page_faults() -> None:
    """XLA:CPU's per-step temporaries of a batch-128 step (CIFAR ResNet-8) fault in afresh every
    step (tens of thousands of pages) unless glibc keeps freed memory; then few or none do."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root)}
    faults = {}
    for mode in ("keep", "default"):
        done = subprocess.run([sys.executable, "-c", _FAULTS, mode], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        faults[mode] = int(done.stdout.split()[-1])
    # idle: ~30,000 vs 0 (ResNet-20: ~79,000); with other processes busy the kept heap still
    # faults in some pages
    assert faults["default"] > 10_000 and faults["keep"] < faults["default"] / 4, faults
