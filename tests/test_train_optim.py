"""The paper's LR schedules at every boundary, and the weight-decay mask."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import config_module

from resnet_jax import models
from resnet_jax.train import optim

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _config(name: str, arch: str):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arch)


def _lrs(schedule, steps):
    return [np.float32(schedule(s)) for s in steps]


def test_cifar_schedule_boundaries() -> None:
    # §4.2: 0.1, /10 at 32k and 48k iterations.
    s = optim.create_learning_rate_schedule(_config("cifar10", "resnet56"))
    steps = [0, 31_999, 32_000, 47_999, 48_000, 63_999]
    want = [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    assert _lrs(s, steps) == [np.float32(w) for w in want]


def test_resnet110_warmup_then_cifar_schedule() -> None:
    # §4.2: 0.01 for the first ~400 iterations, then back to 0.1.
    c = _config("cifar10", "resnet110")
    assert c.warmup_steps == 400 and _config("cifar10", "resnet56").warmup_steps == 0
    s = optim.create_learning_rate_schedule(c)
    steps = [0, 399, 400, 31_999, 32_000, 47_999, 48_000]
    want = [0.01, 0.01, 0.1, 0.1, 0.01, 0.01, 0.001]
    assert _lrs(s, steps) == [np.float32(w) for w in want]
    c.warmup_steps = 100
    assert _lrs(optim.create_learning_rate_schedule(c), [99, 100]) == [
        np.float32(0.01), np.float32(0.1)]


def test_imagenet_epoch_boundaries_in_steps() -> None:
    c = _config("imagenet", "resnet50")
    steps_per_epoch = 1_281_167 / 256
    b30, b60 = round(30 * steps_per_epoch), round(60 * steps_per_epoch)
    assert optim.boundaries_in_steps(c, steps_per_epoch) == (b30, b60)
    s = optim.create_learning_rate_schedule(c, steps_per_epoch)
    want = [0.1, 0.1, 0.01, 0.01, 0.001]
    assert _lrs(s, [0, b30 - 1, b30, b60 - 1, b60]) == [np.float32(w) for w in want]
    with pytest.raises(ValueError, match="steps_per_epoch"):
        optim.create_learning_rate_schedule(c)


def test_linear_warmup_cosine_and_batch_scaling() -> None:
    c = _config("cifar10", "resnet20")
    c.schedule, c.warmup_type, c.warmup_lr, c.warmup_steps = "cosine", "linear", 0.0, 100
    c.num_train_steps, c.batch_size, c.scale_lr_by_batch = 1_100, 512, True
    s = optim.create_learning_rate_schedule(c)
    peak = 0.1 * 512 / 256
    np.testing.assert_allclose(_lrs(s, [0, 50, 100, 600, 1_100]),
                               [0.0, peak / 2, peak, peak / 2, 0.0], rtol=1e-6, atol=1e-7)


def test_optimizer_uses_the_schedule() -> None:
    # momentum 0, no decay, grad 1: each update moves the parameter by exactly -lr.
    c = _config("cifar10", "resnet110")
    c.momentum, c.weight_decay, c.warmup_steps, c.lr_boundaries = 0.0, 0.0, 2, (3,)
    tx = optim.create_optimizer(c)
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    moves, lrs = [], []
    for _ in range(4):
        updates, state = tx.update({"w": jnp.ones(())}, state, params)
        moves.append(float(updates["w"]))
        lrs.append(float(optim.current_learning_rate(state)))
    np.testing.assert_allclose(moves, [-0.01, -0.01, -0.1, -0.01], rtol=1e-6)
    np.testing.assert_allclose(lrs, [0.01, 0.01, 0.1, 0.01], rtol=1e-6)


@pytest.mark.parametrize("which", ["kernels", "all"])
def test_weight_decay_mask(which: str) -> None:
    model = models.create("resnet20", width=4, shortcut="B")  # B adds projection convs + BN
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), train=False)
    )["params"]
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes)
    mask = optim.weight_decay_mask(params, which)
    paths = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
    kernels = {p for p in paths if p.endswith("['kernel']")}
    assert any("shortcut" in p or "proj" in p for p in kernels), sorted(kernels)
    assert "['fc']['kernel']" in kernels and "['fc']['bias']" in paths
    expected = set(paths) if which == "all" else kernels
    assert {p for p, m in paths.items() if m} == expected

    # Through the optimiser: lr 1, momentum 0, zero gradient -> update = -wd * w where masked.
    c = _config("cifar10", "resnet20")
    c.momentum, c.learning_rate, c.weight_decay, c.weight_decay_mask = 0.0, 1.0, 0.5, which
    tx = optim.create_optimizer(c)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    flat = {jax.tree_util.keystr(p): u for p, u in jax.tree_util.tree_leaves_with_path(updates)}
    for p, u in flat.items():
        np.testing.assert_array_equal(u, -0.5 if p in expected else 0.0, err_msg=p)


def test_sgd_is_optax_momentum() -> None:
    c = _config("cifar10", "resnet20")
    c.weight_decay, c.nesterov = 0.0, True
    params = {"w": jnp.arange(3.0)}
    grads = {"w": jnp.array([0.5, -1.0, 2.0])}
    ours, ref = optim.create_optimizer(c), optax.sgd(0.1, momentum=0.9, nesterov=True)
    s1, s2 = ours.init(params), ref.init(params)
    for _ in range(3):
        u1, s1 = ours.update(grads, s1, params)
        u2, s2 = ref.update(grads, s2, params)
        np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-6)


def test_every_schedule_runs_over_the_loops_total_steps() -> None:
    from resnet_jax.train.loop import num_train_steps

    # ImageNet counts epochs: the loop's length and cosine's horizon are one number.
    c = _config("imagenet", "resnet50")
    n, spe = 1_281_167, 1_281_167 / 256
    total = round(90 * spe)
    assert num_train_steps(c, n) == optim.total_steps(c, spe) == total == 450_410
    c.schedule = "cosine"
    s = optim.create_learning_rate_schedule(c, spe)
    assert float(s(0)) == pytest.approx(0.1)
    assert float(s(total // 2)) == pytest.approx(0.05, rel=1e-4)
    assert float(s(total - 1)) < 1e-9 and float(s(total)) == 0.0
    c.num_epochs = 120.0  # the paper's ~120 epochs: the decay stretches with the run
    assert float(optim.create_learning_rate_schedule(c, spe)(total)) == pytest.approx(
        0.05 * (1 + np.cos(np.pi * 90 / 120)), rel=1e-4)
    # Goyal's large batch with cosine: linear warm-up over 5 epochs, then down to ~0 at the end.
    g = _config("imagenet", "resnet50_large_batch")
    g.schedule = "cosine"
    spe = 1_281_167 / 8192
    total, warm = optim.total_steps(g, spe), optim.warmup_steps(g, spe)
    assert (total, warm) == (round(90 * spe), round(5 * spe))
    s = optim.create_learning_rate_schedule(g, spe)
    half = warm + (total - warm) // 2
    np.testing.assert_allclose(
        _lrs(s, [0, warm, half]),
        [0.1, 3.2, 1.6 * (1 + np.cos(np.pi * (half - warm) / (total - warm)))], rtol=1e-5)
    assert float(s(total - 1)) < 0.01 * 3.2  # was 3.2: the horizon was num_train_steps


def test_run_length_is_given_in_one_unit() -> None:
    from resnet_jax.errors import ConfigError
    from resnet_jax.train import config as config_lib

    c = _config("imagenet", "resnet50")
    assert (c.num_epochs, c.num_train_steps) == (90.0, -1)
    c.num_train_steps = 2  # set in code: both set -> refused, naming both and the fix
    with pytest.raises(ConfigError, match=r"num_train_steps=2 and num_epochs=90 both set .* "
                       r"--config.num_epochs=-1 to run 2 steps"):
        config_lib.validate(c)
    # On the command line the given unit wins: a 2-step smoke run is 2 steps, not 450k.
    assert config_lib.length_from_overrides(c, {"num_train_steps": 2}) != ""
    assert (c.num_epochs, optim.total_steps(c, 1_281_167 / 256)) == (-1.0, 2)
    config_lib.validate(c)
    d = config_module("digits").get_config()
    d.num_epochs = 3.0
    config_lib.length_from_overrides(d, {"num_epochs": 3.0, "schedule": "cosine"})
    assert (d.num_train_steps, optim.total_steps(d, 1437 / 32)) == (-1, 135)
    e = config_module("digits").get_config()
    e.num_epochs = 3.0  # both given on the command line: still refused
    assert config_lib.length_from_overrides(e, {"num_epochs": 3.0, "num_train_steps": 1000}) == ""
    with pytest.raises(ConfigError, match="both set the run's length"):
        config_lib.validate(e)
    e.num_train_steps, e.num_epochs = -1, -1.0
    with pytest.raises(ConfigError, match="set one of them > 0"):
        config_lib.validate(e)


def test_float16_skip_keeps_the_schedule_on_the_step() -> None:
    # Schedule lr(k) = k; momentum 0.5. Update 0 overflows and is skipped: the LR of update k
    # is still lr(k), the momentum trace is untouched by the skip.
    sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=lambda k: k.astype(jnp.float32),
                                             momentum=0.5)
    tx = optim.dynamic_loss_scale(sgd)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    lrs, moves = [], []
    for g in (jnp.inf, 1.0, 1.0):
        updates, state = tx.update({"w": jnp.full(2, g)}, state, params)
        lrs.append(float(optim.current_learning_rate(state)))
        moves.append(float(updates["w"][0]))
    assert lrs == [0.0, 1.0, 2.0]  # the count advanced through the skip
    assert int(state.inner.count) == 3
    # trace: skip keeps 0; then 1; then 0.5 * 1 + 1 = 1.5 -> updates -lr * trace
    assert moves == [0.0, -1.0, -3.0]
    assert float(state.loss_scale) == 2.0**14
