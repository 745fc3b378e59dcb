"""train_step metrics and eval_step sums, masks and multi-view averaging."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from resnet_jax import models
from resnet_jax.train import TrainState, eval_step, optim, train_step
from resnet_jax.train.config import default_config

IMAGE = (8, 8, 3)


@pytest.fixture(scope="module")
def state() -> TrainState:
    """A tiny CIFAR net with random (host-drawn, compile-free) weights."""
    model = models.create("cifar_resnet", depth=8, width=4, num_classes=7)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *IMAGE)), train=False)
    )
    rs = np.random.RandomState(0)

    def draw(path, s):
        if jax.tree_util.keystr(path).endswith("['var']"):
            return jnp.asarray(rs.uniform(0.5, 1.5, s.shape), s.dtype)
        return jnp.asarray(rs.normal(0, 0.5, s.shape), s.dtype)

    variables = jax.tree_util.tree_map_with_path(draw, shapes)
    config: ml_collections.ConfigDict = default_config()
    config.lr_boundaries = (1,)
    tx = optim.create_optimizer(config)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=variables["params"],
        batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
        apply_fn=model.apply, tx=tx,
    )


def _batch(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rs = np.random.RandomState(seed)
    return {"image": rs.randn(n, *IMAGE).astype(np.float32),
            "label": rs.randint(0, 7, n).astype(np.int32)}


def test_train_step_metrics(state: TrainState) -> None:
    batch = _batch(16)
    step = jax.jit(train_step)
    new, m = step(state, batch, jax.random.PRNGKey(0))
    logits, _ = jax.jit(lambda x: state.apply_fn(state.variables, x, train=True,
                                                 mutable=["batch_stats"]))(batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    np.testing.assert_allclose(m["loss"], loss, rtol=1e-5)
    err = np.mean(np.argmax(logits, -1) != batch["label"])
    np.testing.assert_allclose(m["error"], err)
    top5 = np.argsort(-np.asarray(logits), -1)[:, :5]
    np.testing.assert_allclose(m["top5_error"], np.mean(~(top5 == batch["label"][:, None]).any(-1)))
    assert float(m["learning_rate"]) == np.float32(0.1)
    assert int(new.step) == 1
    grads = jax.jit(jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        state.apply_fn({"params": p, "batch_stats": state.batch_stats}, batch["image"],
                       train=True, mutable=["batch_stats"])[0], batch["label"]).mean()))(
        state.params)
    np.testing.assert_allclose(m["grad_norm"], optax.tree.norm(grads), rtol=1e-4)
    # The second step runs past the boundary at 1: the LR metric is the one the update used.
    _, m2 = step(new, batch, jax.random.PRNGKey(1))
    assert float(m2["learning_rate"]) == np.float32(0.01)
    # Label smoothing changes the loss, and only the loss.
    _, ms = jax.jit(lambda s, b, r: train_step(s, b, r, label_smoothing=0.1))(
        state, batch, jax.random.PRNGKey(0))
    assert float(ms["loss"]) != pytest.approx(float(m["loss"]), rel=1e-4)
    assert float(ms["error"]) == float(m["error"])


def test_eval_step_padding_counts_zero(state: TrainState) -> None:
    full = _batch(6, seed=1)
    padded = {k: np.concatenate([v, np.zeros((4, *v.shape[1:]), v.dtype)]) for k, v in
              full.items()}
    padded["mask"] = np.array([1] * 6 + [0] * 4, np.float32)
    evaluate = jax.jit(eval_step)
    a, b = evaluate(state, full), evaluate(state, padded)
    assert float(a["count"]) == 6 and float(b["count"]) == 6
    for k in ("loss_sum", "error_sum", "top5_error_sum"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)
    logits = jax.jit(lambda x: state.apply_fn(state.variables, x, train=False))(full["image"])
    np.testing.assert_allclose(a["error_sum"], np.sum(np.argmax(logits, -1) != full["label"]))


def test_eval_step_averages_probabilities_over_views(state: TrainState) -> None:
    b = _batch(5, seed=2)
    rs = np.random.RandomState(3)
    views = rs.randn(5, 3, *IMAGE).astype(np.float32)  # rank 5: (B, V, H, W, C)
    extra = rs.randn(5, *IMAGE).astype(np.float32)  # a second view group, rank 4
    batch = {"image": views, "image_extra": extra, "label": b["label"],
             "mask": np.ones(5, np.float32)}
    out = jax.jit(eval_step)(state, batch)

    probs = jax.jit(lambda x: jax.nn.softmax(state.apply_fn(state.variables, x, train=False)))
    mean = (sum(probs(views[:, v]) for v in range(3)) + probs(extra)) / 4
    want_err = np.sum(np.argmax(mean, -1) != b["label"])
    want_loss = -np.sum(np.log(mean[np.arange(5), b["label"]]))
    np.testing.assert_allclose(out["error_sum"], want_err)
    np.testing.assert_allclose(out["loss_sum"], want_loss, rtol=1e-5)
    # V identical copies of one image are the single-view result.
    same = {"image": np.repeat(extra[:, None], 4, axis=1), "label": b["label"]}
    single = {"image": extra, "label": b["label"]}
    evaluate = jax.jit(eval_step)
    s1, s2 = evaluate(state, same), evaluate(state, single)
    np.testing.assert_allclose(s1["loss_sum"], s2["loss_sum"], rtol=1e-5)
    with pytest.raises(ValueError, match="rank 4 or 5"):
        eval_step(state, {"image": extra[0], "label": b["label"]})


def test_ema_state_averages_params_and_batch_stats_inside_the_step(state: TrainState) -> None:
    from resnet_jax.train import EMATrainState

    ema = EMATrainState(**{f: getattr(state, f) for f in
                           ("step", "params", "batch_stats", "opt_state", "apply_fn", "tx")},
                        ema_params=state.params, ema_batch_stats=state.batch_stats,
                        ema_decay=0.75)
    step = jax.jit(train_step)
    raw, _ = step(state, _batch(8), jax.random.PRNGKey(0))
    new, _ = step(ema, _batch(8), jax.random.PRNGKey(0))
    assert isinstance(new, EMATrainState)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    jax.tree.map(close, new.params, raw.params)  # the update itself is unchanged
    # Debiased (as optax.ema): after the first update the average is that update's values, with
    # no weight on the init; after the second, 3/7 of the first and 4/7 of the second
    # (weights (1 - d) d^(k-i) / (1 - d^k) with d = 0.75).
    assert int(state.step) == 0
    jax.tree.map(close, new.ema_params, raw.params)
    jax.tree.map(close, new.ema_batch_stats, raw.batch_stats)
    raw2, _ = step(raw, _batch(8), jax.random.PRNGKey(1))
    new2, _ = step(new, _batch(8), jax.random.PRNGKey(1))
    jax.tree.map(lambda e, p1, p2: close(e, 3 / 7 * p1 + 4 / 7 * p2),
                 new2.ema_params, raw.params, raw2.params)
    jax.tree.map(lambda e, s1, s2: close(e, 3 / 7 * s1 + 4 / 7 * s2),
                 new2.ema_batch_stats, raw.batch_stats, raw2.batch_stats)
