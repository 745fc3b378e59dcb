"""Evaluation in one place: the eval pass of the loop, ``--mode eval`` and ``resnet_jax.load``.

:func:`evaluate` runs the whole eval split (padding counts zero) and, for a state with an EMA of
the weights (``EMATrainState``), the same split with the average (``ema_test_*``).
:func:`load` rebuilds a checkpoint's model from the config saved with it (blocks, stems and heads
named by import path are imported again), reads only its variables, and gives the
:class:`Preprocessing` recorded with it (the training mean, the recipe), so feeding the model
needs no dataset.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from resnet_jax import checkpoint, data, parallel
from resnet_jax.data import augment
from resnet_jax.errors import CheckpointMismatch, CheckpointNotFound, ConfigError, DataError
from resnet_jax.train import config as config_lib
from resnet_jax.train import workdir as workdir_lib
from resnet_jax.train.preprocess import make_preprocess, preprocess
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
    in_flight = parallel.InFlight(parallel.steps_in_flight(config.get("steps_in_flight", -1)))
    outputs = []
    try:
        for batch in stream:  # dispatched (at most steps_in_flight unfinished); fetched below
            in_flight.wait()
            outputs.append(eval_fn(state, batch))
            in_flight.add(outputs[-1])
    finally:
        stream.close()
    sums: dict[str, float] = {}
    for out in eval_fn.fetch(outputs):
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    count = sums["count"]
    if count <= 0:
        raise DataError(f"the eval split of {config.dataset!r} is empty.")
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


def _check_has_checkpoints(workdir: str) -> str:
    directory = checkpoint.checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise CheckpointNotFound(f"no checkpoints in {workdir} (expected {directory}).")
    return directory


def _restore_variables(workdir: str, step: int | None, model_for: Any, *, ema: str
                       ) -> tuple[nn.Module, dict[str, Any], int]:
    """(model, arrays, step); ``ema``: "no" (raw), "yes" (the average, else an error) or
    "also" (both when saved)."""
    directory = _check_has_checkpoints(workdir)
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


@dataclasses.dataclass(frozen=True, eq=False)
class Preprocessing:
    """How the eval pipeline's uint8 images become the model's input, as the checkpoint records
    it (``meta["model"]["preprocess"]``): ``model.apply(variables, pre(images), train=False)``.

    ``pre(images)`` is the device half of the recipe, the function the eval step applies:
    ``(pixels - mean) / scale`` on ``(B, size, size, channels)`` uint8. ``pre.prepare(image)``
    is the host half for one raw image: the cifar recipe (§4.2) takes the stored image as it is;
    the imagenet one (§3.4, "center" protocol) resizes the shorter side to ``eval_resize`` and
    takes the centre ``size`` crop.
    """

    kind: str  # "cifar" (§4.2) or "imagenet" (§3.4)
    mean: np.ndarray  # float32, 0..255: per pixel (H, W, C) (§4.2) or per channel (C,) (§3.4)
    scale: float  # pixels are divided by it after the mean is subtracted (255)
    pad: int  # §4.2: zero padding of the training crop (training only; recorded for forks)
    size: int  # the model's input side
    channels: int
    eval_resize: int  # imagenet recipe: shorter side before the centre crop
    eval_protocol: str

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> Preprocessing:
        """The recipe ``config``'s batches are made with (opens the dataset for the mean)."""
        r = data.recipe(config)
        return cls(kind=r.kind, mean=np.asarray(r.mean, np.float32), scale=augment.PIXEL_SCALE,
                   pad=int(r.pad), size=int(r.size), channels=int(r.channels),
                   eval_resize=int(r.eval_resize), eval_protocol=str(r.eval_protocol))

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Preprocessing:
        """The inverse of :meth:`to_json`."""
        if float(record["scale"]) != augment.PIXEL_SCALE:
            raise ConfigError(f"the checkpoint's preprocessing divides by {record['scale']}, this "
                              f"code by {augment.PIXEL_SCALE}; load it with the version that "
                              "wrote it.")
        fields = {f.name: record[f.name] for f in dataclasses.fields(cls)}
        return cls(**{**fields, "mean": np.asarray(record["mean"], np.float32)})

    def to_json(self) -> dict[str, Any]:
        """A JSON record (the mean exactly: float32 values round-trip through Python floats)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["mean"] = self.mean.tolist()
        out["mean_kind"] = "per_pixel" if self.mean.ndim == 3 else "per_channel"
        return out

    def __call__(self, images: np.ndarray | jax.Array) -> jax.Array:
        """``(B, size, size, channels)`` uint8 -> the model's float32 input (the eval step's
        ``preprocess``; already-float images are returned as they are)."""
        return preprocess({"image": images}, mean=self.mean)["image"]

    def prepare(self, image: np.ndarray | bytes) -> np.ndarray:
        """One raw image (uint8 (H, W, C) or encoded bytes) -> the eval pipeline's uint8
        ``(size, size, channels)`` image for the "center" protocol."""
        if self.kind == "imagenet":
            return augment.center_crop(image, self.eval_resize, self.size,
                                       channels=self.channels)
        x = augment.decode(image, self.channels) if isinstance(image, bytes) else image
        x = np.asarray(x)
        if x.shape != (self.size, self.size, self.channels):
            raise ConfigError(f"image of shape {x.shape}: the cifar recipe (§4.2) feeds the stored "
                              f"{self.size}x{self.size}x{self.channels} image as it is; resize it "
                              "the way the training images were made.")
        return x


def _preprocessing(meta: Mapping[str, Any], where: str,
                   data_overrides: Mapping[str, Any] | None = None) -> Preprocessing:
    """The checkpoint's record, or, for one saved before checkpoints carried it, the recipe
    recomputed from its dataset (``data_overrides``: ``config.data`` fields, where it is now)."""
    record = meta["model"].get("preprocess")
    if record is not None:
        return Preprocessing.from_json(record)
    config = ml_collections.ConfigDict(meta["config"])
    for key, value in (data_overrides or {}).items():
        config.data[key] = value
    try:
        return Preprocessing.from_config(config)
    except (DataError, ConfigError, OSError) as e:
        raise ConfigError(
            f"{where} predates checkpoints that record their preprocessing, and the training "
            f"mean cannot be recomputed from {config.dataset!r} ({' '.join(str(e).split())}); "
            "point to the data (export: --archive or --data_dir; load: data_overrides="
            "{'archive': ...}) or retrain."
        ) from e


class Run(NamedTuple):
    """A checkpoint read back: the rebuilt model, its variables, the run config, the step and
    its preprocessing."""

    model: nn.Module
    variables: dict[str, Any]
    config: ml_collections.ConfigDict
    step: int
    preprocess: Preprocessing
    num_classes: int


def _read(workdir: str, step: int | None, ema: bool
          ) -> tuple[nn.Module, dict[str, Any], dict[str, Any], int, str]:
    saved: dict[str, Any] = {}

    def model_for(meta: dict[str, Any], where: str) -> nn.Module:
        saved["meta"], saved["where"] = meta, where
        return _model_from_meta(meta, where)

    model, arrays, s = _restore_variables(workdir, step, model_for, ema="yes" if ema else "no")
    names = EMA_VARIABLES if ema else VARIABLES
    variables = {k: jax.tree.map(jax.numpy.asarray, arrays[n])
                 for k, n in zip(VARIABLES, names, strict=True)}
    return model, variables, saved["meta"], int(s), saved["where"]


def load_run(workdir: str, step: int | None = None, *, ema: bool = False,
             data_overrides: Mapping[str, Any] | None = None) -> Run:
    """:func:`load` plus the config the run was trained with and the checkpoint's step;
    ``data_overrides``: see :func:`load`."""
    model, variables, meta, s, where = _read(workdir, step, ema)
    return Run(model, variables, ml_collections.ConfigDict(meta["config"]), s,
               _preprocessing(meta, where, data_overrides), int(meta["model"]["num_classes"]))


class Loaded(tuple):
    """What :func:`load` returns: unpacks as ``(model, variables)``; ``.preprocess`` (a
    :class:`Preprocessing`) makes the model's input, ``.config`` and ``.step`` say what was
    loaded."""

    def __new__(cls, model: nn.Module, variables: dict[str, Any], *,
                config: ml_collections.ConfigDict, step: int,
                preprocess: Callable[[], Preprocessing]) -> Loaded:
        self = super().__new__(cls, (model, variables))
        self.config, self.step, self._preprocess = config, step, preprocess
        return self

    @property
    def model(self) -> nn.Module:
        """The rebuilt network."""
        return self[0]

    @property
    def variables(self) -> dict[str, Any]:
        """``{"params", "batch_stats"}``."""
        return self[1]

    @functools.cached_property
    def preprocess(self) -> Preprocessing:
        """The checkpoint's preprocessing (an old checkpoint's is recomputed from its dataset on
        first use: a ``ConfigError`` naming the fix where that is gone)."""
        return self._preprocess()


def load(workdir: str, step: int | None = None, *, ema: bool = False,
         data_overrides: Mapping[str, Any] | None = None) -> Loaded:
    """``(model, {"params", "batch_stats"})`` of the newest readable checkpoint (or ``step``),
    with ``.preprocess``: ``model.apply(variables, loaded.preprocess(images), train=False)``
    gives logits for the eval pipeline's uint8 images (``loaded.preprocess.prepare(image)`` makes
    one from a raw image). No dataset is opened.

    The model is rebuilt from the config saved in the checkpoint; XLA's convolution
    (``model.clone(conv_impl="onednn")`` for oneDNN's). ``ema``: the moving average of a run
    with ``ema_decay > 0``. A damaged newest checkpoint is skipped with a warning.
    ``data_overrides`` (``config.data`` fields, e.g. ``{"archive": path}``) only serve a
    checkpoint written before the preprocessing was recorded in it, whose mean is recomputed
    from the data.
    """
    model, variables, meta, s, where = _read(workdir, step, ema)
    return Loaded(model, variables, config=ml_collections.ConfigDict(meta["config"]), step=s,
                  preprocess=functools.partial(_preprocessing, meta, where, data_overrides))


@workdir_lib.scoped  # the workdir lock is released when the evaluation ends


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
    parallel.set_cpu_devices(config.cpu_devices)  # as training does
    parallel.initialize_distributed(config)
    _check_has_checkpoints(workdir)  # a missing workdir is not created by the lock
    workdir_lib.lock(workdir)  # one run per workdir (errors.WorkdirBusy), before any file
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
    _log(f"checkpoint {s} of {config.model} on {config.dataset} ({protocol}, "
         f"{jax.device_count()} {jax.devices()[0].platform} device(s)): {describe(results)}")
    if jax.process_index() == 0:
        record = {"step": s, "dataset": config.dataset, "eval_protocol": protocol, **results}
        with open(os.path.join(workdir, "eval.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
    return {"step": s, **results}
