"""Exact facts about the model family: parameter counts, multiply-adds, shortcut semantics."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import models
from resnet_jax.models import conv as canonical
from resnet_jax.summary import Convolution, convolutions, summarize


def param_count(name: str, **overrides) -> int:
    """Learnable parameters through ``jax.eval_shape``: no memory, even for ResNet-1202."""
    model = models.create(name, **overrides)
    size = 32 if model.stem == "cifar" else 224
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    )
    return sum(x.size for x in jax.tree.leaves(variables["params"]))


# Published counts (BN scale/offset included, running statistics excluded).
CIFAR_A = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962, 1202: 19_421_274}
IMAGENET_B = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160, 152: 60_192_808}


@pytest.mark.parametrize("depth", sorted(CIFAR_A))
def test_cifar_parameter_counts(depth):
    assert param_count(f"resnet{depth}") == CIFAR_A[depth]
    if depth != 1202:
        assert param_count(f"plain{depth}") == CIFAR_A[depth]


def test_cifar_option_b_adds_exactly_the_two_projections():
    assert param_count("resnet20", shortcut="B") == 272_474


@pytest.mark.parametrize("stride_in", ["1x1", "3x3"])
@pytest.mark.parametrize("depth", sorted(IMAGENET_B))
def test_imagenet_parameter_counts(depth, stride_in):
    overrides = {"stride_in": stride_in} if depth >= 50 else {}
    assert param_count(f"resnet{depth}", **overrides) == IMAGENET_B[depth]


def test_plain_imagenet_nets_drop_only_the_projections():
    # plain-18/34 have no 1x1 projections: 3 of them (conv + BN) in resnet18/34 option B.
    proj = (64 * 128 + 256) + (128 * 256 + 512) + (256 * 512 + 1024)
    assert param_count("plain18") == IMAGENET_B[18] - proj
    assert param_count("plain34") == IMAGENET_B[34] - proj


@pytest.mark.parametrize(
    "name, overrides, expected",
    [
        ("resnet18", {}, 1.814e9),
        ("resnet34", {}, 3.664e9),
        ("resnet50", {}, 3.858e9),
        ("resnet101", {}, 7.570e9),
        ("resnet152", {}, 11.282e9),
        ("resnet50", {"stride_in": "3x3"}, 4.089e9),
        ("resnet20", {}, 40.6e6),
        ("resnet56", {}, 125.5e6),
        ("resnet110", {}, 252.9e6),
    ],
)
def test_multiply_adds(name, overrides, expected):
    summary = summarize(name, **overrides)
    assert summary.mult_adds == pytest.approx(expected, rel=0.01)
    assert summary.params == param_count(name, **overrides)


def test_summary_rows_read_like_the_architecture():
    s = summarize("resnet50")
    assert [r.name for r in s.rows] == ["stem", "stage1", "stage2", "stage3", "stage4", "fc"]
    assert [r.output_shape for r in s.rows] == [
        (56, 56, 64), (56, 56, 256), (28, 28, 512), (14, 14, 1024), (7, 7, 2048), (1000,)
    ]
    assert "3.858 G mult-adds" in s.table()


def _out_side(c: Convolution) -> int:
    return (c.side + 2 * c.padding - c.kernel) // c.stride + 1


@pytest.mark.parametrize("name, overrides, layers, distinct", [
    ("resnet50", {"stride_in": "3x3"}, 53, 23),  # 16 blocks x 3 + 4 projections + the stem
    ("resnet56", {}, 55, 6),  # 27 blocks x 2 + the stem; option A adds no convolution
])
def test_convolutions_list_every_layer_once(name, overrides, layers, distinct):
    convs = convolutions(name, **overrides)
    assert sum(c.count for c in convs) == layers and len(convs) == distinct
    macs = sum(c.count * _out_side(c) ** 2 * c.kernel**2 * c.cin * c.cout for c in convs)
    fc = 2048 * 1000 if name == "resnet50" else 64 * 10
    assert macs == summarize(name, **overrides).mult_adds - fc
    assert convs[0].cin == 3  # the image layer first, in call order


def test_parameter_paths_read_like_the_architecture():
    v = jax.eval_shape(
        lambda: models.create("resnet18").init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    )
    p = v["params"]
    assert p["stage2"]["block0"]["conv1"]["kernel"].shape == (3, 3, 64, 128)
    assert p["stage2"]["block0"]["shortcut"]["conv"]["kernel"].shape == (1, 1, 64, 128)
    assert p["stage2"]["block1"]["bn2"]["scale"].shape == (128,)
    assert "shortcut" not in p["stage2"]["block1"]  # option B: projection only where shape changes
    assert set(v["batch_stats"]["stem"]["bn"]) == {"mean", "var"}
    # CIFAR nets scan blocks 1..n-1 of each stage on a leading axis.
    c = jax.eval_shape(
        lambda: models.create("resnet56").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    )
    assert c["params"]["stage3"]["blocks"]["conv2"]["kernel"].shape == (8, 3, 3, 64, 64)
    assert c["batch_stats"]["stage3"]["blocks"]["bn2"]["mean"].shape == (8, 64)


def test_registry_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"valid names: .*resnet20.*resnet50"):
        models.create("resnet21")
    with pytest.raises(ValueError, match=r"unknown model override.*widht"):
        models.create("resnet20", widht=8)
    with pytest.raises(ValueError, match="6n\\+2"):
        models.create("cifar_resnet", depth=21)
    with pytest.raises(ValueError, match="Table 1"):
        models.create("imagenet_resnet", depth=42)
    with pytest.raises(ValueError, match="has no field 'stride_in'"):
        models.create("resnet18", stride_in="3x3")
    with pytest.raises(ValueError, match="'A', 'B', 'C' or 'none'"):
        models.create("resnet20", shortcut="D")
    assert models.create("cifar_resnet", depth=8).stage_sizes == (1, 1, 1)


# --- shortcut semantics -------------------------------------------------------------------------


def block_output(shortcut, x, features, strides, block_cls=models.BasicBlock):
    """A block whose branch's last BN scale is zero returns ReLU(shortcut(x))."""
    conv = functools.partial(nn.Conv, use_bias=False)
    norm = functools.partial(nn.BatchNorm, use_running_average=True)
    block = block_cls(features, strides, shortcut, conv, norm, nn.relu, zero_init_last_bn=True)
    variables = block.init(jax.random.key(1), x)
    return block.apply(variables, x), variables


def test_option_a_is_subsampled_zero_padded_identity():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    y, variables = block_output("A", x, features=8, strides=2)
    expected = jnp.concatenate([x[:, ::2, ::2, :], jnp.zeros((2, 4, 4, 4))], axis=-1)
    np.testing.assert_allclose(y, jax.nn.relu(expected), atol=1e-6)
    assert "shortcut" not in variables["params"]  # parameter-free


def test_option_a_and_b_are_identity_when_the_shape_is_kept():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    for shortcut in ("A", "B"):
        y, _ = block_output(shortcut, x, features=4, strides=1)
        np.testing.assert_allclose(y, jax.nn.relu(x), atol=1e-6)


def test_option_c_is_the_projection_on_every_block():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    y, variables = block_output("C", x, features=4, strides=1)
    w = variables["params"]["shortcut"]["conv"]["kernel"]
    proj = jnp.einsum("bhwi,io->bhwo", x, w[0, 0])
    stats = variables["batch_stats"]["shortcut"]["bn"]
    bn = variables["params"]["shortcut"]["bn"]
    proj = (proj - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-5) * bn["scale"] + bn["bias"]
    np.testing.assert_allclose(y, jax.nn.relu(proj), atol=1e-5)


def test_option_b_projects_only_where_the_shape_changes():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    _, changed = block_output("B", x, features=8, strides=2)
    _, kept = block_output("B", x, features=4, strides=1)
    assert "shortcut" in changed["params"] and "shortcut" not in kept["params"]


@pytest.mark.parametrize("block_cls", [models.BasicBlock, models.BottleneckBlock])
def test_plain_block_adds_nothing(block_cls):
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
    y, _ = block_output("none", x, features=4 if block_cls is models.BottleneckBlock else 16,
                        strides=1, block_cls=block_cls)
    np.testing.assert_array_equal(y, jnp.zeros_like(y))


@pytest.mark.parametrize("stride_in, strided", [("1x1", "conv1"), ("3x3", "conv2")])
def test_bottleneck_stride_placement(stride_in, strided):
    model = models.create("imagenet_resnet", depth=50, stride_in=stride_in, width=4,
                          return_features=True)
    seen = {}

    def record(next_fun, args, kwargs, context):
        mod = context.module
        if isinstance(mod, nn.Conv) and mod.path[:2] == ("stage2", "block0") and len(mod.path) < 4:
            seen[context.module.name] = context.module.strides
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    assert seen[strided] == (2, 2)
    assert sorted(seen) == ["conv1", "conv2", "conv3"]
    assert all(s in (1, (1, 1)) for n, s in seen.items() if n != strided)


# --- modes, dtypes, features ---------------------------------------------------------------------


def tiny(**overrides):
    return models.create("cifar_resnet", depth=14, width=4, **overrides)


def test_train_mode_updates_batch_stats_and_eval_mode_keeps_them():
    model = tiny()
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3)) * 3 + 1
    v = jax.jit(functools.partial(model.init, train=False))(jax.random.key(1), x)
    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
    out = apply(v, x, train=False, mutable=("batch_stats",))[1]
    jax.tree.map(np.testing.assert_array_equal, out["batch_stats"], v["batch_stats"])
    _, new = apply(v, x, train=True, mutable=("batch_stats",))
    before = v["batch_stats"]["stem"]["bn"]["mean"]
    after = new["batch_stats"]["stem"]["bn"]["mean"]
    assert not np.allclose(before, after)
    # momentum 0.9: running = 0.9 * running + 0.1 * batch mean
    conv_out = nn.Conv(4, (3, 3), padding=1, use_bias=False).apply(
        {"params": v["params"]["stem"]["conv"]}, x
    )
    np.testing.assert_allclose(after, 0.1 * conv_out.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = tiny(dtype="bfloat16")
    x = jnp.ones((2, 16, 16, 3))
    v = jax.jit(model.init)(jax.random.key(0), x)
    assert {a.dtype for a in jax.tree.leaves(v)} == {jnp.dtype("float32")}
    logits, new = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))(v)
    assert logits.dtype == jnp.float32
    assert {a.dtype for a in jax.tree.leaves(new)} == {jnp.dtype("float32")}


def test_return_features_gives_every_stage():
    x = jnp.ones((2, 32, 32, 3))
    logits, feats = jax.eval_shape(
        lambda: tiny(return_features=True).apply(tiny().init(jax.random.key(0), x), x)
    )
    assert logits.shape == (2, 10)
    assert {k: v.shape for k, v in feats.items()} == {
        "stage1": (2, 32, 32, 4), "stage2": (2, 16, 16, 8), "stage3": (2, 8, 8, 16)
    }


def test_bn_axis_name_gives_global_batch_statistics():
    """Synced BN: per-shard statistics reduced over the named axis equal the global batch's."""
    model = tiny()
    x = jax.random.normal(jax.random.key(0), (8, 16, 16, 3)) * 2 + 0.5
    v = jax.jit(model.init)(jax.random.key(1), x)
    whole = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))(v)
    sharded = jax.jit(jax.vmap(
        lambda xs: model.apply(v, xs, train=True, mutable=["batch_stats"], bn_axis_name="d"),
        axis_name="d",
    ))(x.reshape(4, 2, 16, 16, 3))
    np.testing.assert_allclose(sharded[0].reshape(8, 10), whole[0], rtol=2e-4, atol=2e-5)
    jax.tree.map(
        lambda s, w: np.testing.assert_allclose(s[0], w, rtol=1e-4, atol=1e-6),
        sharded[1], whole[1],
    )


def unrolled_params(tree, num_blocks):
    """Map the scanned layout (stageK/blocks, stacked) onto the unrolled one (stageK/blockI)."""
    out = {}
    for name, sub in tree.items():
        if name.startswith("stage") and "blocks" in sub:
            sub = dict(sub)
            stacked = sub.pop("blocks")
            for i in range(num_blocks - 1):
                sub[f"block{i + 1}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
        out[name] = sub
    return out


def test_scanned_and_unrolled_stages_compute_the_same_function_and_gradient():
    scanned, unrolled = tiny(scan_blocks=True), tiny(scan_blocks=False)
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    v = scanned.init(jax.random.key(1), x)
    u = {k: unrolled_params(t, 2) for k, t in v.items()}
    labels = jnp.arange(4) % 10

    def loss(model, params, stats):
        logits, new = model.apply(
            {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels]), new

    (ls, ns), gs = jax.jit(jax.value_and_grad(functools.partial(loss, scanned), has_aux=True))(
        v["params"], v["batch_stats"]
    )
    (lu, nu), gu = jax.jit(jax.value_and_grad(functools.partial(loss, unrolled), has_aux=True))(
        u["params"], u["batch_stats"]
    )
    np.testing.assert_allclose(ls, lu, rtol=1e-5)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5)
    jax.tree.map(close, unrolled_params(gs, 2), gu)
    jax.tree.map(close, unrolled_params(ns["batch_stats"], 2), nu["batch_stats"])


@pytest.mark.parametrize("kernel, padding", [(3, ((1, 1), (1, 1))), (1, "SAME"), (3, "VALID")])
def test_canonical_gradient_conv_equals_autodiff(kernel, padding):
    x = jax.random.normal(jax.random.key(0), (3, 7, 6, 5))
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, 5, 4))
    dn = ("NHWC", "HWIO", "NHWC")

    def f(conv):
        return lambda x, w: jnp.sum(
            jnp.sin(conv(x, w, (1, 1), padding, dimension_numbers=dn))
        )

    ref = jax.grad(f(jax.lax.conv_general_dilated), argnums=(0, 1))(x, w)
    got = jax.jit(jax.grad(f(canonical.conv_general_dilated), argnums=(0, 1)))(x, w)
    for r, g in zip(ref, got, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_resnet1202_compiles_fast_with_scan():
    """Scanned stages: tracing 600 blocks costs one block per stage (timed in the README)."""
    model = models.create("resnet1202", width=2)
    x = jnp.zeros((1, 32, 32, 3))
    hlo = jax.jit(lambda k: model.init(k, x)).lower(jax.random.key(0)).as_text()
    assert hlo.count("while") >= 3 and len(hlo) < 2_000_000


def test_summary_counts_scanned_and_unrolled_stages_alike():
    scanned, unrolled = summarize("resnet56"), summarize("resnet56", scan_blocks=False)
    assert scanned.rows == unrolled.rows


# --- seams for forks: registry, import paths, stem/head modules, RNG streams in scans -------------


class _DrawBlock(nn.Module):
    """A basic block that also records one draw of the "dropout" stream (as dropout would)."""

    features: int
    strides: int = 1
    shortcut: str = "A"
    conv: Any = nn.Conv
    norm: Any = nn.BatchNorm
    act: Any = nn.relu

    @nn.compact
    def __call__(self, x):
        self.sow("intermediates", "draw", jax.random.uniform(self.make_rng("dropout"), ()))
        return models.BasicBlock(self.features, self.strides, self.shortcut, self.conv,
                                 self.norm, self.act, name="basic")(x)


def test_register_adds_a_name_and_refuses_a_silent_overwrite():
    models.register("test_tiny_resnet", lambda **kw: models.create("cifar_resnet", depth=8, **kw))
    try:
        assert models.create("test_tiny_resnet", width=4).width == 4
        assert "test_tiny_resnet" in models.names()
        with pytest.raises(ValueError, match="registered already"):
            models.register("test_tiny_resnet", models.create)
    finally:
        models._REGISTRY.pop("test_tiny_resnet")


def test_blocks_stems_heads_and_factories_resolve_from_import_paths():
    by_path = models.create("resnet20", block="examples.se:SEBlock",
                            stem="examples.preact:PreActStem", head="examples.preact:PreActHead")
    from examples import preact, se

    assert by_path.block_cls is se.SEBlock
    assert by_path.stem is preact.PreActStem and by_path.head is preact.PreActHead
    v = jax.eval_shape(lambda: by_path.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
    assert set(v["params"]) == {"stem", "stage1", "stage2", "stage3", "head"}
    assert set(v["params"]["stem"]) == {"conv"} and set(v["params"]["head"]) == {"bn", "fc"}
    assert "se_reduce" in v["params"]["stage2"]["blocks"]
    factory = models.create("resnet_jax.models:cifar", depth=8, width=4)
    assert factory.stage_sizes == (1, 1, 1)
    with pytest.raises(ValueError, match=r"cannot import 'no_such_pkg\.blocks'"):
        models.create("resnet20", block="no_such_pkg.blocks:X")
    with pytest.raises(ValueError, match="has no 'Nope'"):
        models.create("resnet20", head="examples.se:Nope")


def test_scanned_stages_split_every_rng_stream():
    model = models.create("cifar_resnet", depth=20, width=4, block_cls=_DrawBlock)  # 3 per stage
    x = jnp.zeros((2, 8, 8, 3))
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    variables = model.init(rngs, x)
    _, state = model.apply({k: v for k, v in variables.items() if k != "intermediates"}, x,
                           rngs={"dropout": jax.random.key(2)}, mutable=["intermediates"])
    draws = state["intermediates"]["stage1"]["blocks"]["draw"][0]
    assert draws.shape == (2,) and draws[0] != draws[1]
