"""Programs timed interleaved in one run: resnet_jax's own step and its baselines, a
straightforward Flax linen ResNet ("plain"), PyTorch eager ("torch") and resnet_jax with
``conv_impl="xla"`` ("xla", the reference for ``--conv onednn``). All implement the same
architectures (CIFAR option A basic blocks; ImageNet basic or v1.5 bottleneck blocks with
projection shortcuts) so the ratio compares engines, not models.

Building a program (model, state, compiled step, or torch module + optimizer) is separate from
timing it: each builder returns a :class:`harness.Program` for :func:`harness.time_interleaved`.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import harness
import jax
import jax.numpy as jnp
import numpy as np
import optax

from resnet_jax.models import ResNet

# ---- plain linen: the shape of flax/examples/imagenet/models.py, no scan, no extras ----------

class PlainBasic(nn.Module):
    features: int
    strides: int
    option_a: bool
    conv: Any
    norm: Any

    @nn.compact
    def __call__(self, x):
        y = self.conv(self.features, (3, 3), (self.strides, self.strides), padding=1)(x)
        y = nn.relu(self.norm()(y))
        y = self.conv(self.features, (3, 3), padding=1)(y)
        y = self.norm()(y)
        if x.shape != y.shape:
            if self.option_a:
                x = x[:, ::2, ::2, :]
                x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, self.features - x.shape[-1])))
            else:
                x = self.norm()(self.conv(self.features, (1, 1), (self.strides,) * 2)(x))
        return nn.relu(x + y)


class PlainBottleneck(nn.Module):
    features: int
    strides: int
    option_a: bool
    conv: Any
    norm: Any

    @nn.compact
    def __call__(self, x):
        y = nn.relu(self.norm()(self.conv(self.features, (1, 1))(x)))
        y = self.conv(self.features, (3, 3), (self.strides, self.strides), padding=1)(y)
        y = nn.relu(self.norm()(y))
        y = self.norm()(self.conv(self.features * 4, (1, 1))(y))
        if x.shape != y.shape:
            x = self.norm()(self.conv(self.features * 4, (1, 1), (self.strides,) * 2)(x))
        return nn.relu(x + y)


class PlainResNet(nn.Module):
    stage_sizes: Sequence[int]
    block: Any
    width: int
    num_classes: int
    cifar: bool
    option_a: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                                 epsilon=1e-5, dtype=self.dtype)
        x = jnp.asarray(x, self.dtype)
        if self.cifar:
            x = nn.relu(norm()(conv(self.width, (3, 3), padding=1)(x)))
        else:
            x = nn.relu(norm()(conv(self.width, (7, 7), (2, 2), padding=3)(x)))
            x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        for i, n in enumerate(self.stage_sizes):
            for j in range(n):
                x = self.block(self.width * 2**i, 2 if i > 0 and j == 0 else 1, self.option_a,
                               conv, norm)(x)
        x = jnp.mean(x, axis=(1, 2))
        return jnp.asarray(nn.Dense(self.num_classes, dtype=self.dtype)(x), jnp.float32)


def plain_from(model: ResNet) -> PlainResNet:
    from resnet_jax.models import BottleneckBlock

    bottleneck = model.block_cls is BottleneckBlock
    if bottleneck and model.stride_in != "3x3":
        raise ValueError("the plain baseline has v1.5 bottlenecks only; pass --stride-in 3x3.")
    return PlainResNet(
        tuple(model.stage_sizes), PlainBottleneck if bottleneck else PlainBasic, model.width,
        model.num_classes, model.stem == "cifar", model.shortcut == "A", model.dtype,
    )


def plain_train_step(model: PlainResNet) -> Callable:
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))

    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(state, image, label):
        params, stats, opt = state

        def loss_fn(p):
            logits, new = model.apply({"params": p, "batch_stats": stats}, image,
                                      mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, label).mean(), new

        (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return (optax.apply_updates(params, updates), new["batch_stats"], opt), loss

    def init(image):
        v = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), image)
        return (v["params"], v["batch_stats"], tx.init(v["params"]))

    return init, step


def plain_eval_step(model: PlainResNet) -> Callable:
    return jax.jit(lambda v, image: model.apply(v, image, train=False))


# ---- PyTorch eager ----------------------------------------------------------------------------

def torch_spec(model: ResNet) -> dict[str, Any]:
    """What :func:`torch_model` needs of ``model``, as JSON (for the torch worker process)."""
    from resnet_jax.models import BottleneckBlock

    return {"stage_sizes": [int(n) for n in model.stage_sizes],
            "bottleneck": model.block_cls is BottleneckBlock, "width": int(model.width),
            "num_classes": int(model.num_classes), "cifar_stem": model.stem == "cifar",
            "option_a": model.shortcut == "A"}


def torch_model(spec: dict[str, Any], channels_last: bool) -> Any:
    """The same architecture in PyTorch (torchvision's layout; CIFAR option A as akamaster),
    from :func:`torch_spec`."""
    import torch
    from torch import nn as tnn

    class Basic(tnn.Module):
        def __init__(self, cin, cout, stride, option_a):
            super().__init__()
            self.c1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = tnn.BatchNorm2d(cout)
            self.c2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = tnn.BatchNorm2d(cout)
            self.short = None
            self.pad = 0
            if stride != 1 or cin != cout:
                if option_a:
                    self.pad = cout - cin
                else:
                    self.short = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False),
                                                tnn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
            if self.short is not None:
                x = self.short(x)
            elif self.pad:
                x = tnn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, self.pad))
            return torch.relu(x + y)

    class Bottleneck(tnn.Module):
        def __init__(self, cin, width, stride, option_a):
            super().__init__()
            cout = width * 4
            self.c1, self.b1 = tnn.Conv2d(cin, width, 1, bias=False), tnn.BatchNorm2d(width)
            self.c2 = tnn.Conv2d(width, width, 3, stride, 1, bias=False)
            self.b2 = tnn.BatchNorm2d(width)
            self.c3, self.b3 = tnn.Conv2d(width, cout, 1, bias=False), tnn.BatchNorm2d(cout)
            self.short = None
            if stride != 1 or cin != cout:
                self.short = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False),
                                            tnn.BatchNorm2d(cout))

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            y = torch.relu(self.b2(self.c2(y)))
            y = self.b3(self.c3(y))
            return torch.relu((self.short(x) if self.short is not None else x) + y)

    width0, option_a = spec["width"], spec["option_a"]
    layers: list[Any] = []
    if spec["cifar_stem"]:
        layers += [tnn.Conv2d(3, width0, 3, 1, 1, bias=False), tnn.BatchNorm2d(width0),
                   tnn.ReLU()]
    else:
        layers += [tnn.Conv2d(3, width0, 7, 2, 3, bias=False), tnn.BatchNorm2d(width0),
                   tnn.ReLU(), tnn.MaxPool2d(3, 2, 1)]
    cin = width0
    for i, n in enumerate(spec["stage_sizes"]):
        width = width0 * 2**i
        for j in range(n):
            stride = 2 if i > 0 and j == 0 else 1
            if spec["bottleneck"]:
                layers.append(Bottleneck(cin, width, stride, option_a))
                cin = width * 4
            else:
                layers.append(Basic(cin, width, stride, option_a))
                cin = width
    layers += [tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(cin, spec["num_classes"])]
    net = tnn.Sequential(*layers)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


# ---- programs -----------------------------------------------------------------------------------

def resnet_jax_program(name: str, model: ResNet, batch: dict[str, np.ndarray], mode: str, *,
                       train: bool) -> harness.Program:
    """resnet_jax's ``train_step`` (``train``) or ``eval_step`` under ``parallel.compile(mode)``
    (all devices: ``--cpu-devices`` applies), on ``batch`` (eval needs its ``mask``)."""
    from resnet_jax import parallel
    from resnet_jax.train import config as config_lib
    from resnet_jax.train.state import create_train_state
    from resnet_jax.train.step import eval_step, train_step

    state = create_train_state(
        config_lib.default_config(), model, jax.random.key(0), image_shape=batch["image"].shape[1:]
    )
    step = parallel.compile(train_step if train else eval_step, mode, donate_state=train)
    holder = {"state": step.replicate(state)}
    device_batch = step.shard(batch)
    rng = jax.random.PRNGKey(1)
    # as the train loop runs its steps on CPU: one at a time, the last one's temporaries freed
    # before the next is dispatched, the heap settled after the first (parallel.InFlight)
    in_flight = parallel.InFlight(parallel.steps_in_flight(-1))

    def run() -> None:
        in_flight.wait()
        if train:
            holder["state"], metrics = step(holder["state"], device_batch, rng)
        else:
            metrics = step(holder["state"], device_batch)
        in_flight.add(metrics)
        jax.block_until_ready(metrics)

    return harness.Program(name, run)


def xla_model(model: ResNet) -> ResNet:
    """``model`` with XLA's convolution (``conv_impl="xla"``); itself where the field is absent."""
    return model.clone(conv_impl="xla") if hasattr(model, "conv_impl") else model


def plain_program(model: ResNet, batch: dict[str, np.ndarray], *, train: bool) -> harness.Program:
    """The plain linen ResNet's train step (SGD, momentum, weight decay) or eval forward, on
    one device."""
    plain = plain_from(model)
    init, train_fn = plain_train_step(plain)
    state = {"s": init(batch["image"])}
    image, label = jax.device_put(batch["image"]), jax.device_put(batch["label"])
    if train:
        def run() -> None:
            state["s"], loss = train_fn(state["s"], image, label)
            jax.block_until_ready(loss)
    else:
        params, stats, _ = state["s"]
        variables = {"params": params, "batch_stats": stats}
        forward = plain_eval_step(plain)

        def run() -> None:
            jax.block_until_ready(forward(variables, image))

    return harness.Program("plain", run)


def torch_step(arrays: dict[str, np.ndarray], *, spec: dict[str, Any], channels_last: bool,
               train: bool) -> Callable[[], float]:
    """PyTorch eager on ``arrays`` (the batch): a train step (SGD, momentum, weight decay) or a
    no-grad forward; ``.item()`` waits for the result. A :class:`harness.Worker` factory."""
    import torch

    torch.manual_seed(0)
    net = torch_model(spec, channels_last)
    x = torch.from_numpy(np.ascontiguousarray(arrays["image"].transpose(0, 3, 1, 2)))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(arrays["label"].astype(np.int64))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def train_step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    @torch.no_grad()
    def eval_step() -> float:
        return net(x).sum().item()

    net.train(train)
    return train_step if train else eval_step


def torch_program(worker: harness.Worker, model: ResNet, batch: dict[str, np.ndarray], *,
                  channels_last: bool, train: bool) -> harness.Program:
    """PyTorch eager's step for ``model`` on ``batch``, run in ``worker``'s own process."""
    if importlib.util.find_spec("torch") is None:
        raise SystemExit("--baseline torch needs PyTorch: pip install torch")
    arrays = worker.put({"image": batch["image"], "label": batch["label"]})
    note = (f"{'channels_last' if channels_last else 'NCHW'}, own process, OpenMP "
            f"{worker.omp_wait_policy}")
    return worker.program("torch", "baselines:torch_step", arrays, note=note,
                          spec=torch_spec(model), channels_last=channels_last, train=train)


def build_baseline(name: str, model: ResNet, batch: dict[str, np.ndarray], args: Any, *,
                   train: bool, worker: harness.Worker | None = None) -> harness.Program:
    """Build baseline ``name`` (one of ``harness.BASELINES``) for ``model`` on ``batch``;
    torch needs ``worker``, the process it runs in."""
    if name == "plain":
        return plain_program(model, batch, train=train)
    if name == "torch":
        if worker is None:
            raise ValueError("the torch baseline runs in a harness.Worker; pass worker=")
        return torch_program(worker, model, batch, channels_last=args.torch_channels_last,
                             train=train)
    if name == "xla":
        return resnet_jax_program("xla", xla_model(model), batch, args.parallel, train=train)
    raise ValueError(f"unknown baseline {name!r}; valid: {', '.join(harness.BASELINES)}")
