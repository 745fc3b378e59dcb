"""The ImageNet studies of Tables 2-3: plain vs residual, shortcut options A/B/C, depth.

    python train.py --config configs/imagenet_studies.py:resnet34_B \
        --workdir runs/imagenet_resnet34_B --config.data.manual_dir=/data/imagenet

Names: plain18, plain34, resnet18, resnet34_A, resnet34_B, resnet34_C, resnet50, resnet101,
resnet152. Each is ``configs/imagenet.py``'s ``get_config`` (the §3.4 recipe: batch 256, SGD
0.9, weight decay 1e-4, lr 0.1 /10 at epochs 30 and 60 of 90 -- the paper ran ~120 epochs,
``--config.num_epochs=120``; scale augmentation 256-480, 224 crop, colour noise) with the
study's shortcut option and the paper's 10-crop test (``data.eval_protocol=ten_crop``, §3.4).
§4.1: Table 2's ResNets use option A (identity, zero-padding where dimensions grow); Table 3
compares A/B/C on ResNet-34; the bottleneck nets use option B.

Paper top-1 (/ top-5) error, 10-crop testing on the validation set:
  Table 2: plain18 27.94, plain34 28.54, resnet18 27.88, resnet34 (A) 25.03.
  Table 3: resnet34_A 25.03 / 7.76, resnet34_B 24.52 / 7.46, resnet34_C 24.19 / 7.40,
           resnet50 22.85 / 6.71, resnet101 21.75 / 6.05, resnet152 21.43 / 5.71.

Cost (estimated from Table 1's multiply-adds, not measured here): 90 epochs = 115M training
images at ~3x the forward multiply-adds each, i.e. resnet18 ~0.6e18, resnet34 ~1.3e18,
resnet50 ~1.3e18, resnet101 ~2.6e18, resnet152 ~3.9e18 multiply-adds (plain nets as their
ResNets; option C adds 4.6% to ResNet-34, by summary.summarize); many accelerator-hours
each. The 10-crop evaluation costs 10 forward passes per validation image (0.5M per eval).
"""

import importlib.util
import os

import ml_collections

# (registry name, shortcut option) per study name; §4.1 / Tables 2-3.
STUDIES = {
    "plain18": ("plain18", "none"),
    "plain34": ("plain34", "none"),
    "resnet18": ("resnet18", "A"),
    "resnet34_A": ("resnet34", "A"),
    "resnet34_B": ("resnet34", "B"),
    "resnet34_C": ("resnet34", "C"),
    "resnet50": ("resnet50", "B"),
    "resnet101": ("resnet101", "B"),
    "resnet152": ("resnet152", "B"),
}
# Top-1 / top-5 10-crop validation error (%), Tables 2-3 (None: not reported).
PAPER_ERROR = {
    "plain18": (27.94, None), "plain34": (28.54, None), "resnet18": (27.88, None),
    "resnet34_A": (25.03, 7.76), "resnet34_B": (24.52, 7.46), "resnet34_C": (24.19, 7.40),
    "resnet50": (22.85, 6.71), "resnet101": (21.75, 6.05), "resnet152": (21.43, 5.71),
}


def _imagenet() -> object:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet.py")
    spec = importlib.util.spec_from_file_location("configs_imagenet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(name: str = "resnet34_B") -> ml_collections.ConfigDict:
    if name not in STUDIES:
        raise ValueError(f"unknown ImageNet study {name!r}; valid: {', '.join(STUDIES)}.")
    arch, shortcut = STUDIES[name]
    c = _imagenet().get_config(arch)
    c.model_kwargs.shortcut = shortcut
    c.data.eval_protocol = "ten_crop"  # §3.4: "we adopt the standard 10-crop testing"
    return c
