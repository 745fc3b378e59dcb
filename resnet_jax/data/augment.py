"""The host half of the paper's augmentation and test-time views: pure numpy/PIL functions
from uint8 images to uint8 crops. Everything in float (mean subtraction, §3.4's PCA colour shift,
flips, §4.2's pad-and-crop) runs on the device: ``resnet_jax.train.preprocess``.

Pixel scale (every source, both recipes, applied on the device): ``x = (pixel - mean) / 255``
with ``pixel`` in 0..255. The paper subtracts the mean from 0..255 pixels (§3.4, §4.2); the extra
1/255 only rescales the input (the first conv is followed by BN) and keeps values in about
[-1, 1].
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from PIL import Image

from resnet_jax.errors import DataError

PIXEL_SCALE = 255.0

# §3.4: ImageNet per-channel RGB mean (0..255) — the mean over the ILSVRC-2012 training set as
# used by fb.resnet.torch / torchvision. A per-pixel mean is ill-defined for variable-size images.
IMAGENET_MEAN_RGB = np.array([0.485, 0.456, 0.406], np.float32) * 255.0
# §3.4 / AlexNet: PCA colour augmentation over the RGB covariance of ImageNet pixels in [0, 1]
# (eigenvalues and eigenvectors as published with fb.resnet.torch).
PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045], np.float32)
PCA_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                       [-0.5808, -0.0045, -0.8140],
                       [-0.5836, -0.6948, 0.4203]], np.float32)


# ---------------------------------------------------------------------------------------------
# §3.4 ImageNet recipe: one variable-size image at a time (PIL resampling releases the GIL).
# An image is a uint8 array or its encoded file (``bytes``, decoded here: see ``_decoded``).


ImageInput = np.ndarray | bytes  # uint8 (H, W, C), or an encoded file (JPEG, PNG, ...)
_MODES = {1: "L", 3: "RGB"}


@dataclasses.dataclass(frozen=True)
class _Decoded:
    """``img`` holds the stored (h, w) image at 1/``scale`` of its size (DCT scaling)."""

    img: Image.Image
    h: int
    w: int
    scale: float
    channels: int


def _decoded(image: ImageInput, channels: int, shorter: int | None = None) -> _Decoded:
    """An array as it is; encoded bytes decoded to ``channels`` (3: RGB, grey and CMYK converted
    as TFDS's 3-channel image feature does; 1: grey). For a JPEG that is to be resized to shorter
    side ``shorter``, libjpeg decodes it at the smallest of 1, 1/2, 1/4, 1/8 scale that keeps it
    at least the resized size (``Image.draft``), so a small ``shorter`` decodes few pixels."""
    if isinstance(image, np.ndarray):
        h, w, c = image.shape
        return _Decoded(Image.fromarray(image[..., 0] if c == 1 else image), h, w, 1.0, c)
    if channels not in _MODES:
        raise DataError(f"encoded images decode to 1 or 3 channels, not {channels}")
    img = Image.open(io.BytesIO(image))
    w, h = img.size
    mode, scale = _MODES[channels], 1.0
    if img.format == "JPEG":
        want = None if shorter is None else resized_shape(h, w, shorter)[::-1]
        drafted = img.draft(mode, want)
        if drafted is not None:
            scale = w / drafted[1][2]  # its box is the stored image in reduced coordinates
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")  # CMYK, palette, RGBA, ...
    if img.mode != mode:
        img = img.convert(mode)
    return _Decoded(img, h, w, scale, channels)


def _array(img: Image.Image, channels: int) -> np.ndarray:
    a = np.asarray(img)
    return a[..., None] if channels == 1 else a


def _crop(d: _Decoded, shorter: int, top: int, left: int, size: int) -> np.ndarray:
    rh, rw = resized_shape(d.h, d.w, shorter)
    if not (0 <= top <= rh - size and 0 <= left <= rw - size):
        raise ValueError(f"crop {size} at ({top}, {left}) outside the resized {rh}x{rw} image")
    sy, sx = d.h / rh / d.scale, d.w / rw / d.scale
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return _array(d.img.resize((size, size), Image.BILINEAR, box=box), d.channels)


def decode(image: ImageInput, channels: int = 3) -> np.ndarray:
    """The uint8 (H, W, C) pixels of ``image`` (an array is returned as it is)."""
    if isinstance(image, np.ndarray):
        return image
    d = _decoded(image, channels)
    return _array(d.img, channels)


def resized_shape(h: int, w: int, shorter: int) -> tuple[int, int]:
    """(H, W) after resizing so the shorter side is ``shorter``, keeping the aspect ratio."""
    if h <= w:
        return shorter, max(shorter, round(w * shorter / h))
    return max(shorter, round(h * shorter / w)), shorter


def resize_crop(image: ImageInput, shorter: int, top: int, left: int, size: int, *,
                channels: int = 3) -> np.ndarray:
    """Resizes ``image`` so its shorter side is ``shorter`` (bilinear, antialiased) and returns
    the ``size`` x ``size`` crop at (top, left) of the resized image. ``channels``: what encoded
    bytes decode to (arrays keep theirs).

    Only the crop is resampled: PIL maps the crop box back to source coordinates, which equals
    cropping the fully resized image up to the filter's footprint at the crop border.
    """
    return _crop(_decoded(image, channels, shorter), shorter, top, left, size)


def resize_shorter(image: ImageInput, shorter: int, *, channels: int = 3) -> np.ndarray:
    """The whole image resized so its shorter side is ``shorter``."""
    d = _decoded(image, channels, shorter)
    rh, rw = resized_shape(d.h, d.w, shorter)
    if (rh, rw) == (d.h, d.w):
        return image if isinstance(image, np.ndarray) else _array(d.img, d.channels)
    box = (0, 0, d.w / d.scale, d.h / d.scale)
    return _array(d.img.resize((rw, rh), Image.BILINEAR, box=box), d.channels)


def train_crop(image: ImageInput, shorter: int, pos: np.ndarray, size: int, *,
               channels: int = 3) -> np.ndarray:
    """§3.4 scale augmentation: shorter side ``shorter``, the ``size`` x ``size`` crop at
    relative position ``pos`` (2 floats in [0, 1)); uint8 (the flip happens on the device)."""
    d = _decoded(image, channels, shorter)
    rh, rw = resized_shape(d.h, d.w, shorter)
    top, left = int(pos[0] * (rh - size + 1)), int(pos[1] * (rw - size + 1))
    return _crop(d, shorter, top, left, size)


def pca_shift(alpha: np.ndarray) -> np.ndarray:
    """AlexNet PCA colour shift ``eigvec @ (alpha * eigval)`` per row of ``alpha`` (..., 3), in
    [0, 1] pixel units."""
    return (alpha * PCA_EIGVAL) @ PCA_EIGVEC.T


def imagenet_train(images: list[ImageInput] | np.ndarray, shorter: np.ndarray, pos: np.ndarray,
                   size: int, *, channels: int = 3) -> np.ndarray:
    """§3.4 training crops of a batch: ``train_crop`` per image (shorter sides ``shorter`` (B,),
    positions ``pos`` (B, 2)), stacked as uint8 (B, size, size, C)."""
    return np.stack([train_crop(im, int(s), p, size, channels=channels)
                     for im, s, p in zip(images, shorter, pos, strict=True)])


def _center(d: _Decoded, shorter: int, size: int) -> np.ndarray:
    rh, rw = resized_shape(d.h, d.w, shorter)
    return _crop(d, shorter, (rh - size) // 2, (rw - size) // 2, size)


def center_crop(image: ImageInput, shorter: int, size: int, *, channels: int = 3) -> np.ndarray:
    """§3.4 single-view test: shorter side ``shorter``, the centre ``size`` x ``size`` crop."""
    return _center(_decoded(image, channels, shorter), shorter, size)


def ten_crop(image: ImageInput, shorter: int, size: int, *, channels: int = 3) -> np.ndarray:
    """§3.4 10-crop testing [21]: on the image resized to shorter side ``shorter``, the centre
    and the four corner crops, then the same five mirrored: (10, size, size, C), in the order
    centre, top-left, top-right, bottom-left, bottom-right, then their flips."""
    x = resize_shorter(image, shorter, channels=channels)
    h, w = x.shape[:2]
    corners = [((h - size) // 2, (w - size) // 2), (0, 0), (0, w - size), (h - size, 0),
               (h - size, w - size)]
    views = np.stack([x[t:t + size, c:c + size] for t, c in corners])
    return np.concatenate([views, views[:, :, ::-1]])


def multi_scale(image: ImageInput, sizes: tuple[int, ...], *,
                channels: int = 3) -> dict[str, np.ndarray]:
    """§3.4 multi-scale testing: for each s in ``sizes``, the image resized to shorter side s.

    The paper evaluates the fully convolutional net on the whole resized image; to batch
    images of different aspect ratios we take the centred s x s crop (keys ``image_<s>``).
    Encoded bytes are decoded once, at a scale that serves the largest s.
    """
    d = _decoded(image, channels, max(sizes))
    return {f"image_{s}": _center(d, s, s) for s in sizes}


# ---------------------------------------------------------------------------------------------
# The view contract with the trainer.


def average_views(predict: Callable[[Any], Any], batch: Mapping[str, Any]) -> Any:
    """Softmax probabilities averaged over every view of every ``image*`` key of ``batch``.

    ``predict`` maps images (N, H, W, C) to probabilities (N, K). A rank-4 key is one view per
    example; a rank-5 key (B, V, H, W, C) holds V views. Works on numpy and jax arrays (jit-able).
    """
    total, count = None, 0
    for key in sorted(k for k in batch if k.startswith("image")):
        x = batch[key]
        views = x.shape[1] if x.ndim == 5 else 1
        p = predict(x.reshape((-1, *x.shape[-3:])))
        p = p.reshape((x.shape[0], views, p.shape[-1])).sum(axis=1)
        total = p if total is None else total + p
        count += views
    if total is None:
        raise ValueError(f"batch has no image* key: {sorted(batch)}")
    return total / count
