"""Checkpoints of global (sharded) arrays, no host copy: on 2 CPU devices, all under
``jax.transfer_guard("disallow")``, a state born on the mesh saves, survives its buffers being
donated right after ``save`` returns, and restores into exactly the given shardings; the
on-device checksum equals the host one, whatever the sharding, and catches damage; format-1
checkpoints (CRC-32 of host copies) still restore; the policy's NaN check runs on the devices.

The 2-device scenarios run in one subprocess (this file is its script; the test process keeps
one device); the single-device checks run here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

SCENARIOS: dict[str, Callable[[Path], None]] = {}


def scenario(fn: Callable[[Path], None]) -> Callable[[Path], None]:
    SCENARIOS[fn.__name__] = fn
    return fn


def _mesh_state() -> tuple[Any, Any, Any]:
    """``(mesh, state, expected)``: a tree of global arrays born on a 2-device mesh (sharded,
    replicated, several dtypes) and its values on the host."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2,), ("data",))
    rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def init() -> dict:
        return {"params": {"w": jnp.arange(4096, dtype=jnp.float32).reshape(64, 64) / 7,
                           "b": jnp.linspace(-1, 1, 6, dtype=jnp.bfloat16)},
                "opt_state": (jnp.arange(10, dtype=jnp.int32), jnp.ones((3,), jnp.bool_)),
                "step": jnp.int32(5)}

    shardings = {"params": {"w": split, "b": rep}, "opt_state": (split, rep), "step": rep}
    state = jax.jit(init, out_shardings=shardings)()
    return mesh, state, jax.device_get(state)


def _abstract(state: Any) -> Any:
    """``state`` as shapes, dtypes and shardings (what the loop's abstract state holds)."""
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)


def _assert_tree_equal(got: Any, want: Any) -> None:
    import jax

    a, b = jax.tree_util.tree_flatten_with_path(got)[0], jax.tree_util.tree_leaves(want)
    assert len(a) == len(b), (len(a), len(b))
    for (path, x), y in zip(a, b, strict=True):
        x = np.asarray(jax.device_get(x))
        assert x.dtype == np.asarray(y).dtype and np.array_equal(x, y), jax.tree_util.keystr(path)


def _assert_shardings(got: Any, template: Any) -> None:
    import jax

    for x, t in zip(jax.tree.leaves(got), jax.tree.leaves(template), strict=True):
        assert isinstance(x, jax.Array), type(x)
        assert x.sharding == t.sharding, (x.sharding, t.sharding)


@scenario
def checksum_is_the_same_on_host_and_device_in_any_sharding(tmp: Path) -> None:
    import jax
    import ml_dtypes
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from resnet_jax import checkpoint

    mesh = jax.make_mesh((2,), ("data",))
    rng = np.random.default_rng(0)
    host = [rng.normal(size=(6, 5)).astype(np.float32),
            rng.normal(size=(4, 2)).astype(ml_dtypes.bfloat16),
            rng.normal(size=(2, 3)).astype(np.float16),
            rng.integers(-5, 5, (8,)).astype(np.int8),
            rng.integers(0, 2, (4, 2)).astype(bool),
            np.asarray(7, np.int32), np.zeros((0, 3), np.float32),
            (rng.normal(size=(2, 2)) + 1j).astype(np.complex64)]
    want = checkpoint.checksums(host)
    assert len(set(want)) == len(want), want
    for spec in (P(), P("data")):
        def put(x: np.ndarray, spec: P = spec) -> jax.Array:
            s = spec if x.ndim and x.shape[0] % 2 == 0 else P()
            return jax.device_put(x, NamedSharding(mesh, s))
        with jax.transfer_guard("disallow"):
            for on_device in (True, False):  # False: replicated CPU arrays are read in place
                got = checkpoint.checksums([put(x) for x in host], on_device=on_device)
                assert got == want, (spec, on_device)
    with jax.enable_x64(True):  # 8-byte elements: two words each, on both sides
        wide = [rng.normal(size=(4, 3)), rng.integers(-2**40, 2**40, (4,)),
                rng.normal(size=(2,)) + 2j]
        on_device = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in wide]
        assert checkpoint.checksums(on_device) == checkpoint.checksums(wide)


@scenario
def save_then_donate_then_restore_into_the_shardings(tmp: Path) -> None:
    import jax
    from orbax.checkpoint._src.serialization import serialization

    from resnet_jax import checkpoint

    _, state, expected = _mesh_state()
    template = _abstract(state)
    overwrite = jax.jit(lambda t: jax.tree.map(lambda x: ~x if x.dtype == bool else x * 3, t),
                        donate_argnums=0)

    # Hold orbax's background writes until the buffers have been donated and overwritten: the
    # write must come from orbax's own host copy, taken before save() returned.
    go, original = threading.Event(), serialization.async_serialize_from_host
    held_writes = []

    async def held(*args: Any, **kwargs: Any) -> Any:
        held_writes.append(threading.current_thread().name)
        while not go.is_set():
            await asyncio.sleep(0.01)
        return await original(*args, **kwargs)

    serialization.async_serialize_from_host = held
    store = checkpoint.CheckpointStore(str(tmp / "ckpt"), keep=3)
    try:
        with jax.transfer_guard("disallow"):
            store.save(1, state, {"note": "sharded"})
            # on CPU orbax's host copy of a shard is a view of its buffer: XLA then leaves that
            # buffer alone (the donation is skipped); elsewhere it is a copy and donation happens
            later = jax.block_until_ready(overwrite(state))
            go.set()
            store.wait()
            step, tree, meta = store.restore(template)
    finally:
        serialization.async_serialize_from_host = original
        go.set()
    assert held_writes, "orbax no longer writes through async_serialize_from_host: update this"
    assert step == 1 and meta["format"] == checkpoint.FORMAT_VERSION == 2
    assert meta["checksum"] == checkpoint.CHECKSUM and meta["note"] == "sharded"
    _assert_shardings(tree, template)
    _assert_tree_equal(tree, expected)
    assert not np.array_equal(jax.device_get(later["params"]["w"]), expected["params"]["w"])

    with jax.transfer_guard("disallow"):  # a template of concrete arrays; a part of the tree
        again = store.restore(later).tree
        part = store.restore({"params": template["params"]}).tree
        prepared = store.restore(lambda meta, where: {"params": template["params"]}).tree
    _assert_shardings(again, later)
    _assert_tree_equal(again, expected)
    assert set(part) == set(prepared) == {"params"}
    _assert_tree_equal(part, {"params": expected["params"]})
    store.close()


@scenario
def leaves_without_a_sharding_restore_as_numpy(tmp: Path) -> None:
    import jax

    from resnet_jax import checkpoint

    _, state, expected = _mesh_state()
    store = checkpoint.CheckpointStore(str(tmp / "ckpt"))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    mixed = {**abstract, "step": state["step"]}  # one leaf with a sharding, the rest without
    with jax.transfer_guard("disallow"):
        store.save(4, state, {})
        store.wait()
        tree = store.restore(mixed).tree
    leaves = jax.tree.leaves(tree)
    assert sum(isinstance(x, np.ndarray) for x in leaves) == len(leaves) - 1
    assert tree["step"].sharding == state["step"].sharding
    _assert_tree_equal(tree, expected)
    store.close()


def _meta_file(directory: Path, step: int) -> Path:
    return directory / str(step) / "meta" / "metadata"


@scenario
def a_changed_checksum_moves_the_step_aside(tmp: Path) -> None:
    import warnings

    import jax

    from resnet_jax import checkpoint

    _, state, expected = _mesh_state()
    template = _abstract(state)
    directory = tmp / "ckpt"
    store = checkpoint.CheckpointStore(str(directory), keep=3)
    with jax.transfer_guard("disallow"):
        store.save(1, state, {})
        store.save(2, state, {})
        store.wait()
    # what a silently damaged array looks like to restore: its data no longer hashes to the
    # recorded value (orbax reads it without error)
    record = json.loads(_meta_file(directory, 2).read_text())
    record["arrays"]["params/w"][2] ^= 1
    _meta_file(directory, 2).write_text(json.dumps(record))
    with warnings.catch_warnings(record=True) as caught, jax.transfer_guard("disallow"):
        warnings.simplefilter("always")
        step, tree, _ = store.restore(template)
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert step == 1, step
    assert any("checkpoint 2" in s and "params/w" in s and "checksum" in s and "moved" in s
               for s in said), said
    assert store.steps() == [1] and len(list((tmp / "ckpt_damaged").iterdir())) == 1
    _assert_tree_equal(tree, expected)
    store.close()


@scenario
def a_template_on_an_abstract_mesh_is_refused_and_moves_nothing(tmp: Path) -> None:
    import jax

    from resnet_jax import checkpoint, errors

    _, state, _ = _mesh_state()
    store = checkpoint.CheckpointStore(str(tmp / "ckpt"))
    store.save(1, state, {})
    store.wait()
    traced = jax.eval_shape(lambda: state)  # shardings on the mesh's abstract twin
    assert isinstance(traced["step"].sharding.mesh, jax.sharding.AbstractMesh)
    with pytest.raises(errors.ConfigError, match=r"template's opt_state/0 is placed on an "
                                                 r"abstract mesh.*jitted init"):
        store.restore(traced)
    assert store.steps() == [1] and not (tmp / "ckpt_damaged").exists()
    store.close()


def _write_format_1(directory: Path, step: int, tree: dict, *, crc_offset: int = 0) -> None:
    """A checkpoint as format 1 wrote it: host numpy arrays and their CRC-32s."""
    import jax
    import orbax.checkpoint as ocp

    from resnet_jax import checkpoint

    arrays = {
        checkpoint.path_name(p): [list(x.shape), str(x.dtype), zlib.crc32(
            np.ascontiguousarray(x).reshape(-1).view(np.uint8)) + crc_offset]
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    record = {"format": 1, "step": step, "arrays": arrays, "note": "old"}
    manager = ocp.CheckpointManager(str(directory), item_names=("state", "meta"))
    manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(tree),
                                               meta=ocp.args.JsonSave(record)))
    manager.wait_until_finished()
    manager.close()


@scenario
def a_format_1_checkpoint_restores_into_shardings(tmp: Path) -> None:
    import jax

    from resnet_jax import checkpoint

    _, state, expected = _mesh_state()
    template = _abstract(state)
    host = jax.tree.map(np.asarray, expected)
    _write_format_1(tmp / "old", 3, host)
    _write_format_1(tmp / "bad", 3, host, crc_offset=1)
    store = checkpoint.CheckpointStore(str(tmp / "old"), read_only=True)
    with jax.transfer_guard("disallow"):
        step, tree, meta = store.restore(template)
    assert step == 3 and meta["note"] == "old"
    _assert_shardings(tree, template)
    _assert_tree_equal(tree, expected)
    store.close()
    bad = checkpoint.CheckpointStore(str(tmp / "bad"), read_only=True)
    with pytest.raises(checkpoint.CheckpointDamaged, match="CRC-32/shape differs"):
        bad.restore(template)
    bad.close()


@scenario
def the_policy_checks_finiteness_on_device_and_restores_sharded(tmp: Path) -> None:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    from test_checkpoint import tiny_config

    from resnet_jax import data, errors
    from resnet_jax.train import create_train_state
    from resnet_jax.train.loop import build_model
    from resnet_jax.train.policy import TrainingCheckpoints

    config = tiny_config()
    info = data.info(config)
    model = build_model(config, info.num_classes)
    mesh = jax.make_mesh((2,), ("data",))
    init = jax.jit(lambda key: create_train_state(config, model, key,
                                                  image_shape=info.image_shape),
                   out_shardings=NamedSharding(mesh, P()))
    key = jax.device_put(np.zeros(2, np.uint32), NamedSharding(mesh, P()))
    state = init(key)
    abstract = jax.eval_shape(init, key)
    poison = jax.jit(lambda s: s.replace(params={
        **s.params, "fc": {**s.params["fc"], "bias": s.params["fc"]["bias"] * jnp.nan}}))

    def checkpoints() -> TrainingCheckpoints:
        return TrainingCheckpoints(str(tmp), config, num_classes=info.num_classes,
                                   image_shape=info.image_shape)

    ckpt = checkpoints()
    with jax.transfer_guard("disallow"):
        same, start, rng = ckpt.restore(state, key)
        assert same is state and start == 0 and rng is key
        ckpt.save(2, state)
        with pytest.raises(errors.TrainingDiverged, match="params/fc/bias is not finite after "
                                                          "step 3"):
            ckpt.save(3, poison(state))
    assert ckpt.latest_step == 2
    ckpt.close()

    ckpt = checkpoints()
    with jax.transfer_guard("disallow"):
        restored, start, rng = ckpt.restore(abstract, key)
    ckpt.close()
    assert start == 2 and np.array_equal(jax.device_get(rng), [0, 0])
    _assert_shardings(restored, abstract)
    _assert_tree_equal(restored, jax.device_get(state))


def _run_scenarios(out: Path) -> None:
    import jax

    assert jax.device_count() == 2, jax.devices()
    results = {}
    for name, fn in SCENARIOS.items():
        (out / name).mkdir()
        try:
            fn(out / name)
            results[name] = "ok"
        except BaseException:  # reported to the test process, which fails on it
            results[name] = traceback.format_exc()
    (out / "results.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def two_devices(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("sharded")
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.run([sys.executable, __file__, "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_on_two_devices_under_the_transfer_guard(two_devices: dict[str, str], name: str) -> None:
    assert two_devices[name] == "ok", two_devices[name]


def test_checksum_sees_a_changed_or_a_moved_element() -> None:
    import jax

    from resnet_jax import checkpoint

    x = np.random.default_rng(1).normal(size=(6, 5)).astype(np.float32)
    nudged, swapped = x.copy(), x.copy()
    nudged[3, 2] = np.nextafter(nudged[3, 2], np.float32(np.inf))
    swapped[[0, 1]] = swapped[[1, 0]]
    host = checkpoint.checksums([x, nudged, swapped, x.reshape(5, 6)])
    assert len(set(host[:3])) == 3 and host[3] == host[0]  # the flat C order counts, not shape
    on_device = checkpoint.checksums([jax.device_put(a) for a in (x, nudged, swapped)],
                                     on_device=True)
    assert on_device == host[:3]


def test_a_format_1_checkpoint_restores_as_numpy(tmp_path: Path) -> None:
    from resnet_jax import checkpoint

    tree = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
            "step": np.asarray(3, np.int32)}
    _write_format_1(tmp_path / "old", 3, tree)
    store = checkpoint.CheckpointStore(str(tmp_path / "old"), read_only=True)
    step, got, meta = store.restore({"params": {"w": np.zeros((2, 3), np.float32)},
                                     "step": np.int32(0)})
    store.close()
    assert step == 3 and meta["format"] == 1
    assert isinstance(got["params"]["w"], np.ndarray)
    assert np.array_equal(got["params"]["w"], tree["params"]["w"]) and int(got["step"]) == 3


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    _run_scenarios(parser.parse_args().out)


def test_a_template_is_matched_by_path_not_by_container_type(tmp_path: Path) -> None:
    import collections

    from resnet_jax import checkpoint

    Slot = collections.namedtuple("Slot", ["mu", "count"])
    saved = {"opt_state": (Slot(np.arange(3, dtype=np.float32), np.asarray(2, np.int32)),),
             "params": {"w": np.ones((2, 2), np.float32)}}
    store = checkpoint.CheckpointStore(str(tmp_path / "ckpt"))
    store.save(1, saved, {})
    store.close()
    # what a reader that knows only the recorded paths builds: dicts all the way down
    template = {"opt_state": {"0": {"mu": np.zeros(3, np.float32), "count": np.int32(0)}},
                "params": {"w": np.zeros((2, 2), np.float32)}}
    store = checkpoint.CheckpointStore(str(tmp_path / "ckpt"), read_only=True)
    got = store.restore(template).tree
    like_saved = store.restore(saved).tree
    store.close()
    assert np.array_equal(got["opt_state"]["0"]["mu"], [0, 1, 2])
    assert int(got["opt_state"]["0"]["count"]) == 2
    assert isinstance(like_saved["opt_state"][0], Slot)  # the template's containers come back
    assert int(like_saved["opt_state"][0].count) == 2
