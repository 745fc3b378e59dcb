"""Evaluation in one place: the eval pass of the loop, ``--mode eval`` and ``resnet_jax.load``.

:func:`evaluate` runs the whole eval split (padding counts zero) and, for a state with an EMA of
the weights (``EMATrainState``), the same split with the average (``ema_test_*``).
:func:`load` rebuilds a checkpoint's model from the config saved with it (blocks, stems and heads
named by import path are imported again) and reads only its variables.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from resnet_jax import checkpoint, data, parallel
from resnet_jax.errors import CheckpointMismatch, CheckpointNotFound
from resnet_jax.train import config as config_lib
from resnet_jax.train.preprocess import make_preprocess
from resnet_jax.train.state import EMATrainState, TrainState
from resnet_jax.train.step import eval_step

VARIABLES = ("params", "batch_stats")
EMA_VARIABLES = ("ema_params", "ema_batch_stats")


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def compile_eval(config: ml_collections.ConfigDict) -> parallel.ParallelStep:
    """``eval_step`` with ``config``'s preprocess, for ``config.parallel``."""
    step = functools.partial(eval_step, preprocess=make_preprocess(config))
    return parallel.compile(step, config.parallel, donate_state=False)


def _evaluate_once(eval_fn: parallel.ParallelStep, state: Any,
                   config: ml_collections.ConfigDict) -> dict[str, float]:
    stream = data.create(
        config, "eval", process_index=jax.process_index(),
        process_count=jax.process_count(), seed=config.seed,
    )
    try:
        outputs = [eval_fn(state, batch) for batch in stream]  # dispatched; fetched once below
    finally:
        stream.close()
    sums: dict[str, float] = {}
    for out in eval_fn.fetch(outputs):
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    count = sums["count"]
    if count <= 0:
        raise ValueError(f"the eval split of {config.dataset!r} is empty.")
    return {
        "test_loss": sums["loss_sum"] / count,
        "test_error": sums["error_sum"] / count,
        "test_top5_error": sums["top5_error_sum"] / count,
    }


def evaluate(eval_fn: parallel.ParallelStep, state: Any,
             config: ml_collections.ConfigDict) -> dict[str, float]:
    """The whole eval split: test_loss, test_error, test_top5_error (padding counts zero); with
    an EMA in ``state`` also ema_test_loss, ema_test_error, ema_test_top5_error."""
    results = _evaluate_once(eval_fn, state, config)
    if isinstance(state, EMATrainState):
        averaged = state.replace(params=state.ema_params, batch_stats=state.ema_batch_stats)
        results.update({f"ema_{k}": v
                        for k, v in _evaluate_once(eval_fn, averaged, config).items()})
    return results


def describe(results: dict[str, float]) -> str:
    """``test error 8.75% (top-5 0.31%), loss 0.3012[; EMA 8.10% ...]``."""
    text = (f"test error {100 * results['test_error']:.2f}% "
            f"(top-5 {100 * results['test_top5_error']:.2f}%), loss {results['test_loss']:.4f}")
    if "ema_test_error" in results:
        text += (f"; EMA: {100 * results['ema_test_error']:.2f}% "
                 f"(top-5 {100 * results['ema_test_top5_error']:.2f}%), "
                 f"loss {results['ema_test_loss']:.4f}")
    return text


def _variables_template(model: nn.Module, image_shape: Sequence[int],
                        names: Sequence[str] = VARIABLES) -> dict[str, Any]:
    x = jax.ShapeDtypeStruct((1, *image_shape), np.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
    return {name: shapes.get(kind, {}) for name, kind in zip(names, VARIABLES, strict=True)}


def _has(meta: dict[str, Any], field: str) -> bool:
    return any(p.split("/")[0] == field for p in meta["arrays"])


def _restore_variables(workdir: str, step: int | None, model_for: Any, *, ema: str
                       ) -> tuple[nn.Module, dict[str, Any], int]:
    """(model, arrays, step); ``ema``: "no" (raw), "yes" (the average, else an error) or
    "also" (both when saved)."""
    directory = checkpoint.checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise CheckpointNotFound(f"no checkpoints in {workdir} (expected {directory}).")
    built: dict[str, nn.Module] = {}

    def prepare(meta: dict[str, Any], where: str) -> dict[str, Any]:
        model = built["model"] = model_for(meta, where)
        shape = meta["model"]["image_shape"]
        if ema == "yes" and not _has(meta, EMA_VARIABLES[0]):
            raise CheckpointMismatch(f"{where} has no EMA of the weights (trained with "
                                     "ema_decay=0); load it without ema=True.")
        template = {} if ema == "yes" else _variables_template(model, shape)
        if ema != "no" and _has(meta, EMA_VARIABLES[0]):
            template.update(_variables_template(model, shape, EMA_VARIABLES))
        return template

    store = checkpoint.CheckpointStore(directory, read_only=True)
    try:
        s, arrays, _ = store.restore(prepare, step=step, move_damaged=False)
    finally:
        store.close()
    return built["model"], arrays, s


def _model_from_meta(meta: dict[str, Any], where: str) -> nn.Module:
    """The checkpoint's network with XLA's convolution, whichever ``conv`` trained it (the same
    function; it loads without the [onednn] extra and exports portably)."""
    del where
    config = ml_collections.ConfigDict(meta["config"])
    if "conv" in config:
        config.conv = "xla"
    return config_lib.build_model(config, int(meta["model"]["num_classes"]))


class Run(NamedTuple):
    """A checkpoint read back: the rebuilt model, its variables, the run config and the step."""

    model: nn.Module
    variables: dict[str, Any]
    config: ml_collections.ConfigDict
    step: int


def load_run(workdir: str, step: int | None = None, *, ema: bool = False) -> Run:
    """:func:`load` plus the config the run was trained with and the checkpoint's step."""
    saved: dict[str, Any] = {}

    def model_for(meta: dict[str, Any], where: str) -> nn.Module:
        saved["config"] = meta["config"]
        return _model_from_meta(meta, where)

    model, arrays, s = _restore_variables(workdir, step, model_for, ema="yes" if ema else "no")
    names = EMA_VARIABLES if ema else VARIABLES
    variables = {k: jax.tree.map(jax.numpy.asarray, arrays[n])
                 for k, n in zip(VARIABLES, names, strict=True)}
    return Run(model, variables, ml_collections.ConfigDict(saved["config"]), int(s))


def load(workdir: str, step: int | None = None, *, ema: bool = False
         ) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, {"params", "batch_stats"})`` of the newest readable checkpoint (or ``step``).

    The model is rebuilt from the config saved in the checkpoint; ``model.apply(variables, x,
    train=False)`` gives logits (XLA's convolution: ``model.clone(conv_impl="onednn")`` for
    oneDNN's). ``ema``: the moving average of a run with ``ema_decay > 0``. A damaged newest
    checkpoint is skipped with a warning.
    """
    run = load_run(workdir, step, ema=ema)
    return run.model, run.variables


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        step: int | None = None) -> dict[str, float]:
    """``--mode eval``: a checkpoint of ``workdir`` on ``config``'s test protocol and eval data.

    The checkpoint must hold ``config``'s model (else ``CheckpointMismatch``). Prints the
    errors (raw and, when saved, EMA) and appends ``{"step", "dataset", "eval_protocol",
    "test_*"}`` to ``workdir/eval.jsonl`` (process 0). Returns the test scalars and ``"step"``.
    """
    if config.get("keep_freed_memory", True):
        parallel.keep_freed_memory()  # before JAX's CPU client exists
    config_lib.validate(config)
    parallel.initialize_distributed(config)
    parallel.check_batch_size(config.eval_batch_size, "eval_batch_size")
    info = data.info(config)
    model = config_lib.build_model(config, info.num_classes)
    wanted = config_lib.to_json(config)

    def model_for(meta: dict[str, Any], where: str) -> nn.Module:
        config_lib.check_same_model(meta["config"], wanted, where)
        if int(meta["model"]["num_classes"]) != info.num_classes:
            raise CheckpointMismatch(
                f"{where} has {meta['model']['num_classes']} classes but {config.dataset!r} has "
                f"{info.num_classes}; evaluate it on the dataset it was trained on."
            )
        return model

    _, arrays, s = _restore_variables(workdir, step, model_for, ema="also")
    fields = dict(step=np.int32(s), params=arrays["params"], batch_stats=arrays["batch_stats"],
                  opt_state=(), apply_fn=model.apply, tx=optax.identity())
    state: TrainState = TrainState(**fields)
    if EMA_VARIABLES[0] in arrays:
        state = EMATrainState(**fields, ema_params=arrays["ema_params"],
                              ema_batch_stats=arrays["ema_batch_stats"])
    eval_fn = compile_eval(config)
    results = evaluate(eval_fn, eval_fn.replicate(state), config)
    protocol = config.data.eval_protocol
    _log(f"checkpoint {s} of {config.model} on {config.dataset} ({protocol}): "
         f"{describe(results)}")
    if jax.process_index() == 0:
        record = {"step": s, "dataset": config.dataset, "eval_protocol": protocol, **results}
        with open(os.path.join(workdir, "eval.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
    return {"step": s, **results}
