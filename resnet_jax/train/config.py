"""The training config: defaults every ``configs/*.py`` starts from, its validation, the model it
builds, and which of its fields may change when a run resumes from a checkpoint."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from ml_collections import config_dict

from resnet_jax import data, models, parallel
from resnet_jax.errors import CheckpointMismatch, ConfigError, ExtensionUnavailable
from resnet_jax.train import optim

DTYPES = ("float32", "bfloat16", "float16")

# Config fields that may change between a checkpoint and its resume: they steer the run, not
# what is computed. Any other difference is a CheckpointMismatch. A key matches itself and its
# sub-keys ("distributed" covers "distributed.process_id"). What they change in the math (a
# cosine schedule's horizon, the BN group size through the device count) is checked on its own
# (run_facts / check_run_facts).
RESUME_SAFE_FIELDS = (
    "num_train_steps", "num_epochs", "eval_every_steps", "log_every_steps",
    "checkpoint_every_steps", "keep_checkpoints", "eval_batch_size", "parallel", "cpu_devices",
    "distributed", "profile_steps", "conv", "keep_freed_memory", "device_prefetch",
    "steps_in_flight",
    "data.archive", "data.data_dir", "data.manual_dir", "data.download", "data.tfds_eval_split",
    "data.eval_protocol", "data.eval_resize", "data.multi_scale_sizes", "data.prefetch",
    "data.workers", "data.on_device",
)
MODEL_FIELDS = ("model", "model_kwargs")


def _data_defaults() -> ml_collections.ConfigDict:
    return data.default_config()


def model_kwargs_defaults() -> ml_collections.ConfigDict:
    """Overrides for ``models.create``; None keeps the model's default (only set ones are passed).

    Listed up front because a locked config (and the command line) cannot add fields.
    """
    return ml_collections.ConfigDict({
        "depth": config_dict.placeholder(int),  # for cifar_resnet / imagenet_resnet / *_plain
        "width": config_dict.placeholder(int),  # filters of the first stage (paper: 16 / 64)
        "shortcut": config_dict.placeholder(str),  # "A" | "B" | "C" | "none" (§3.3)
        "stride_in": config_dict.placeholder(str),  # bottleneck stride on "1x1" | "3x3"
        "param_dtype": config_dict.placeholder(str),
        "bn_momentum": config_dict.placeholder(float),
        "bn_epsilon": config_dict.placeholder(float),
        "zero_init_last_bn": config_dict.placeholder(bool),
        "scan_blocks": config_dict.placeholder(bool),
        # Module seams by import path ("my_pkg.blocks:SEBlock"), stored as that string; "stem"
        # also takes "cifar" | "imagenet" (models.resnet.STEMS).
        "block": config_dict.placeholder(str),
        "stem": config_dict.placeholder(str),
        "head": config_dict.placeholder(str),
    })


def model_overrides(config: ml_collections.ConfigDict) -> dict:
    """The ``model_kwargs`` that are set (not None)."""
    return {k: v for k, v in config.model_kwargs.to_dict().items() if v is not None}


def resolve_conv(conv: str) -> str:
    """``conv``, with "auto" made concrete at this edge (never by the models): "onednn"
    (oneDNN convolutions and fused BN kernels, the CPU fast path, benchmarks/RESULTS.md) where
    JAX's default backend is the CPU and the extension builds and loads; "xla" elsewhere
    (GPU/TPU) and, with one line on stderr saying why, on a CPU where it cannot build. Starts
    JAX's backend: call it once the devices are set."""
    if conv not in models.CONV_CHOICES:
        raise ConfigError(f"conv={conv!r} is not one of {models.CONV_CHOICES}.")
    if conv != "auto":
        return conv
    if jax.default_backend() != "cpu":
        return "xla"
    return _cpu_auto()


@functools.cache
def _cpu_auto() -> str:
    from resnet_jax.ops import onednn

    try:
        onednn.load()
    except ExtensionUnavailable as e:
        print(f"resnet_jax: conv=auto runs XLA's CPU kernels: {e}", file=sys.stderr)
        return "xla"
    return "onednn"


def conv_override(config: ml_collections.ConfigDict, resolve: bool = True) -> dict[str, str]:
    """``{"conv_impl": config.conv}`` unless that is "xla" (older configs lack the field).

    "auto" (the default) is resolved (:func:`resolve_conv`: oneDNN on a CPU where it
    builds), which starts JAX's backend; ``resolve=False`` (validation, before the devices are
    set) checks the structure with XLA's instead: both build the same module.
    """
    conv = config.get("conv", "xla")
    if conv == "auto":
        conv = resolve_conv(conv) if resolve else "xla"
    return {} if conv == "xla" else {"conv_impl": conv}


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """``models.create(config.model, num_classes=..., dtype=..., **set model_kwargs)``, plus
    ``conv_impl=config.conv`` when that is not "xla" (so factories without the field still build).
    """
    kwargs = {"num_classes": num_classes, "dtype": config.dtype, **conv_override(config)}
    kwargs.update(model_overrides(config))
    return models.create(config.model, **kwargs)


def to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``config`` as plain JSON values (what a checkpoint records)."""
    return json.loads(config.to_json_best_effort())


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"data.image_size": 32, ...}``: nested mappings as dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def resume_safe(key: str, fields: Sequence[str] = RESUME_SAFE_FIELDS) -> bool:
    """``key`` (dotted) is one of ``fields`` or under one of them."""
    return any(key == f or key.startswith(f + ".") for f in fields)


def changed_fields(before: Mapping[str, Any], after: Mapping[str, Any], *,
                   one_sided: bool = True) -> list[str]:
    """Dotted keys whose values differ between two configs (JSON), resume-safe fields excluded;
    ``one_sided``: a key present on one side only counts as changed."""
    a, b = flatten(before), flatten(after)
    keys = set(a) | set(b) if one_sided else set(a) & set(b)
    return sorted(k for k in keys if a.get(k) != b.get(k) and not resume_safe(k))


def describe_model(config: Mapping[str, Any]) -> str:
    """``'cifar_resnet' {'depth': 8, 'width': 4}``: the model name and its set kwargs."""
    kwargs = {k: v for k, v in (config.get("model_kwargs") or {}).items() if v is not None}
    return f"{config.get('model')!r}" + (f" {kwargs}" if kwargs else "")


def check_same_model(saved: Mapping[str, Any], config: Mapping[str, Any], where: str) -> None:
    """Raise :class:`CheckpointMismatch` unless the two configs (JSON) name the same model."""
    a = flatten({k: saved.get(k) for k in MODEL_FIELDS})
    b = flatten({k: config.get(k) for k in MODEL_FIELDS})
    if any(a.get(k) != b.get(k) for k in set(a) | set(b)):
        raise CheckpointMismatch(
            f"{where} was written for model {describe_model(saved)}, but this config builds "
            f"{describe_model(config)}; use the checkpoint's model or another --workdir."
        )


def check_resume(saved: Mapping[str, Any], config: Mapping[str, Any], where: str) -> list[str]:
    """Raise :class:`CheckpointMismatch` if a field that changes what is computed differs;
    returns the fields present on one side only (code changed since the save: a warning)."""
    changed = changed_fields(saved, config, one_sided=False)
    if changed:
        a, b = flatten(saved), flatten(config)
        diffs = ", ".join(f"{k} {a[k]!r} -> {b[k]!r}" for k in changed[:4])
        more = f" (+{len(changed) - 4} more)" if len(changed) > 4 else ""
        raise CheckpointMismatch(
            f"{where} was written with another config: {diffs}{more}; resuming would not "
            "continue that run. Restore those values or use another --workdir."
        )
    a, b = flatten(saved), flatten(config)
    return sorted(k for k in set(a) ^ set(b) if not resume_safe(k))


def default_config() -> ml_collections.ConfigDict:
    """Every field the engine reads, at the paper's CIFAR recipe (§4.2) with a small model."""
    c = ml_collections.ConfigDict()
    c.model = "resnet20"
    c.model_kwargs = model_kwargs_defaults()
    c.dataset = "cifar10"
    c.data = _data_defaults()

    c.batch_size = 128  # global, over all processes and devices
    c.eval_batch_size = 512  # a power of two splits over any power-of-two device count
    # The run's length, in one of two units: the other field is -1 ("from the other one").
    # Both > 0 is refused (optim.check_run_length); on the command line, the one given wins
    # (length_from_overrides). The loop and every schedule use optim.total_steps.
    c.num_train_steps = 64_000
    c.num_epochs = -1.0  # > 0 (with num_train_steps=-1): epochs of the training split
    c.eval_every_steps = 2_000
    c.log_every_steps = 100
    c.checkpoint_every_steps = 2_000
    c.keep_checkpoints = 3  # newest checkpoints kept in workdir/checkpoints
    c.seed = 0

    c.parallel = "jit"  # "jit" (global view, sharded) | "pmap"
    c.bn_sync = True  # False: BN statistics per device (the paper's multi-GPU setup)
    c.cpu_devices = 0  # N > 0: split the host CPU into N devices (one per core is fastest)
    c.device_prefetch = 2  # batches placed on the devices ahead of the step (0: at the step)
    c.steps_in_flight = -1  # most train/eval steps dispatched and unfinished; -1: auto (1 on
    #   CPU, where each queued step holds its own temporaries; unbounded elsewhere); 0: no bound
    c.dtype = "float32"  # compute dtype; params, BN statistics, loss and optimiser stay float32;
    #   "float16" adds dynamic loss scaling (GPUs without fast bfloat16)
    c.keep_freed_memory = True  # glibc keeps freed memory for reuse: XLA:CPU's per-step
    #   buffers stop page-faulting (1.2-1.4x on CPU; parallel.keep_freed_memory)
    c.conv = "auto"  # "auto" | "xla" | "onednn": oneDNN convolutions and fused BN kernels on
    #   CPU; "auto" picks them on a CPU backend where they build (one line says so where they
    #   cannot), XLA's elsewhere. How the step runs, not what it computes: may change on resume.

    # §3.4 / §4.2: SGD, momentum 0.9, weight decay 1e-4, lr 0.1 /10 at 32k and 48k.
    c.learning_rate = 0.1
    c.scale_lr_by_batch = False  # True: learning_rate * batch_size / 256
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 1e-4
    c.weight_decay_mask = "kernels"  # "kernels" (conv/dense kernels) | "all"
    c.schedule = "piecewise"  # "piecewise" | "cosine" | "constant"
    c.lr_boundaries = (32_000, 48_000)
    c.lr_boundaries_unit = "steps"  # "steps" | "epochs"
    c.lr_decay_factor = 0.1
    c.warmup_steps = 0
    c.warmup_type = "constant"  # "constant" (hold warmup_lr, §4.2) | "linear" (from warmup_lr)
    c.warmup_lr = 0.01
    c.warmup_epochs = 0.0  # > 0: warm up for this many epochs instead of warmup_steps (Goyal)
    # -- beyond the paper (all off by default) --
    c.optimizer = "sgd"  # "sgd" (the paper's) | "lars" (You et al. 2017, for 16k-32k batches)
    c.lars_trust_coefficient = 0.001
    c.label_smoothing = 0.0  # Szegedy et al. 2016, in the loss only; metrics stay top-1/top-5
    c.profile_steps = ""  # "START,STOP": a jax.profiler trace of steps START..STOP-1 in workdir
    c.ema_decay = 0.0  # > 0: also keep an EMA of the weights (debiased as optax.ema), evaluated
    #   beside them (not in the paper)

    c.distributed = ml_collections.ConfigDict()
    c.distributed.initialize = False  # True: jax.distributed.initialize() (cluster auto-detect)
    c.distributed.coordinator_address = ""  # "host:port" to join explicitly
    c.distributed.num_processes = -1  # -1: detect
    c.distributed.process_id = -1  # -1: detect
    return c


LENGTH_FIELDS = ("num_train_steps", "num_epochs")


def length_from_overrides(config: ml_collections.ConfigDict, overrides: Collection[str]) -> str:
    """Command-line overrides name the run's length in one unit: when ``overrides`` (the dotted
    names set on the command line, ``config_flags.get_override_values``) set exactly one of
    ``num_train_steps`` / ``num_epochs`` to > 0, the other one is set to -1 so the given one
    wins (``--config.num_train_steps=2`` on an epoch-counted ImageNet config runs 2 steps;
    ``--config.num_epochs=3`` on a step-counted one runs 3 epochs). Both given and > 0 stays
    a :class:`ConfigError` at validation. Returns what was cleared ("" if nothing), in place."""
    given = [f for f in LENGTH_FIELDS if f in overrides and config[f] > 0]
    if len(given) != 1:
        return ""
    (other,) = (f for f in LENGTH_FIELDS if f != given[0])
    if config[other] <= 0:
        return ""
    note = f"{other}={config[other]!r} -> -1 (the run's length is {given[0]}={config[given[0]]!r})"
    config[other] = type(config[other])(-1)
    return note


def run_facts(config: ml_collections.ConfigDict, steps_per_epoch: float | None,
              device_count: int) -> dict[str, Any]:
    """What a run computes that no single config field states, as JSON (saved with every
    checkpoint, compared on resume by :func:`check_run_facts`): the resolved length
    ``total_steps``, the ``schedule_horizon`` the LR values depend on (cosine: the total; else
    None), ``lr_boundaries_steps`` and ``warmup_steps`` in steps, and ``bn_group_size``, the
    examples per BN batch: the global batch with ``bn_sync``, else the per-device batch
    ``batch_size / device_count`` (the paper's per-GPU BN, §3.4), with ``device_count``."""
    piecewise = config.schedule == "piecewise"
    return {
        "total_steps": optim.total_steps(config, steps_per_epoch),
        "schedule_horizon": optim.schedule_horizon(config, steps_per_epoch),
        "lr_boundaries_steps": list(optim.boundaries_in_steps(config, steps_per_epoch))
        if piecewise else [],
        "warmup_steps": optim.warmup_steps(config, steps_per_epoch),
        "bn_group_size": int(config.batch_size if config.bn_sync
                             else config.batch_size // device_count),
        "device_count": int(device_count),
    }


def check_run_facts(saved: Mapping[str, Any] | None, now: Mapping[str, Any], where: str,
                    saved_config: Mapping[str, Any]) -> str:
    """Raise :class:`CheckpointMismatch` if the run's math changed since ``saved`` (a
    :func:`run_facts` record): the schedule horizon, boundaries or warm-up in steps, or the BN
    group size. Returns a warning ("" if none) for a checkpoint saved before these were
    recorded (``saved`` None: not checked)."""
    if saved is None:
        return (f"{where} predates the recorded schedule horizon and BN group size (and its EMA, "
                "if any, was not debiased): they are not checked on this resume.")
    length = ", ".join(f"--config.{f}={saved_config.get(f)!r}" for f in LENGTH_FIELDS)
    fixes = {
        "schedule_horizon": f"the cosine schedule decays over the run's length; resume with "
                            f"the saved one ({length})",
        "lr_boundaries_steps": "the boundaries resolve to other steps (dataset size changed?); "
                               "restore the dataset and batch the run was started with",
        "warmup_steps": "warm-up resolves to other steps (dataset size changed?); restore the "
                        "dataset and batch the run was started with",
        "bn_group_size": f"BN statistics would be computed over groups of another size; run on "
                         f"{saved.get('device_count')} device(s) (e.g. --config.cpu_devices="
                         f"{saved.get('device_count')} on CPU)",
    }
    for field, fix in fixes.items():
        if field in saved and saved[field] != now[field]:
            raise CheckpointMismatch(
                f"{where} was written with {field}={saved[field]!r}, this run has "
                f"{now[field]!r}: {fix}, or use another --workdir.")
    return ""


def profile_window(config: ml_collections.ConfigDict) -> tuple[int, int] | None:
    """``config.profile_steps`` ("START,STOP") as (start, stop), or None when unset."""
    text = str(config.get("profile_steps", "") or "").strip()
    if not text:
        return None
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"profile_steps={text!r}: give START,STOP step indices, e.g. "
                          "--config.profile_steps=10,20")
    start, stop = (int(p) for p in parts)
    if not start < stop:
        raise ConfigError(f"profile_steps={text!r}: START must be below STOP, e.g. 10,20")
    return start, stop


def _one_of(config: ml_collections.ConfigDict, field: str, allowed: tuple[str, ...]) -> None:
    value = config[field]
    if value not in allowed:
        raise ConfigError(
            f"{field}={value!r} is not one of {allowed}; e.g. --config.{field}={allowed[0]}."
        )


def _positive(config: ml_collections.ConfigDict, field: str) -> None:
    if not config[field] > 0:
        raise ConfigError(f"{field}={config[field]!r} must be > 0; "
                          f"set --config.{field}=<positive>.")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise a one-line ``ConfigError`` naming the bad field and the fix; touches no devices.

    The model name and ``model_kwargs`` are checked by building the (untraced) module, so they
    fail before any data is read; the dataset name by ``data.info``, batch divisibility by
    ``parallel.check_batch_size`` once the devices are known.
    """
    _one_of(config, "conv", models.CONV_CHOICES)
    models.create(config.model, **conv_override(config, resolve=False), **model_overrides(config))

    _one_of(config, "parallel", parallel.MODES)
    _one_of(config, "dtype", DTYPES)
    _one_of(config, "schedule", optim.SCHEDULES)
    _one_of(config, "optimizer", optim.OPTIMIZERS)
    profile_window(config)
    _one_of(config, "warmup_type", optim.WARMUPS)
    _one_of(config, "weight_decay_mask", optim.WEIGHT_DECAY_MASKS)
    _one_of(config, "lr_boundaries_unit", optim.LR_BOUNDARY_UNITS)
    for field in ("batch_size", "eval_batch_size", "eval_every_steps", "log_every_steps",
                  "checkpoint_every_steps", "keep_checkpoints", "learning_rate"):
        _positive(config, field)
    optim.check_run_length(config)
    parallel.check_prefetch(config.get("device_prefetch", 2))
    parallel.check_steps_in_flight(config.get("steps_in_flight", -1))
    if config.cpu_devices < 0:
        raise ConfigError(f"cpu_devices={config.cpu_devices} must be >= 0 (0: JAX's default; "
                          "N: one CPU device per core, e.g. --config.cpu_devices=2).")
    if not 0.0 <= config.momentum < 1.0:
        raise ConfigError(f"momentum={config.momentum} must be in [0, 1); the paper uses 0.9.")
    if config.weight_decay < 0:
        raise ConfigError(f"weight_decay={config.weight_decay} must be >= 0; the paper uses 1e-4.")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ConfigError(f"ema_decay={config.ema_decay} must be in [0, 1); 0 turns the EMA off, "
                          "e.g. --config.ema_decay=0.9999.")
    if not 0.0 <= config.label_smoothing < 1.0:
        raise ConfigError(f"label_smoothing={config.label_smoothing} must be in [0, 1).")
    if not 0.0 < config.lr_decay_factor <= 1.0:
        raise ConfigError(f"lr_decay_factor={config.lr_decay_factor} must be in (0, 1].")
    if config.warmup_steps < 0 or config.warmup_epochs < 0:
        raise ConfigError(f"warmup_steps={config.warmup_steps} and warmup_epochs="
                          f"{config.warmup_epochs} must be >= 0.")
    bounds = list(config.lr_boundaries)
    if config.schedule == "piecewise" and bounds != sorted(bounds):
        raise ConfigError(f"lr_boundaries={tuple(bounds)} must be increasing, e.g. (32000, 48000).")
    if config.nesterov and not config.momentum:
        raise ConfigError("nesterov=True needs momentum > 0; set --config.momentum=0.9.")
