"""oneDNN convolutions (the ``[onednn]`` extra): equal to XLA's on every conv of the nets, under
jit, grad, vmap, pmap and scan; trains like XLA's; fails in one line where it cannot be built.

Skipped (loudly) where the extra is not installed, unless ``RESNET_JAX_REQUIRE_ONEDNN=1`` (CI
installs the extra and sets it), where a missing extension fails instead."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import onednn_status
from jax import lax

from resnet_jax import models
from resnet_jax.errors import ExtensionUnavailable
from resnet_jax.ops import onednn

ROOT = Path(__file__).resolve().parents[1]
DN = ("NHWC", "HWIO", "NHWC")


AVAILABLE, WHY = onednn_status()
needs_onednn = pytest.mark.skipif(not AVAILABLE, reason=f"oneDNN extension unavailable: {WHY}")


def _conv_shapes(arch: str, image: int, **overrides) -> set[tuple]:
    """(x shape, w shape, strides, padding) of every convolution in ``arch``'s forward pass,
    read from its jaxpr (scanned blocks included)."""
    model = models.create(arch, **overrides)
    x = jnp.zeros((2, image, image, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x)
    found = set()

    def walk(jp) -> None:
        for eqn in jp.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                lhs, rhs = (v.aval.shape for v in eqn.invars)
                found.add((lhs, rhs, tuple(eqn.params["window_strides"]),
                           tuple(tuple(p) for p in eqn.params["padding"])))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return found


SHAPES = sorted(
    _conv_shapes("resnet20", 32) | _conv_shapes("resnet56", 32)
    | _conv_shapes("resnet50", 224, stride_in="1x1")
    | _conv_shapes("resnet50", 224, stride_in="3x3")
)


def _rel(a: jax.Array, b: jax.Array) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_the_shapes_cover_every_kind_of_conv_in_the_nets() -> None:
    kinds = {(w[0], s[0]) for _, w, s, _ in SHAPES}
    # 3x3/1, 3x3/2 (v1.5), 1x1/1, 1x1/2 (projections, v1 bottleneck), 7x7/2 (ImageNet stem)
    assert {(3, 1), (3, 2), (1, 1), (1, 2), (7, 2)} <= kinds, kinds
    assert len(SHAPES) >= 20


@needs_onednn
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}*{s[1]}/{s[2][0]}")
def test_forward_input_and_weight_gradients_equal_lax(shape: tuple) -> None:
    xs, ws, strides, padding = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(xs, dtype=np.float32))
    w = jnp.asarray(rng.standard_normal(ws, dtype=np.float32))
    ours = functools.partial(onednn.conv_general_dilated, window_strides=strides,
                             padding=padding, dimension_numbers=DN)
    ref = functools.partial(lax.conv_general_dilated, window_strides=strides, padding=padding,
                            dimension_numbers=DN)
    y, vjp = jax.vjp(jax.jit(ours), x, w)
    y_ref, vjp_ref = jax.vjp(ref, x, w)
    g = jnp.asarray(rng.standard_normal(y_ref.shape, dtype=np.float32))
    (dx, dw), (dx_ref, dw_ref) = vjp(g), vjp_ref(g)
    assert y.shape == y_ref.shape and dx.shape == x.shape and dw.shape == w.shape
    for name, a, b in (("forward", y, y_ref), ("input grad", dx, dx_ref),
                       ("weight grad", dw, dw_ref)):
        assert _rel(a, b) <= 1e-5, (name, _rel(a, b))


def _small(dtype=np.float32, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((3, 9, 9, 5)), dtype),
            jnp.asarray(rng.standard_normal((3, 3, 5, 7)), dtype))


def _pair(padding="SAME", strides=(1, 1)):
    return (functools.partial(onednn.conv_general_dilated, window_strides=strides,
                              padding=padding, dimension_numbers=DN),
            functools.partial(lax.conv_general_dilated, window_strides=strides,
                              padding=padding, dimension_numbers=DN))


@needs_onednn
def test_vmap_per_example_gradients_batched_kernels_and_asymmetric_padding() -> None:
    x, w = _small()
    ours, ref = _pair(padding=((0, 2), (1, 0)), strides=(2, 1))

    def per_example(conv):
        grad = jax.grad(lambda w, x: jnp.sum(conv(x[None], w) ** 2))
        return jax.jit(jax.vmap(grad, in_axes=(None, 0)))(w, x)

    assert _rel(per_example(ours), per_example(ref)) <= 1e-5
    kernels = jnp.stack([w, 2 * w, -w])  # a batch of kernels over one input
    assert _rel(jax.vmap(ours, in_axes=(None, 0))(x, kernels),
                jax.vmap(ref, in_axes=(None, 0))(x, kernels)) <= 1e-5


@needs_onednn
@pytest.mark.parametrize("mode", ["pool", "openmp"])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_both_threading_modes_equal_lax_for_any_batch_split(
    mode: str, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """"pool" slices the batch over XLA's threads (uneven slices, summed weight gradients);
    "openmp" runs one call on an OpenMP team. Both equal lax."""
    monkeypatch.setenv("RESNET_JAX_ONEDNN_THREADING", mode)
    monkeypatch.setattr(onednn, "threads_per_call", lambda: 2)
    rng = np.random.default_rng(batch)
    x = jnp.asarray(rng.standard_normal((batch, 12, 12, 8), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 8, 16), dtype=np.float32))
    ours, ref = _pair(strides=(2, 2))
    y, vjp = jax.vjp(jax.jit(lambda x, w: ours(x, w)), x, w)
    y_ref, vjp_ref = jax.vjp(ref, x, w)
    g = jnp.asarray(rng.standard_normal(y_ref.shape, dtype=np.float32))
    for a, b in zip((y, *vjp(g)), (y_ref, *vjp_ref(g)), strict=True):
        assert _rel(a, b) <= 1e-5
    text = jax.jit(lambda x, w: ours(x, w)).lower(x, w).as_text()  # the mode reaches the call
    wanted = ("split = 2", "threads = 1") if mode == "pool" else ("split = 0", "threads = 2")
    assert all(w in text for w in wanted), wanted
    monkeypatch.setenv("RESNET_JAX_ONEDNN_THREADING", "tbb")
    with pytest.raises(ValueError, match="RESNET_JAX_ONEDNN_THREADING"):
        jax.jit(lambda x, w: ours(x, w))(x, w)


@needs_onednn
def test_bfloat16_matches_lax_to_bfloat16_precision() -> None:
    x, w = _small(jnp.bfloat16)
    ours, ref = _pair()
    y, vjp = jax.vjp(jax.jit(ours), x, w)
    y_ref, vjp_ref = jax.vjp(ref, x, w)
    assert y.dtype == jnp.bfloat16
    g = jnp.ones_like(y)
    for a, b in zip((y, *vjp(g)), (y_ref, *vjp_ref(g)), strict=True):
        assert _rel(a, b) <= 2e-2


@needs_onednn
def test_lowered_for_gpu_and_tpu_it_is_xlas_convolution() -> None:
    x, w = _small()
    ours, _ = _pair()
    f = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(ours(x, w) ** 2), argnums=(0, 1)))
    cpu = f.trace(x, w).lower(lowering_platforms=("cpu",)).as_text()
    assert "resnet_jax_onednn_conv_fwd" in cpu and "resnet_jax_onednn_conv_bwd_weights" in cpu
    for platform in ("cuda", "tpu"):
        text = f.trace(x, w).lower(lowering_platforms=(platform,)).as_text()
        assert "resnet_jax_onednn" not in text and "stablehlo.convolution" in text, platform


@pytest.mark.parametrize(("kwargs", "what"), [
    (dict(rhs_dilation=(2, 2)), "dilation"),
    (dict(feature_group_count=5), "grouped"),
    (dict(dimension_numbers=("NCHW", "OIHW", "NCHW")), "dimension_numbers"),
])
def test_what_it_does_not_take_raises_naming_the_xla_option(kwargs: dict, what: str) -> None:
    x, w = _small()
    args = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=DN) | kwargs
    with pytest.raises(ValueError, match=f"{what}.*conv_impl='xla'"):
        onednn.conv_general_dilated(x, w[:, :, :1] if "group" in what else w, **args)
    with pytest.raises(ValueError, match="float16"):
        onednn.conv_general_dilated(x.astype(jnp.float16), w.astype(jnp.float16), (1, 1), "SAME",
                                    dimension_numbers=DN)


@needs_onednn
def test_resnet20_train_steps_equal_xlas_along_20_steps() -> None:
    """Scanned stages, BN, SGD: along a 20-step XLA trajectory, the oneDNN step taken from the
    same state gives the same loss and the same new parameters (no chaotic compounding), and
    trained on its own for 20 steps it learns as XLA's does."""
    from resnet_jax import parallel
    from resnet_jax.train import config as config_lib
    from resnet_jax.train.state import create_train_state
    from resnet_jax.train.step import train_step

    config = config_lib.default_config()
    config.learning_rate = 0.02
    steps = {}
    for impl in ("xla", "onednn"):
        model = models.create("resnet20", width=8, conv_impl=impl)
        steps[impl] = parallel.compile(train_step, "jit", donate_state=False)
        state = create_train_state(config, model, jax.random.key(0), image_shape=(32, 32, 3))
    rng = np.random.default_rng(0)
    images = rng.standard_normal((32, 32, 32, 3), dtype=np.float32)
    labels = ((images[..., 0].mean((1, 2)) > 0) + 2 * (images[..., 1].mean((1, 2)) > 0))
    batch = {"image": images, "label": labels.astype(np.int32)}
    own = {impl: step.replicate(state) for impl, step in steps.items()}
    ref_state = steps["xla"].replicate(state)
    losses = {"xla": [], "onednn": []}
    for i in range(20):
        key = jax.random.PRNGKey(i)
        ref_next, ref_metrics = steps["xla"](ref_state, steps["xla"].shard(batch), key)
        our_next, our_metrics = steps["onednn"](ref_state, steps["onednn"].shard(batch), key)
        assert _rel(our_metrics["loss"], ref_metrics["loss"]) <= 1e-5, i
        for a, b in zip(jax.tree.leaves(our_next.params), jax.tree.leaves(ref_next.params),
                        strict=True):
            assert _rel(a, b) <= 1e-5, i
        ref_state = ref_next
        for impl, step in steps.items():
            own[impl], metrics = step(own[impl], step.shard(batch), key)
            losses[impl].append(float(metrics["loss"]))
    for impl, curve in losses.items():
        assert curve[-1] < 0.5 * curve[0], (impl, curve)
    np.testing.assert_allclose(losses["onednn"], losses["xla"], rtol=2e-2)


@needs_onednn
def test_the_cpu_fast_path_keeps_parameters_and_gradients_imagenet_stem() -> None:
    """conv_impl="onednn" also swaps in ops.norm's batch norm, ops.pool's stem max pool and
    unrolled scans: the variables are laid out as XLA's, and a ResNet-18 (7x7/2 stem, max
    pool, projections) gives the same loss, gradients and batch statistics."""
    x = jax.random.normal(jax.random.key(1), (4, 64, 64, 3))
    out = {}
    for impl in ("xla", "onednn"):
        model = models.create("resnet18", width=8, num_classes=5, conv_impl=impl)
        variables = model.init(jax.random.key(0), x)

        def loss(params, model=model, variables=variables):
            logits, stats = model.apply({**variables, "params": params}, x, train=True,
                                        mutable=["batch_stats"])
            return jnp.sum(logits ** 2), stats

        (value, stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
            variables["params"])
        out[impl] = (variables, value, grads, stats)
    (v_x, l_x, g_x, s_x), (v_o, l_o, g_o, s_o) = out["xla"], out["onednn"]
    assert jax.tree.structure(v_x) == jax.tree.structure(v_o)
    assert _rel(l_o, l_x) <= 1e-5
    for a, b in zip(jax.tree.leaves((g_o, s_o)), jax.tree.leaves((g_x, s_x)), strict=True):
        assert _rel(a, b) <= 1e-4


@needs_onednn
def test_pmap_and_jit_on_two_cpu_devices_each_convolve_their_shard(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        import jax, jax.numpy as jnp, numpy as np
        from jax import lax
        from resnet_jax.ops import onednn
        assert onednn.threads_per_call() == max(1, len(os.sched_getaffinity(0)) // 2)
        dn = ("NHWC", "HWIO", "NHWC")
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((2, 4, 8, 8, 3), dtype=np.float32))
        w = jnp.asarray(rng.standard_normal((3, 3, 3, 4), dtype=np.float32))
        def loss(conv, w, x):
            return jnp.sum(conv(x, w, (1, 1), "SAME", dimension_numbers=dn) ** 2)
        def grads(conv):
            g = jax.grad(functools.partial(loss, conv))
            return jax.pmap(g, in_axes=(None, 0))(w, x)
        import functools
        a, b = grads(onednn.conv_general_dilated), grads(lax.conv_general_dilated)
        assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) < 1e-5
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        mesh = Mesh(np.asarray(jax.devices()), ("batch",))  # as parallel.compile's jit mode
        xs = jax.device_put(x.reshape(8, 8, 8, 3), NamedSharding(mesh, P("batch")))
        f = jax.jit(lambda x: onednn.conv_general_dilated(x, w, (1, 1), "SAME",
                                                          dimension_numbers=dn))
        ref = lax.conv_general_dilated(xs, w, (1, 1), "SAME", dimension_numbers=dn)
        assert float(jnp.max(jnp.abs(f(xs) - ref))) < 1e-4
        # each device convolves its own half of the batch (no gather of the whole batch)
        hlo = f.lower(xs).compile().as_text()
        call = [l for l in hlo.splitlines() if "resnet_jax_onednn_conv_fwd" in l]
        assert call and all("f32[4,8,8,4]" in l and "f32[8,8,8" not in l for l in call), call
        gw = jax.jit(jax.grad(lambda w, x: jnp.sum(onednn.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=dn) ** 2)))
        gref = jax.grad(lambda w, x: jnp.sum(lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=dn) ** 2))
        err = jnp.max(jnp.abs(gw(w, xs) - gref(w, xs))) / jnp.max(jnp.abs(gref(w, xs)))
        assert float(err) < 1e-5
        print("ok")
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_a_missing_extra_or_compiler_is_one_line_naming_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ExtensionUnavailable, match=r"not installed.*run pip install -e \.$"):
        onednn._dist_file("resnet-jax-no-such-dist", "x.h")
    if AVAILABLE:  # a compiler that is not there: the build names it
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
        with pytest.raises(ExtensionUnavailable, match=r"no C\+\+ compiler.*install g\+\+"):
            onednn.build()


@needs_onednn
def test_train_py_with_conv_onednn_runs_and_a_missing_compiler_exits_2(tmp_path: Path) -> None:
    """The entry point end to end: --config.conv=onednn trains (a few steps of the digits
    quick start) and evaluates; a fresh cache with no compiler fails before any work, in one
    line, with the config exit status."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    args = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT}/configs/digits.py",
            "--config.conv=onednn", "--config.num_train_steps=3", "--config.eval_every_steps=3",
            "--config.checkpoint_every_steps=3", "--config.model_kwargs.width=4"]
    done = subprocess.run([*args, f"--workdir={tmp_path / 'run'}"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert (tmp_path / "run" / "metrics.jsonl").exists()
    import resnet_jax  # a checkpoint loads with XLA's convolution (portable, no extra needed)

    model, _ = resnet_jax.load(str(tmp_path / "run"))
    assert model.conv_impl == "xla"
    bad = {**env, "RESNET_JAX_CACHE": str(tmp_path / "cache"), "CXX": "no-such-g++"}
    done = subprocess.run([*args, f"--workdir={tmp_path / 'bad'}"], env=bad, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, (done.stdout + done.stderr)[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "no C++ compiler" in last and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_conv_is_a_validated_resume_safe_config_field() -> None:
    from resnet_jax.train import config as config_lib

    config = config_lib.default_config()
    assert config.conv == "auto" and config_lib.resume_safe("conv")
    config.conv = "cudnn"
    with pytest.raises(ValueError, match="conv"):
        config_lib.validate(config)
