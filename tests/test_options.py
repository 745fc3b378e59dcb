"""Options beyond the paper (issue 13): each tested, each off in the paper's configs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import config_module

from resnet_jax import models
from resnet_jax.train import config as config_lib
from resnet_jax.train import optim

PAPER = {
    "cifar10": ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202",
                "plain20", "plain56", "plain110"],
    "imagenet": ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "plain18",
                 "plain34"],
    "imagenet_studies": None,  # every study
}


def _paperconfig_module():
    for name, archs in PAPER.items():
        module = config_module(name)
        for arch in archs if archs is not None else list(module.STUDIES):
            yield f"{name}:{arch}", module.get_config(arch)


def test_no_option_beyond_the_paper_is_on_in_the_paperconfig_module():
    seen = 0
    for where, c in _paperconfig_module():
        config_lib.validate(c)
        assert c.optimizer == "sgd" and c.momentum == 0.9 and not c.nesterov, where
        assert c.label_smoothing == 0.0 and c.warmup_epochs == 0.0, where
        assert c.ema_decay == 0.0 and c.dtype == "float32" and not c.data.on_device, where
        assert c.get("profile_steps", "") in ("", None), where
        assert not c.model_kwargs.zero_init_last_bn, where
        assert not c.scale_lr_by_batch and c.weight_decay == 1e-4, where
        seen += 1
    assert seen == 9 + 7 + len(config_module("imagenet_studies").STUDIES)


def test_large_batch_config_is_goyal_et_al():
    c = config_module("imagenet").get_config("resnet50_large_batch")
    config_lib.validate(c)
    assert c.model == "resnet50" and c.batch_size == 8192 and c.model_kwargs.zero_init_last_bn
    steps_per_epoch = 1_281_167 / 8192
    lr = optim.create_learning_rate_schedule(c, steps_per_epoch)
    warm = round(5 * steps_per_epoch)  # 5 epochs
    assert float(lr(0)) == pytest.approx(0.1)
    assert float(lr(warm // 2)) == pytest.approx(0.1 + (3.2 - 0.1) * (warm // 2) / warm, rel=1e-5)
    assert float(lr(warm)) == pytest.approx(3.2)  # 0.1 x 8192 / 256
    for epoch, value in ((29.9, 3.2), (30, 0.32), (60, 0.032), (80, 0.0032)):
        assert float(lr(round(epoch * steps_per_epoch))) == pytest.approx(value, rel=1e-5)
    c.batch_size = 16384  # the recipe follows the batch
    assert float(optim.create_learning_rate_schedule(c, 1_281_167 / 16384)(1_000)) == (
        pytest.approx(6.4, rel=1e-5))
    c.optimizer = "lars"
    config_lib.validate(c)
    c.optimizer = "adam"
    with pytest.raises(ValueError, match="optimizer='adam' is not one of"):
        config_lib.validate(c)


def test_lars_scales_kernel_updates_by_the_trust_ratio_and_leaves_bn_alone():
    c = config_lib.default_config()
    c.optimizer, c.schedule, c.learning_rate = "lars", "constant", 0.5
    c.weight_decay, c.lars_trust_coefficient = 1e-4, 0.01
    tx = optim.create_optimizer(c)
    params = {"conv": {"kernel": jnp.full((3, 3, 2, 4), 0.2)}, "bn": {"scale": jnp.ones(4)}}
    grads = {"conv": {"kernel": jnp.full((3, 3, 2, 4), 0.05)}, "bn": {"scale": jnp.full(4, 0.3)}}
    updates, state = tx.update(grads, tx.init(params), params)
    w, g = params["conv"]["kernel"], grads["conv"]["kernel"] + 1e-4 * params["conv"]["kernel"]
    trust = 0.01 * jnp.linalg.norm(w) / jnp.linalg.norm(g)
    np.testing.assert_allclose(updates["conv"]["kernel"], -0.5 * trust * g, rtol=1e-5)
    np.testing.assert_allclose(updates["bn"]["scale"], -0.5 * grads["bn"]["scale"], rtol=1e-6)
    assert float(optim.current_learning_rate(state)) == 0.5


def test_nnx_network_matches_linen_and_trains_one_step():
    from flax import nnx

    model = models.create("cifar_resnet", depth=8, width=4, num_classes=10)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3))
    labels = jnp.array([0, 3, 5, 9])
    variables = models.init(model, jax.random.PRNGKey(0), x.shape)
    net = models.to_nnx(model, variables)
    np.testing.assert_array_equal(net(x), model.apply(variables, x, train=False))

    def linen_loss(params):
        logits, new = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                  x, train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new

    (loss, new), grads = jax.value_and_grad(linen_loss, has_aux=True)(variables["params"])
    tx = optax.sgd(0.1, momentum=0.9)
    want = optax.apply_updates(variables["params"],
                               tx.update(grads, tx.init(variables["params"]))[0])

    opt = nnx.Optimizer(net, tx, wrt=nnx.Param)

    @nnx.jit
    def step(net, opt):
        def loss_fn(net):
            return optax.softmax_cross_entropy_with_integer_labels(net(x, train=True),
                                                                   labels).mean()
        value, g = nnx.value_and_grad(loss_fn)(net)
        opt.update(net, g)
        return value

    assert float(step(net, opt)) == pytest.approx(float(loss), rel=1e-5)
    got = nnx.to_pure_dict(nnx.state(net, nnx.Param))["net"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, want)
    stats = nnx.to_pure_dict(nnx.state(net, nnx.BatchStat))["net"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), stats,
                 new["batch_stats"])
    with pytest.raises(ValueError, match="variables need a 'params' collection"):
        models.to_nnx(model, {"batch_stats": variables["batch_stats"]})


def _tiny_state(dtype: str, **fields):
    from resnet_jax.train.state import create_train_state

    c = config_lib.default_config()
    c.dtype, c.schedule, c.learning_rate = dtype, "constant", 0.05
    for key, value in fields.items():
        c[key] = value
    model = models.create("cifar_resnet", depth=8, width=8, num_classes=10, dtype=dtype)
    return create_train_state(c, model, jax.random.PRNGKey(0), image_shape=(16, 16, 3))


def _batches(n: int):
    r = np.random.default_rng(0)
    return [{"image": r.normal(size=(16, 16, 16, 3)).astype(np.float32),
             "label": r.integers(0, 10, 16).astype(np.int32)} for _ in range(n)]


def test_mixed_precision_trains_like_float32_and_keeps_float32_state():
    from resnet_jax.train.step import train_step

    step = jax.jit(train_step)
    losses, states = {}, {}
    for dtype in ("float32", "bfloat16", "float16"):
        state = _tiny_state(dtype)
        out = []
        for k, batch in enumerate(_batches(6)):
            state, m = step(state, batch, jax.random.PRNGKey(k))
            out.append(float(m["loss"]))
        losses[dtype], states[dtype] = np.array(out), state
        for tree in (state.params, state.batch_stats):  # master weights and BN stats in f32
            assert {x.dtype for x in jax.tree.leaves(tree)} == {np.dtype("float32")}, dtype
    assert losses["float32"][-1] < losses["float32"][0]
    for dtype, bound in (("bfloat16", 0.05), ("float16", 0.01)):
        np.testing.assert_allclose(losses[dtype], losses["float32"], rtol=bound, err_msg=dtype)
        ref = np.concatenate([x.ravel() for x in jax.tree.leaves(states["float32"].params)])
        got = np.concatenate([x.ravel() for x in jax.tree.leaves(states[dtype].params)])
        rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))  # all weights together
        assert rel < bound, (dtype, rel)
    assert optim.current_loss_scale(states["float32"].opt_state) is None
    assert float(optim.current_loss_scale(states["float16"].opt_state)) == 2.0**15


def test_float16_skips_overflowing_steps_and_halves_the_loss_scale():
    from resnet_jax.train.step import train_step

    state = _tiny_state("float16")
    big = optim.LossScaleState(state.opt_state.inner, jnp.float32(1e30), jnp.int32(0))
    state = state.replace(opt_state=big)  # loss * 1e30 overflows float16 in the backward pass
    new, _ = jax.jit(train_step)(state, _batches(1)[0], jax.random.PRNGKey(0))
    jax.tree.map(np.testing.assert_array_equal, new.params, state.params)  # step skipped
    assert float(optim.current_loss_scale(new.opt_state)) == np.float32(5e29)
    tx = optim.dynamic_loss_scale(optax.sgd(1.0), growth_interval=2)
    s = tx.init({"w": jnp.ones(2)})
    for _ in range(2):
        _, s = tx.update({"w": jnp.ones(2)}, s)
    assert float(s.loss_scale) == 2.0**16 and int(s.good_steps) == 0  # grown after 2 good


def test_profile_steps_write_a_trace_into_the_workdir(tmp_path):
    from helpers import override

    from resnet_jax.train.loop import train_and_evaluate

    c = override(config_lib.default_config(), **{
        "model": "cifar_resnet", "model_kwargs.depth": 8, "model_kwargs.width": 4,
        "dataset": "synthetic", "data.num_train": 32, "data.num_eval": 8,
        "data.image_size": 8, "batch_size": 8, "eval_batch_size": 8, "num_train_steps": 4,
        "log_every_steps": 2, "eval_every_steps": 4, "checkpoint_every_steps": 4,
        "profile_steps": "1,3"})
    train_and_evaluate(c, str(tmp_path))
    traces = list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000
    c.profile_steps = "3,1"
    with pytest.raises(ValueError, match="START must be below STOP"):
        config_lib.validate(c)
    c.profile_steps = "ten"
    with pytest.raises(ValueError, match="give START,STOP step indices"):
        config_lib.validate(c)


def test_float16_skip_keeps_the_logged_learning_rate_on_schedule():
    from resnet_jax.train.step import train_step

    state = _tiny_state("float16", schedule="piecewise", lr_boundaries=(1, 2))
    c = config_lib.default_config()
    c.learning_rate, c.lr_boundaries = 0.05, (1, 2)  # _tiny_state's: 0.05, /10 at 1 and 2
    schedule = optim.create_learning_rate_schedule(c)
    step = jax.jit(train_step)
    big = optim.LossScaleState(state.opt_state.inner, jnp.float32(1e30), jnp.int32(0))
    batches = _batches(3)
    new, m = step(state.replace(opt_state=big), batches[0], jax.random.PRNGKey(0))
    jax.tree.map(np.testing.assert_array_equal, new.params, state.params)  # step 0 skipped
    lrs = [float(m["learning_rate"])]
    state = new.replace(opt_state=new.opt_state._replace(loss_scale=jnp.float32(2.0**15)))
    for k in (1, 2):
        state, m = step(state, batches[k], jax.random.PRNGKey(k))
        lrs.append(float(m["learning_rate"]))
    assert lrs == [float(schedule(k)) for k in range(3)]  # was [0.05, 0.05, 0.005]: the count froze
    assert int(state.step) == int(state.opt_state.inner[1].count) == 3


def _ema_state(decay: float, params, stats):
    from resnet_jax.train.state import EMATrainState

    tx = optax.sgd(1.0)  # grads = params - target moves the params to target exactly
    return EMATrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                         opt_state=tx.init(params), apply_fn=None, tx=tx, ema_params=params,
                         ema_batch_stats=stats, ema_decay=decay)


def test_ema_is_debiased_and_keeps_no_weight_on_the_init():
    # The README's SE example: ema_decay=0.999 for 1,000 steps. The params jump from the init
    # (5) to 2 at the first update and stay: the debiased EMA is 2 (the init's weight is 0);
    # the biased one would still hold 0.999**1000 = 37 % of the init (2 + 3 * 0.368).
    init, target = {"w": jnp.full(3, 5.0)}, {"w": jnp.full(3, 2.0)}
    state = _ema_state(0.999, init, {"mean": jnp.full(2, 5.0)})
    grads = lambda s: jax.tree.map(lambda p, t: p - t, s.params, target)
    state = state.apply_gradients(grads(state), batch_stats={"mean": jnp.full(2, 2.0)})
    np.testing.assert_array_equal(state.ema_params["w"], 2.0)  # one update: that value
    np.testing.assert_array_equal(state.ema_batch_stats["mean"], 2.0)

    def body(_, s):
        return s.apply_gradients(grads(s), batch_stats=s.batch_stats)

    state = jax.jit(lambda s: jax.lax.fori_loop(1, 1_000, body, s))(state)
    assert int(state.step) == 1_000
    np.testing.assert_allclose(state.ema_params["w"], 2.0, rtol=1e-6)
    np.testing.assert_allclose(state.ema_batch_stats["mean"], 2.0, rtol=1e-6)


def test_ema_equals_optax_ema_debiased():
    xs = jax.random.normal(jax.random.PRNGKey(0), (40, 3)) * 3.0
    state = _ema_state(0.9, {"w": jnp.full(3, 7.0)}, {})
    ref = optax.ema(0.9, debias=True)
    ref_state = ref.init({"w": jnp.zeros(3)})
    for x in xs:
        state = state.apply_gradients({"w": state.params["w"] - x})
        want, ref_state = ref.update({"w": state.params["w"]}, ref_state)
        np.testing.assert_allclose(state.ema_params["w"], want["w"], rtol=2e-5, atol=1e-6)
