"""The fused batch-norm FFI kernels (resnet_jax.ops.fused_bn, bn_kernels.cc): each one against a
float64 numpy reference (and the statistics against XLA's float32 reductions), the same bits for
any thread split, one-line errors for bad inputs, and batch-sharded under jit on two devices.

Skipped where the oneDNN extension (whose library holds these kernels) is unavailable, unless
``RESNET_JAX_REQUIRE_ONEDNN=1``, where that fails instead."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import onednn_status

from resnet_jax.ops import fused_bn

ROOT = Path(__file__).resolve().parents[1]
AVAILABLE, WHY = onednn_status()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"oneDNN extension unavailable: {WHY}")

SHAPES = [(2, 8, 8, 16), (3, 5, 7, 24), (4, 14, 14, 40), (37, 19)]


def ids(shape: tuple) -> str:
    return "x".join(map(str, shape))


def _inputs(shape: tuple[int, ...], seed: int = 0) -> dict[str, np.ndarray]:
    """float32 x (off-centre), g, y (a ReLU output: exact zeros), residual, and per-channel
    coefficients (inv_std and a positive)."""
    rng = np.random.default_rng(seed)
    c = shape[-1]

    def normal(*s: int) -> np.ndarray:
        return rng.standard_normal(s).astype(np.float32)

    x = 1.5 + 2 * normal(*shape)
    return {
        "x": x, "g": normal(*shape), "r": normal(*shape),
        "y": np.maximum(normal(*shape), 0).astype(np.float32),
        "c3": np.stack([normal(c), np.abs(normal(c)) + 0.1, normal(c)]),
        "mi": np.stack([x.reshape(-1, c).mean(0), 1 / (x.reshape(-1, c).std(0) + 0.1)]),
        "c5": np.stack([x.reshape(-1, c).mean(0), np.abs(normal(c)) + 0.1, normal(c), normal(c),
                        normal(c)]).astype(np.float32),
    }


def _f64(*arrays: np.ndarray) -> list[np.ndarray]:
    return [np.asarray(a, np.float64).reshape(-1, np.shape(a)[-1]) for a in arrays]


def _close(ours, ref: np.ndarray, scale: np.ndarray, tol: float) -> None:
    """|ours - ref| <= tol * scale, elementwise (scale: the magnitude of what was summed)."""
    err = np.abs(np.asarray(ours, np.float64).reshape(ref.shape) - ref)
    worst = float(np.max(err / np.maximum(scale, 1e-30)))
    assert worst <= tol, worst


def _masked(g: np.ndarray, y: np.ndarray, relu: bool) -> np.ndarray:
    return g * (y > 0) if relu else g


@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_stats_equal_float64_means_and_xlas_float32_reduction(shape: tuple) -> None:
    a = _inputs(shape)
    s = fused_bn.stats(jnp.asarray(a["x"]))
    assert s.shape == (2, shape[-1]) and s.dtype == jnp.float32
    (x,) = _f64(a["x"])
    ref = np.stack([x.mean(0), (x * x).mean(0)])
    scale = np.stack([np.abs(x).mean(0), (x * x).mean(0)])
    _close(s, ref, scale, 1e-6)
    axes = tuple(range(len(shape) - 1))
    xla = jax.jit(lambda x: jnp.stack([x.mean(axes), (x * x).mean(axes)]))(jnp.asarray(a["x"]))
    _close(s, np.asarray(xla, np.float64), scale, 1e-5)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_apply_equals_float64(shape: tuple, residual: bool, relu: bool) -> None:
    a = _inputs(shape)
    res = jnp.asarray(a["r"]) if residual else None
    y = fused_bn.apply(jnp.asarray(a["x"]), jnp.asarray(a["c3"]), res, relu)
    assert y.shape == shape and y.dtype == jnp.float32
    x, r = _f64(a["x"], a["r"])
    m, s, b = np.asarray(a["c3"], np.float64)
    ref = (x - m) * s + b + (r if residual else 0)
    scale = np.abs(x - m) * s + np.abs(b) + (np.abs(r) if residual else 0)
    _close(y, np.maximum(ref, 0) if relu else ref, scale, 1e-6)
    if relu:
        assert float(jnp.min(y)) == 0.0


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_bwd_stats_equal_float64(shape: tuple, relu: bool) -> None:
    a = _inputs(shape)
    t = fused_bn.bwd_stats(jnp.asarray(a["g"]), jnp.asarray(a["y"]), jnp.asarray(a["x"]),
                           jnp.asarray(a["mi"]), relu)
    assert t.shape == (2, shape[-1]) and t.dtype == jnp.float32
    g, y, x = _f64(a["g"], a["y"], a["x"])
    gm = _masked(g, y, relu)
    xhat = (x - np.float64(1) * a["mi"][0]) * a["mi"][1]
    ref = np.stack([gm.mean(0), (gm * xhat).mean(0)])
    scale = np.stack([np.abs(gm).mean(0), np.abs(gm * xhat).mean(0)])
    _close(t, ref, scale, 1e-6)
    if not relu:  # y is read only for the mask: None stands in
        t_none = fused_bn.bwd_stats(jnp.asarray(a["g"]), None, jnp.asarray(a["x"]),
                                    jnp.asarray(a["mi"]))
        np.testing.assert_array_equal(np.asarray(t_none), np.asarray(t))


@pytest.mark.parametrize("emit_masked", [False, True])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_bwd_apply_equals_float64(shape: tuple, relu: bool, emit_masked: bool) -> None:
    a = _inputs(shape)
    out = fused_bn.bwd_apply(jnp.asarray(a["g"]), jnp.asarray(a["y"]), jnp.asarray(a["x"]),
                             jnp.asarray(a["c5"]), relu, emit_masked)
    dx, masked = out if emit_masked else (out, None)
    assert dx.shape == shape and dx.dtype == jnp.float32
    g, y, x = _f64(a["g"], a["y"], a["x"])
    mean, inv_std, scale_a, m_g, m_gx = np.asarray(a["c5"], np.float64)
    gm = _masked(g, y, relu)
    xhat = (x - mean) * inv_std
    ref = scale_a * (gm - m_g - xhat * m_gx)
    scale = np.abs(scale_a) * (np.abs(gm) + np.abs(m_g) + np.abs(xhat * m_gx))
    _close(dx, ref, scale, 1e-6)
    if emit_masked:
        np.testing.assert_array_equal(np.asarray(masked).reshape(gm.shape),
                                      gm.astype(np.float32))


@pytest.mark.parametrize("shape", [(4, 14, 14, 40), (8, 32, 32, 24), (3, 1000, 19)], ids=ids)
def test_any_split_gives_the_same_bits(shape: tuple) -> None:
    """The reductions' order is fixed by the row count alone (parts of <= 4096 rows, summed in
    part order); these shapes have 13, 64 and 47 parts, so split 2 and 5 do divide them."""
    a = {k: jnp.asarray(v) for k, v in _inputs(shape, seed=1).items()}
    calls = {
        "stats": lambda s: fused_bn.stats(a["x"], split=s),
        "apply": lambda s: fused_bn.apply(a["x"], a["c3"], a["r"], True, split=s),
        "bwd_stats": lambda s: fused_bn.bwd_stats(a["g"], a["y"], a["x"], a["mi"], True,
                                                  split=s),
        "bwd_apply": lambda s: fused_bn.bwd_apply(a["g"], a["y"], a["x"], a["c5"], True, True,
                                                  split=s),
    }
    for name, call in calls.items():
        one = [np.asarray(v) for v in jax.tree.leaves(call(1))]
        for split in (2, 5):
            for u, v in zip(one, jax.tree.leaves(call(split)), strict=True):
                np.testing.assert_array_equal(u, np.asarray(v), err_msg=f"{name} split {split}")


def test_one_row_and_more_chunks_than_rows() -> None:
    x = jnp.asarray([[1.0, -2.0, 3.0]], jnp.float32)
    np.testing.assert_array_equal(np.asarray(fused_bn.stats(x, split=4)),
                                  [[1.0, -2.0, 3.0], [1.0, 4.0, 9.0]])
    coef = jnp.asarray([[0.0] * 3, [2.0] * 3, [1.0] * 3], jnp.float32)
    np.testing.assert_array_equal(np.asarray(fused_bn.apply(x, coef, None, True, split=4)),
                                  [[3.0, 0.0, 7.0]])


def test_bad_inputs_raise_one_line_naming_the_fix() -> None:
    a = {k: jnp.asarray(v) for k, v in _inputs((2, 4, 4, 8)).items()}
    x, c3 = a["x"], a["c3"]
    with pytest.raises(TypeError, match=r"fused_bn.stats: x is bfloat16.*astype\(jnp.float32\)"):
        fused_bn.stats(x.astype(jnp.bfloat16))
    with pytest.raises(TypeError, match="rank >= 2"):
        fused_bn.stats(x[0, 0, 0])
    with pytest.raises(TypeError, match="no rows"):
        fused_bn.stats(x[:0])
    with pytest.raises(TypeError, match=r"coef must be float32 \(3, 8\)"):
        fused_bn.apply(x, c3[:2], None, False)
    with pytest.raises(TypeError, match=r"residual has shape \(2, 4, 4, 4\); it must have x's"):
        fused_bn.apply(x, c3, a["r"][..., :4], False)
    with pytest.raises(TypeError, match="relu=True needs y"):
        fused_bn.bwd_stats(a["g"], None, x, a["mi"], True)
    with pytest.raises(TypeError, match=r"mi must be float32 \(2, 8\)"):
        fused_bn.bwd_stats(a["g"], a["y"], x, a["c5"], False)
    with pytest.raises(TypeError, match=r"coef must be float32 \(5, 8\)"):
        fused_bn.bwd_apply(a["g"], a["y"], x, a["c5"].astype(jnp.bfloat16))
    with pytest.raises(TypeError, match="g has shape"):
        fused_bn.bwd_apply(a["g"][:1], a["y"], x, a["c5"])
    # the handlers check too (the wrappers are bypassed here), each in one line
    cases = [
        ("bn_apply", (x, c3[:2]), r"bn_apply: coef must be \(3, C\)"),
        ("bn_apply_add", (x, c3, a["r"][:1]), "bn_apply_add: residual must have the shape of x"),
        ("bn_stats", (x.astype(jnp.bfloat16),), "bn_stats: x must be float32"),
        ("bn_stats", (x[0, 0, 0],), r"bn_stats: x must have rank >= 2"),
        ("bn_bwd_stats", (a["g"], a["y"][:1], x, a["mi"]), "bn_bwd_stats: y must have the shape"),
    ]
    for target, arrays, message in cases:
        with pytest.raises(jax.errors.JaxRuntimeError, match=f"INVALID_ARGUMENT: resnet_jax "
                           f"{message}"):
            fused_bn._ffi(target, arrays, False, 2)


def test_two_cpu_devices_each_run_their_shard_and_agree_with_one() -> None:
    script = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from resnet_jax.ops import fused_bn as fb
        rng = np.random.default_rng(0)
        shape = (8, 6, 6, 24)
        x, g, y, r = (jnp.asarray(rng.standard_normal(shape, dtype=np.float32)) for _ in "1234")
        y = jnp.maximum(y, 0)
        c5 = jnp.asarray(rng.standard_normal((5, 24), dtype=np.float32))
        def forward(x, g, y, r):  # stats -> coefficients -> apply, as batch norm chains them
            s = fb.stats(x)
            inv = jax.lax.rsqrt(s[1] - s[0] ** 2 + 1e-5)
            return s, fb.apply(x, jnp.stack([s[0], inv, s[0] * 0 + 0.5]), r, True)
        steps = {
            "forward": forward,
            "bwd_stats": lambda x, g, y, r: fb.bwd_stats(g, y, x, c5[:2], True),
            "bwd_apply": lambda x, g, y, r: fb.bwd_apply(g, y, x, c5, True, True),
            "2-d": lambda x, g, y, r: fb.stats(x.reshape(-1, 24)),
        }
        mesh = Mesh(np.asarray(jax.devices()), ("batch",))
        sharded = [jax.device_put(a, NamedSharding(mesh, P("batch"))) for a in (x, g, y, r)]
        for name, f in steps.items():
            one = jax.tree.leaves(jax.jit(f)(x, g, y, r))
            two = jax.tree.leaves(jax.jit(f)(*sharded))
            for a, b in zip(one, two, strict=True):
                err = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
                assert err < 1e-6, (name, err)
            hlo = jax.jit(f).lower(*sharded).compile().as_text()
            calls = [l for l in hlo.splitlines() if "custom_call_target=\\"resnet_jax_bn" in l]
            assert calls and "all-gather" not in hlo, (name, calls)
            assert all("f32[8," not in l and "f32[288," not in l for l in calls), calls
            if name != "2-d":
                assert all("f32[4,6,6,24]" in l for l in calls), calls
        # parallel.compile's "pmap" mode: the per-device step under shard_map, pmean'd by hand
        per_device = jax.jit(jax.shard_map(
            lambda x: jax.lax.pmean(fb.stats(x), "batch"), mesh=mesh, in_specs=P("batch"),
            out_specs=P(), check_vma=False))
        assert float(jnp.max(jnp.abs(per_device(x) - fb.stats(x)))) < 1e-6
        print("ok")
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
