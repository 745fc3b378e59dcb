"""Options beyond the paper (issue 13): each tested, each off in the paper's configs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import models
from resnet_jax.train import config as config_lib
from resnet_jax.train import optim

ROOT = Path(__file__).resolve().parent.parent


def _configs(name: str):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PAPER = {
    "cifar10": ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202",
                "plain20", "plain56", "plain110"],
    "imagenet": ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "plain18",
                 "plain34"],
    "imagenet_studies": None,  # every study
}


def _paper_configs():
    for name, archs in PAPER.items():
        module = _configs(name)
        for arch in archs if archs is not None else list(module.STUDIES):
            yield f"{name}:{arch}", module.get_config(arch)


def test_no_option_beyond_the_paper_is_on_in_the_paper_configs():
    seen = 0
    for where, c in _paper_configs():
        config_lib.validate(c)
        assert c.optimizer == "sgd" and c.momentum == 0.9 and not c.nesterov, where
        assert c.label_smoothing == 0.0 and c.warmup_epochs == 0.0, where
        assert c.ema_decay == 0.0 and c.dtype == "float32" and not c.data.on_device, where
        assert c.get("profile_steps", "") in ("", None), where
        assert not c.model_kwargs.zero_init_last_bn, where
        assert not c.scale_lr_by_batch and c.weight_decay == 1e-4, where
        seen += 1
    assert seen == 9 + 7 + len(_configs("imagenet_studies").STUDIES)


def test_large_batch_config_is_goyal_et_al():
    c = _configs("imagenet").get_config("resnet50_large_batch")
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
