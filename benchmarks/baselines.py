"""Baselines timed in the same run as resnet_jax: a straightforward Flax linen ResNet and
PyTorch eager. Both implement the same architectures (CIFAR option A basic blocks; ImageNet
basic or v1.5 bottleneck blocks with projection shortcuts) so the ratio compares engines,
not models.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
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

def torch_model(model: ResNet, channels_last: bool):
    """The same architecture in PyTorch (torchvision's layout; CIFAR option A as akamaster)."""
    try:
        import torch
        from torch import nn as tnn
    except ImportError as e:
        raise SystemExit("--baseline torch needs PyTorch: pip install torch") from e
    from resnet_jax.models import BottleneckBlock

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

    bottleneck = model.block_cls is BottleneckBlock
    layers: list[Any] = []
    if model.stem == "cifar":
        layers += [tnn.Conv2d(3, model.width, 3, 1, 1, bias=False), tnn.BatchNorm2d(model.width),
                   tnn.ReLU()]
    else:
        layers += [tnn.Conv2d(3, model.width, 7, 2, 3, bias=False), tnn.BatchNorm2d(model.width),
                   tnn.ReLU(), tnn.MaxPool2d(3, 2, 1)]
    cin = model.width
    for i, n in enumerate(model.stage_sizes):
        width = model.width * 2**i
        for j in range(n):
            stride = 2 if i > 0 and j == 0 else 1
            if bottleneck:
                layers.append(Bottleneck(cin, width, stride, model.shortcut == "A"))
                cin = width * 4
            else:
                layers.append(Basic(cin, width, stride, model.shortcut == "A"))
                cin = width
    layers += [tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(cin, model.num_classes)]
    net = tnn.Sequential(*layers)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def torch_steps(model: ResNet, batch: dict[str, np.ndarray], channels_last: bool, train: bool):
    """(first, step) callables for harness.time_steps, timing PyTorch eager on the same batch."""
    import torch

    torch.manual_seed(0)
    net = torch_model(model, channels_last)
    x = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2)))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(batch["label"].astype(np.int64))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    @torch.no_grad()
    def eval_step():
        return net(x).sum().item()

    net.train(train)
    fn = train_step if train else eval_step
    return fn, fn


def time_baseline(name: str, model: ResNet, batch: dict[str, np.ndarray], args: Any,
                  *, train: bool) -> Any:
    """Time baseline ``name`` ("plain" or "torch") on ``batch`` with harness.time_steps."""
    import harness

    if name == "torch":
        first, step = torch_steps(model, batch, args.torch_channels_last, train)
        return harness.time_steps(first, step, args.warmup, args.steps)
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

    return harness.time_steps(run, run, args.warmup, args.steps)
