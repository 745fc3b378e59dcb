"""The training config: defaults every ``configs/*.py`` starts from, and its validation."""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from resnet_jax.train import optim

DTYPES = ("float32", "bfloat16")


def _data_defaults() -> ml_collections.ConfigDict:
    from resnet_jax import data

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
    })


def model_overrides(config: ml_collections.ConfigDict) -> dict:
    """The ``model_kwargs`` that are set (not None)."""
    return {k: v for k, v in config.model_kwargs.to_dict().items() if v is not None}


def default_config() -> ml_collections.ConfigDict:
    """Every field the engine reads, at the paper's CIFAR recipe (§4.2) with a small model."""
    c = ml_collections.ConfigDict()
    c.model = "resnet20"
    c.model_kwargs = model_kwargs_defaults()
    c.dataset = "cifar10"
    c.data = _data_defaults()

    c.batch_size = 128  # global, over all processes and devices
    c.eval_batch_size = 512  # a power of two splits over any power-of-two device count
    c.num_train_steps = 64_000
    c.num_epochs = -1.0  # > 0: overrides num_train_steps using the dataset size
    c.eval_every_steps = 2_000
    c.log_every_steps = 100
    c.checkpoint_every_steps = 2_000
    c.keep_checkpoints = 3  # newest checkpoints kept in workdir/checkpoints
    c.seed = 0

    c.parallel = "jit"  # "jit" (global view, sharded) | "pmap"
    c.bn_sync = True  # False: BN statistics per device (the paper's multi-GPU setup)
    c.cpu_devices = 0  # N > 0: split the host CPU into N devices (one per core is fastest)
    c.dtype = "float32"  # compute dtype; params stay float32

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
    c.label_smoothing = 0.0

    c.distributed = ml_collections.ConfigDict()
    c.distributed.initialize = False  # True: jax.distributed.initialize() (cluster auto-detect)
    c.distributed.coordinator_address = ""  # "host:port" to join explicitly
    c.distributed.num_processes = -1  # -1: detect
    c.distributed.process_id = -1  # -1: detect
    return c


def _one_of(config: ml_collections.ConfigDict, field: str, allowed: tuple[str, ...]) -> None:
    value = config[field]
    if value not in allowed:
        raise ValueError(
            f"{field}={value!r} is not one of {allowed}; e.g. --config.{field}={allowed[0]}."
        )


def _positive(config: ml_collections.ConfigDict, field: str) -> None:
    if not config[field] > 0:
        raise ValueError(f"{field}={config[field]!r} must be > 0; set --config.{field}=<positive>.")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise a one-line ValueError naming the bad field and the fix; touches no devices.

    The model name and ``model_kwargs`` are checked by building the (untraced) module, so they
    fail before any data is read; the dataset name by ``data.info``, batch divisibility by
    ``parallel.check_batch_size`` once the devices are known.
    """
    from resnet_jax import models, parallel

    models.create(config.model, **model_overrides(config))

    _one_of(config, "parallel", parallel.MODES)
    _one_of(config, "dtype", DTYPES)
    _one_of(config, "schedule", optim.SCHEDULES)
    _one_of(config, "warmup_type", optim.WARMUPS)
    _one_of(config, "weight_decay_mask", optim.WEIGHT_DECAY_MASKS)
    _one_of(config, "lr_boundaries_unit", optim.LR_BOUNDARY_UNITS)
    for field in ("batch_size", "eval_batch_size", "eval_every_steps", "log_every_steps",
                  "checkpoint_every_steps", "keep_checkpoints", "learning_rate"):
        _positive(config, field)
    if config.num_epochs <= 0:
        _positive(config, "num_train_steps")
    if config.cpu_devices < 0:
        raise ValueError(f"cpu_devices={config.cpu_devices} must be >= 0 (0: JAX's default; "
                         "N: one CPU device per core, e.g. --config.cpu_devices=2).")
    if not 0.0 <= config.momentum < 1.0:
        raise ValueError(f"momentum={config.momentum} must be in [0, 1); the paper uses 0.9.")
    if config.weight_decay < 0:
        raise ValueError(f"weight_decay={config.weight_decay} must be >= 0; the paper uses 1e-4.")
    if not 0.0 <= config.label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={config.label_smoothing} must be in [0, 1).")
    if not 0.0 < config.lr_decay_factor <= 1.0:
        raise ValueError(f"lr_decay_factor={config.lr_decay_factor} must be in (0, 1].")
    if config.warmup_steps < 0:
        raise ValueError(f"warmup_steps={config.warmup_steps} must be >= 0.")
    bounds = list(config.lr_boundaries)
    if config.schedule == "piecewise" and bounds != sorted(bounds):
        raise ValueError(f"lr_boundaries={tuple(bounds)} must be increasing, e.g. (32000, 48000).")
    if config.nesterov and not config.momentum:
        raise ValueError("nesterov=True needs momentum > 0; set --config.momentum=0.9.")
