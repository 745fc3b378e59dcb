"""``train_and_evaluate(config, workdir)``: the training loop.

The state is born on the devices (``ParallelStep.init``: jit with replicated out_shardings) or
restored straight into those shardings. Per step: the next host-local uint8 batch, already
sharded on the mesh ``device_prefetch`` steps ahead (with ``data.on_device`` the training
images live on the devices and the batch is gathered there) -> ``ParallelStep`` (jit or pmap;
the loop does not know which) with ``rng = fold_in(base_rng, step)`` derived on the host's CPU
device; the step starts with the device half of the input recipe (``preprocess``). Every
transfer is explicit, so the loop runs under ``jax.transfer_guard("disallow")``. Device metrics
are only fetched at log steps, so the host never waits on the device in between. The data
stream is a pure function of (seed, step) and the rng of the step index, so resuming from a
saved (state, step) continues bit-exactly. A data error (a damaged shard, input workers that
keep dying) saves the last completed step before it is raised.
"""

from __future__ import annotations

import functools
import itertools
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from resnet_jax import data, parallel
from resnet_jax.errors import DataError
from resnet_jax.train import config as config_lib
from resnet_jax.train import metrics as metrics_lib
from resnet_jax.train import optim
from resnet_jax.train import preprocess as preprocess_lib
from resnet_jax.train import workdir as workdir_lib
from resnet_jax.train.config import build_model
from resnet_jax.train.evaluate import compile_eval, describe, evaluate
from resnet_jax.train.policy import TrainingCheckpoints
from resnet_jax.train.preprocess import make_preprocess
from resnet_jax.train.state import create_train_state
from resnet_jax.train.step import train_step

__all__ = ["build_model", "compile_eval", "device_gather", "evaluate", "make_preprocess",
           "num_train_steps", "train_and_evaluate"]


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def num_train_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
    """``num_train_steps``, or ``num_epochs`` worth of global batches when that is > 0
    (``optim.total_steps``: the same count every schedule is defined over)."""
    return optim.total_steps(config, num_train_examples / config.batch_size)


def device_gather(config: ml_collections.ConfigDict) -> Callable[[Any], Any] | None:
    """``data.on_device``: places the uint8 training images on every device once and returns
    ``batch -> batch`` that turns a host batch of indices into one of images there (sharded
    like any batch, ready for the step); None when the option is off."""
    if not config.data.on_device:
        return None
    gather_fn = parallel.compile(preprocess_lib.gather, config.parallel, donate_state=False,
                                 per_example=True)
    return functools.partial(gather_fn, gather_fn.replicate(data.device_table(config)))


@workdir_lib.scoped  # the workdir lock is released when the run ends
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train ``num_train_steps``, evaluating every ``eval_every_steps`` and at the end.

    Writes ``workdir/metrics.jsonl``, TensorBoard events and ``workdir/curves.png`` (process 0).
    Config errors are raised as one-line ConfigErrors before anything is compiled. Returns the
    last logged training and test scalars.
    """
    if config.get("keep_freed_memory", True):
        parallel.keep_freed_memory()  # before JAX's CPU client exists
    config_lib.validate(config)
    parallel.set_cpu_devices(config.cpu_devices)
    parallel.initialize_distributed(config)
    parallel.check_batch_size(config.batch_size, "batch_size")
    parallel.check_batch_size(config.eval_batch_size, "eval_batch_size")
    info = data.info(config)
    model = build_model(config, info.num_classes)
    # One run per workdir (errors.WorkdirBusy): once the config is known good, before any file.
    workdir_lib.lock(workdir)
    steps_per_epoch = info.num_train / config.batch_size
    total_steps = optim.total_steps(config, steps_per_epoch)  # the schedules' count too
    is_main = jax.process_index() == 0

    # Seeds on the host's CPU device, under jit (an eager op would be an implicit transfer).
    # Per-step keys are derived there too: a fold_in on the accelerator would queue behind the
    # previous step, and placing its result (jit) would make the host wait for it.
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    init_rng, base_rng = jax.jit(lambda: tuple(jax.random.split(jax.random.PRNGKey(config.seed))),
                                 out_shardings=cpu)()

    train_fn = parallel.compile(
        functools.partial(train_step, label_smoothing=float(config.label_smoothing),
                          preprocess=make_preprocess(config)),
        config.parallel,
        bn_sync=config.bn_sync,
    )
    eval_fn = compile_eval(config)

    def init(rng: jax.Array) -> Any:
        return create_train_state(config, model, rng, image_shape=info.image_shape,
                                  steps_per_epoch=steps_per_epoch)

    ckpt = TrainingCheckpoints(
        workdir, config, num_classes=info.num_classes, image_shape=info.image_shape,
        steps_per_epoch=steps_per_epoch,
    )
    # The state is born on the mesh (jit with replicated out_shardings), or restored straight
    # into those shardings: never built on one device and copied.
    if ckpt.latest_step is None:
        state, start_step, base_rng = ckpt.restore(train_fn.init(init, init_rng), base_rng)
    else:  # shapes and shardings only: nothing is initialised that the checkpoint replaces
        state, start_step, base_rng = ckpt.restore(train_fn.abstract(init, init_rng), base_rng)
    host_rng = jax.device_put(base_rng, cpu)
    step_key = jax.jit(jax.random.fold_in, out_shardings=cpu)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    _log(
        f"{config.model} ({n_params:,} params) on {config.dataset} "
        f"({info.num_train} train / {info.num_eval} eval, {info.image_shape}); "
        f"{total_steps} steps of batch {config.batch_size}; parallel={config.parallel} over "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{jax.process_count()} process(es)"
    )
    gather = device_gather(config)

    writer = metrics_lib.MetricWriter(workdir, enabled=is_main, append=start_step > 0,
                                      purge_step=start_step + 1 if start_step > 0 else None)
    stream = data.create(
        config, "train", process_index=jax.process_index(),
        process_count=jax.process_count(), seed=config.seed, start_step=start_step,
    )
    # Sharded on the mesh (and gathered there with data.on_device) device_prefetch steps ahead.
    batches = train_fn.prefetch(itertools.islice(stream, total_steps - start_step),
                                int(config.get("device_prefetch", 2)), gather)
    pending: list[Any] = []
    # XLA:CPU allocates a step's temporaries at dispatch: on CPU one step is queued at a time
    in_flight = parallel.InFlight(parallel.steps_in_flight(config.get("steps_in_flight", -1)))
    last: dict[str, float] = {}
    t_mark, step_mark = time.perf_counter(), start_step
    profile = metrics_lib.ProfileWindow(config_lib.profile_window(config), workdir,
                                        enabled=is_main)
    ckpt.watch_signals()  # SIGTERM/SIGINT: finish the step, save, raise errors.Preempted
    try:
        for step in range(start_step, total_steps):
            profile.before(step)
            in_flight.wait()  # first: the last step's temporaries are freed while this one's
            #   batch and key are made (~1 ms on CPU), so the step reuses them
            try:
                batch = next(batches)
            except DataError:  # a damaged shard, workers that keep dying: keep what is done
                if step > start_step:
                    ckpt.save_if_due(step, state, fetch=train_fn.fetch, pending=pending,
                                     total_steps=total_steps, stop=True)
                    _log(f"saved checkpoint {step} in {ckpt.directory} before stopping on a "
                         "data error; a restart resumes there.")
                raise
            key = step_key(host_rng, jax.device_put(np.int32(step), cpu))
            state, step_metrics = train_fn(state, batch, key)
            in_flight.add(step_metrics["loss"])
            pending.append(step_metrics)
            done = step + 1
            profile.after(done, step_metrics)
            scalars: dict[str, float] = {}
            if done % config.log_every_steps == 0 or done == total_steps:
                fetched = train_fn.fetch(pending)  # the only host sync between evals
                pending = []
                ckpt.check_losses([m["loss"] for m in fetched], first_step=done - len(fetched))
                elapsed = time.perf_counter() - t_mark
                mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                scalars = {
                    "train_loss": mean["loss"],
                    "train_error": mean["error"],
                    "train_top5_error": mean["top5_error"],
                    "learning_rate": float(fetched[-1]["learning_rate"]),
                    "grad_norm": mean["grad_norm"],
                    "images_per_second": (done - step_mark) * config.batch_size / elapsed,
                }
                _log(metrics_lib.progress_line(
                    done, total_steps, scalars, elapsed / (done - step_mark)
                ))
            stop = ckpt.stop_requested(done, total_steps)
            if not stop and (done % config.eval_every_steps == 0 or done == total_steps):
                t_eval = time.perf_counter()
                test = evaluate(eval_fn, state, config)
                t_mark += time.perf_counter() - t_eval  # images/s counts training time only
                _log(f"step {done}: {describe(test)}")
                scalars.update(test)
            if scalars:  # written (and flushed) before this step's checkpoint is started
                writer.write(done, scalars)
                last.update(scalars)
            ckpt.save_if_due(done, state, fetch=train_fn.fetch, pending=pending,
                             total_steps=total_steps, stop=stop)
            if "images_per_second" in scalars:
                t_mark, step_mark = time.perf_counter(), done
            if stop:
                raise ckpt.preempted(done)
    finally:
        profile.close()
        batches.close()
        stream.close()
        writer.close()
        ckpt.close()  # waits for the asynchronous saves
    if is_main:
        metrics_lib.plot_curves(
            metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl")),
            os.path.join(workdir, "curves.png"),
            title=f"{config.model} on {config.dataset}",
        )
    return last
