"""torchvision ResNet weights -> this project's variables: a randomly initialised torch
ResNet-50 (torchvision's layout, written out here so torchvision is not needed) gives the same
eval-mode logits after conversion; layout errors name the key; torch stays optional."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest


def _torchvision_resnet(layers: tuple[int, ...], num_classes: int) -> object:
    """torchvision.models.ResNet with Bottleneck blocks (v1.5: stride on the 3x3 conv)."""
    from torch import nn

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, inplanes: int, planes: int, stride: int, downsample: object) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * 4)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = downsample

        def forward(self, x: object) -> object:
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            identity = x if self.downsample is None else self.downsample(x)
            return self.relu(out + identity)

    class ResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inplanes = 64
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            for k, (planes, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
                setattr(self, f"layer{k + 1}", self._make_layer(planes, n, 1 if k == 0 else 2))
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512 * 4, num_classes)

        def _make_layer(self, planes: int, blocks: int, stride: int) -> object:
            downsample = None
            if stride != 1 or self.inplanes != planes * 4:
                downsample = nn.Sequential(
                    nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False),
                    nn.BatchNorm2d(planes * 4),
                )
            layers_ = [Bottleneck(self.inplanes, planes, stride, downsample)]
            self.inplanes = planes * 4
            layers_ += [Bottleneck(self.inplanes, planes, 1, None) for _ in range(1, blocks)]
            return nn.Sequential(*layers_)

        def forward(self, x: object) -> object:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            for k in range(1, 5):
                x = getattr(self, f"layer{k}")(x)
            return self.fc(self.avgpool(x).flatten(1))

    return ResNet()


def test_random_torch_resnet50_gives_the_same_logits(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from resnet_jax import convert

    torch.manual_seed(0)
    net = _torchvision_resnet((3, 4, 6, 3), num_classes=1000)
    with torch.no_grad():  # non-trivial BN statistics and affine terms, so eval mode matters
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    net.eval()
    path = tmp_path / "resnet50.pth"
    torch.save(net.state_dict(), path)

    model, variables = convert.load_torchvision(path)
    assert (model.stage_sizes, model.stride_in, model.shortcut) == ((3, 4, 6, 3), "3x3", "B")
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    logits = np.asarray(model.apply(variables, x.transpose(0, 2, 3, 1), train=False))
    assert logits.shape == (2, 1000)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * scale)
    assert np.array_equal(logits.argmax(-1), expected.argmax(-1))


def _fake_state_dict(depth_layers: tuple[int, ...], bottleneck: bool) -> dict[str, np.ndarray]:
    """Keys and shapes of a torchvision ResNet, from the converter's own expectations."""
    import jax

    from resnet_jax import models

    depth = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 50 if bottleneck else 34}[depth_layers]
    model = models.create(f"resnet{depth}", **({"stride_in": "3x3"} if bottleneck else {}))
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
    sd: dict[str, np.ndarray] = {}
    inverse = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
    for col in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(shapes[col])[0]:
            names = [p.key for p in path]
            if names[0] == "fc":
                shape = leaf.shape[::-1] if names[1] == "kernel" else leaf.shape
                sd[f"fc.{'weight' if names[1] == 'kernel' else 'bias'}"] = np.zeros(shape)
                continue
            if names[0] == "stem":
                module = "conv1" if names[1] == "conv" else "bn1"
            else:
                layer, block = names[0][len("stage"):], names[1][len("block"):]
                rest = names[2:-1]
                sub = ({"conv": "downsample.0", "bn": "downsample.1"}[rest[1]]
                       if rest[0] == "shortcut" else rest[0])
                module = f"layer{layer}.{block}.{sub}"
            if names[-1] == "kernel":
                h, w, i, o = leaf.shape
                sd[f"{module}.weight"] = np.zeros((o, i, h, w), np.float32)
            else:
                sd[f"{module}.{inverse[names[-1]]}"] = np.zeros(leaf.shape, np.float32)
    return sd


def test_layout_errors_name_the_key() -> None:
    from resnet_jax import convert

    sd = _fake_state_dict((2, 2, 2, 2), bottleneck=False)
    model, variables = convert.from_torchvision({f"module.{k}": v for k, v in sd.items()})
    assert model.stage_sizes == (2, 2, 2, 2) and "shortcut" not in variables["params"]["stage1"][
        "block0"]
    assert variables["batch_stats"]["stage2"]["block0"]["shortcut"]["bn"]["var"].shape == (128,)

    bad = dict(sd)
    bad["layer2.0.conv1.weight"] = np.zeros((128, 64, 3, 1), np.float32)
    with pytest.raises(ValueError, match=r"'layer2.0.conv1.weight' has shape \(128, 64, 3, 1\)"):
        convert.from_torchvision(bad)
    missing = {k: v for k, v in sd.items() if k != "layer4.1.bn2.running_var"}
    with pytest.raises(ValueError, match=r"lacks 1 variable.*stage4/block1/bn2/var"):
        convert.from_torchvision(missing)
    with pytest.raises(ValueError, match=r"unexpected torchvision key 'layer1\.0\.se\.fc\.weight'"):
        convert.from_torchvision({**sd, "layer1.0.se.fc.weight": np.zeros(1)})
    with pytest.raises(ValueError, match=r"blocks per layer \(2, 2, 2\)"):
        convert.from_torchvision({k: v for k, v in sd.items() if not k.startswith("layer4")})


def test_without_torch_the_error_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from resnet_jax import convert

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(ImportError, match="pip install torch"):
        convert.read_state_dict(tmp_path / "weights.pth")
