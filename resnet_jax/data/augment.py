"""The paper's augmentation and test-time views, as pure numpy/PIL functions.

Pixel scale (every source, both recipes): ``x = (pixel - mean) / 255`` with ``pixel`` in 0..255.
The paper subtracts the mean from 0..255 pixels (§3.4, §4.2); the extra 1/255 only rescales the
input (the first conv is followed by BN) and keeps values in about [-1, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from PIL import Image

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
# §4.2 CIFAR recipe: vectorised over a batch of same-size images.


def normalize(images: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """uint8 images minus the mean (0..255 units), divided by 255, as float32."""
    x = np.subtract(images, mean, dtype=np.float32)
    x *= np.float32(1.0 / PIXEL_SCALE)
    return x


def pad_crop_flip(x: np.ndarray, offsets: np.ndarray, flips: np.ndarray, pad: int) -> np.ndarray:
    """§4.2: zero-pad ``pad`` pixels per side, crop the original size at ``offsets`` (B, 2)
    (row, col in [0, 2*pad]), mirror left-right where ``flips`` (B,) is set.

    Padding happens after mean subtraction, so a padded pixel equals the mean image there.
    """
    b, h, w, c = x.shape
    padded = np.zeros((b, h + 2 * pad, w + 2 * pad, c), x.dtype)
    padded[:, pad:pad + h, pad:pad + w] = x
    out = np.empty_like(x)
    for i, ((top, left), flip) in enumerate(zip(offsets, flips, strict=True)):
        view = padded[i, top:top + h, left:left + w]
        out[i] = view[:, ::-1] if flip else view
    return out


# ---------------------------------------------------------------------------------------------
# §3.4 ImageNet recipe: one variable-size image at a time (PIL resampling releases the GIL).


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _array(img: Image.Image, channels: int) -> np.ndarray:
    a = np.asarray(img)
    return a[..., None] if channels == 1 else a


def resized_shape(h: int, w: int, shorter: int) -> tuple[int, int]:
    """(H, W) after resizing so the shorter side is ``shorter``, keeping the aspect ratio."""
    if h <= w:
        return shorter, max(shorter, round(w * shorter / h))
    return max(shorter, round(h * shorter / w)), shorter


def resize_crop(image: np.ndarray, shorter: int, top: int, left: int, size: int) -> np.ndarray:
    """Resizes ``image`` (uint8 HWC) so its shorter side is ``shorter`` (bilinear, antialiased)
    and returns the ``size`` x ``size`` crop at (top, left) of the resized image.

    Only the crop is resampled: PIL maps the crop box back to source coordinates, which equals
    cropping the fully resized image up to the filter's footprint at the crop border.
    """
    h, w, c = image.shape
    rh, rw = resized_shape(h, w, shorter)
    if not (0 <= top <= rh - size and 0 <= left <= rw - size):
        raise ValueError(f"crop {size} at ({top}, {left}) outside the resized {rh}x{rw} image")
    sy, sx = h / rh, w / rw
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return _array(_pil(image).resize((size, size), Image.BILINEAR, box=box), c)


def resize_shorter(image: np.ndarray, shorter: int) -> np.ndarray:
    """The whole image resized so its shorter side is ``shorter``."""
    h, w, c = image.shape
    rh, rw = resized_shape(h, w, shorter)
    if (rh, rw) == (h, w):
        return image
    return _array(_pil(image).resize((rw, rh), Image.BILINEAR), c)


def train_crop(image: np.ndarray, shorter: int, pos: np.ndarray, flip: bool, size: int
               ) -> np.ndarray:
    """§3.4 scale augmentation: shorter side ``shorter``, the ``size`` x ``size`` crop at
    relative position ``pos`` (2 floats in [0, 1)), mirrored if ``flip``; uint8."""
    rh, rw = resized_shape(*image.shape[:2], shorter)
    top, left = int(pos[0] * (rh - size + 1)), int(pos[1] * (rw - size + 1))
    crop = resize_crop(image, shorter, top, left, size)
    return crop[:, ::-1] if flip else crop


def pca_shift(alpha: np.ndarray) -> np.ndarray:
    """AlexNet PCA colour shift ``eigvec @ (alpha * eigval)`` per row of ``alpha`` (..., 3), in
    [0, 1] pixel units."""
    return (alpha * PCA_EIGVAL) @ PCA_EIGVEC.T


def imagenet_train(images: list[np.ndarray] | np.ndarray, shorter: np.ndarray, pos: np.ndarray,
                   flips: np.ndarray, alpha: np.ndarray, size: int, mean: np.ndarray
                   ) -> np.ndarray:
    """§3.4 training views of a batch: ``train_crop`` per image (shorter sides ``shorter`` (B,),
    positions ``pos`` (B, 2), ``flips`` (B,)), then per-channel mean subtraction and the PCA
    colour shift for coefficients ``alpha`` (B, 3) (all zero: none), fused in one pass."""
    crops = np.stack([train_crop(im, int(s), p, bool(f), size)
                      for im, s, p, f in zip(images, shorter, pos, flips, strict=True)])
    offset = np.broadcast_to(np.asarray(mean, np.float32), (len(crops), crops.shape[-1]))
    if np.any(alpha):  # x/255 + shift == (x - (mean - 255 * shift)) / 255 after mean removal
        offset = offset - np.float32(PIXEL_SCALE) * pca_shift(alpha).astype(np.float32)
    return normalize(crops, offset[:, None, None, :])


def center_crop(image: np.ndarray, shorter: int, size: int, mean: np.ndarray) -> np.ndarray:
    """§3.4 single-view test: shorter side ``shorter``, the centre ``size`` x ``size`` crop."""
    rh, rw = resized_shape(*image.shape[:2], shorter)
    crop = resize_crop(image, shorter, (rh - size) // 2, (rw - size) // 2, size)
    return normalize(crop, mean)


def ten_crop(image: np.ndarray, shorter: int, size: int, mean: np.ndarray) -> np.ndarray:
    """§3.4 10-crop testing [21]: on the image resized to shorter side ``shorter``, the centre
    and the four corner crops, then the same five mirrored: (10, size, size, C), in the order
    centre, top-left, top-right, bottom-left, bottom-right, then their flips."""
    x = resize_shorter(image, shorter)
    h, w = x.shape[:2]
    corners = [((h - size) // 2, (w - size) // 2), (0, 0), (0, w - size), (h - size, 0),
               (h - size, w - size)]
    views = np.stack([x[t:t + size, c:c + size] for t, c in corners])
    views = np.concatenate([views, views[:, :, ::-1]])
    return normalize(views, mean)


def multi_scale(image: np.ndarray, sizes: tuple[int, ...], mean: np.ndarray
                ) -> dict[str, np.ndarray]:
    """§3.4 multi-scale testing: for each s in ``sizes``, the image resized to shorter side s.

    The paper evaluates the fully convolutional net on the whole resized image; to batch
    images of different aspect ratios we take the centred s x s crop (keys ``image_<s>``).
    """
    return {f"image_{s}": center_crop(image, s, s, mean) for s in sizes}


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
