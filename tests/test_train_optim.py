"""The paper's LR schedules at every boundary, and the weight-decay mask."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

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
