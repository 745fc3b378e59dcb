"""Input-pipeline throughput and cost, against what consumes it or a tf.data baseline, same run.

    python benchmarks/input_pipeline.py --dataset synthetic --batch 128
    python benchmarks/input_pipeline.py --dataset cifar10 --archive /data/cifar-10-python.tar.gz \
        --arch resnet20 --json
    python benchmarks/input_pipeline.py --recipe imagenet --jpegs 512 --workers 1,2 \
        --baseline tfdata --json
    python benchmarks/input_pipeline.py --recipe cifar --on-device --arch resnet20 --json

Default (CIFAR / synthetic) mode: times ``resnet_jax.data.create(config, "train")`` over
``--batches`` batches after ``--warmup``; with ``--arch`` it then times that model's train step on
the same batch and prints pipeline / step (target >= 3).

``--recipe imagenet``: encodes ``--jpegs`` photo-like JPEGs (random crops of scikit-learn's two
bundled photos, mild noise, ``--jpeg-size`` 500x375, quality 90: ImageNet's typical size) into
memory once, then runs the project's §3.4 training recipe over them (``pipeline.Plan`` +
``pipeline.train_stream``: JPEG decode, shorter side in [256, 480], random 224 crop, uint8 out;
flip and colour are draws applied on the device) with each ``--workers`` count. Per count it
prints images/s, CPU-ms per image (this process and its worker processes), the bytes per image
sent to the device, the cores other processes kept busy meanwhile (a shared machine's
images/s depend on it; CPU-ms per image much less), and ``vs_tfdata``: tf.data's CPU-ms per image
over ours, tf.data running the same recipe on the same JPEGs in the same run (decode, resize of the
whole image to the sampled shorter side, random 224 crop, flip, uint8; ``num_parallel_calls`` and
its private thread pool = the worker count), as the Flax ImageNet example and big_vision feed.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import statistics
import sys
import time
from typing import Any

import harness
import numpy as np

from resnet_jax import data
from resnet_jax.data import augment, pipeline, sources
from resnet_jax.train import config as config_lib

BENCH_EXTRA = 'pip install -e ".[bench]"'


def photo_jpegs(n: int, width: int = 500, height: int = 375, quality: int = 90,
                seed: int = 0) -> list[bytes]:
    """``n`` distinct photo-like JPEGs: random crops (60-100%) of scikit-learn's two bundled
    427x640 photos resized to ``width`` x ``height``, randomly mirrored, plus N(0, 2) noise."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    aspect = width / height
    out = []
    for i in range(n):
        src = photos[i % len(photos)]
        ch = rng.uniform(0.6, 1.0) * min(src.height, src.width / aspect)
        cw = ch * aspect
        x0, y0 = rng.uniform(0, src.width - cw), rng.uniform(0, src.height - ch)
        img = src.resize((width, height), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
        a = np.asarray(img, np.float32) + rng.normal(0.0, 2.0, (height, width, 3))
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        if rng.random() < 0.5:
            a = a[:, ::-1]
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


class CpuClock:
    """CPU seconds (user + system) of this process and its descendants, sampled while they live
    (a worker that exits between samples keeps its last sampled time), and of the whole machine
    (every process: what the others running here take shows as the difference)."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._proc = psutil.Process()
        self._children: dict[int, float] = {}

    def __call__(self) -> tuple[float, float]:
        t = self._proc.cpu_times()
        for child in self._proc.children(recursive=True):
            try:
                c = child.cpu_times()
                self._children[child.pid] = c.user + c.system
            except self._psutil.Error:
                pass
        m = self._psutil.cpu_times()
        busy = sum(m) - m.idle - getattr(m, "iowait", 0.0)
        return t.user + t.system + sum(self._children.values()), busy


def _timed(stream: Any, warmup: int, batches: int) -> tuple[float, float, float, dict]:
    """(wall seconds, CPU seconds of this process tree, cores the rest of the machine kept busy,
    last batch) over ``batches`` batches after ``warmup``."""
    clock = CpuClock()
    for _ in range(warmup):
        batch = next(stream)
    (cpu, busy), wall = clock(), time.perf_counter()
    for _ in range(batches):
        batch = next(stream)
    wall = time.perf_counter() - wall
    cpu_end, busy_end = clock()
    cpu = cpu_end - cpu
    return wall, cpu, max(busy_end - busy - cpu, 0.0) / wall, batch


def imagenet_recipe(train: sources.Source) -> pipeline.Recipe:
    """The §3.4 training recipe with the project's defaults (``data.default_config``)."""
    d = data.default_config()
    return pipeline.Recipe(
        kind="imagenet", size=224, channels=3, mean=augment.IMAGENET_MEAN_RGB, augment=True,
        flip=True, pad=int(d.pad), scale_range=tuple(d.scale_range),
        eval_resize=int(d.eval_resize), eval_protocol="center",
        multi_scale_sizes=tuple(d.multi_scale_sizes), pca_std=float(d.pca_std))


def run_ours(jpegs: list[bytes], workers: int, args: argparse.Namespace) -> dict[str, float]:
    labels = np.arange(len(jpegs)) % 1000
    source = sources.EncodedSource(jpegs, labels, 1000)
    plan = pipeline.Plan(source, imagenet_recipe(source), args.batch, 0, 1, seed=0)
    stream = pipeline.train_stream(plan, 0, prefetch=2, workers=workers)
    try:
        wall, cpu, others, batch = _timed(stream, args.warmup, args.batches)
    finally:
        stream.close()
    n = args.batch * args.batches
    return {"workers": workers, "images_per_second": n / wall, "cpu_ms_per_image": cpu / n * 1e3,
            "bytes_per_image": sum(v.nbytes for v in batch.values()) / args.batch,
            "other_cores_busy": others}


def run_tfdata(jpegs: list[bytes], workers: int, args: argparse.Namespace) -> dict[str, float]:
    import tensorflow as tf

    lo, hi = data.default_config().scale_range

    def recipe(jpeg: Any, label: Any) -> tuple[Any, Any]:
        image = tf.io.decode_jpeg(jpeg, channels=3)
        s = tf.random.uniform([], lo, hi + 1, tf.int32)
        h, w = tf.shape(image)[0], tf.shape(image)[1]
        scale = tf.cast(s, tf.float32) / tf.cast(tf.minimum(h, w), tf.float32)
        size = tf.maximum(s, tf.cast(tf.round(tf.cast(tf.stack([h, w]), tf.float32) * scale),
                                     tf.int32))
        image = tf.image.resize(image, size, "bilinear", antialias=True)
        image = tf.image.random_crop(image, [224, 224, 3])
        image = tf.image.random_flip_left_right(image)
        return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8), label

    labels = np.arange(len(jpegs), dtype=np.int32) % 1000
    ds = tf.data.Dataset.from_tensor_slices((np.array(jpegs, dtype=object), labels))
    options = tf.data.Options()
    options.threading.private_threadpool_size = workers
    options.threading.max_intra_op_parallelism = 1
    ds = (ds.repeat().shuffle(len(jpegs), seed=0).map(recipe, num_parallel_calls=workers)
          .batch(args.batch, drop_remainder=True).prefetch(2).with_options(options))
    stream = ds.as_numpy_iterator()
    wall, cpu, others, _ = _timed(stream, args.warmup, args.batches)
    n = args.batch * args.batches
    return {"images_per_second": n / wall, "cpu_ms_per_image": cpu / n * 1e3,
            "other_cores_busy": others}


def _imagenet(args: argparse.Namespace) -> dict[str, Any]:
    workers = [int(w) for w in args.workers.split(",")]
    if args.baseline == "tfdata" and importlib.util.find_spec("tensorflow") is None:
        sys.exit(f"the tf.data baseline needs tensorflow: {BENCH_EXTRA} "
                 "(or run with --baseline none)")
    width, height = (int(v) for v in args.jpeg_size.split("x"))
    m = harness.machine()
    load = os.getloadavg()
    t = time.perf_counter()
    jpegs = photo_jpegs(args.jpegs, width, height)
    print(f"machine: {m['host']} {m['cpu']} ({m['cpu_count']} cpus), jax {m['jax']}; "
          f"load average {load[0]:.2f} at start")
    print(f"{args.jpegs} JPEGs {width}x{height} quality 90, mean "
          f"{statistics.mean(map(len, jpegs)) / 1e3:.0f} KB, encoded in "
          f"{time.perf_counter() - t:.1f} s; batch {args.batch}, {args.warmup} warm-up + "
          f"{args.batches} timed batches per run")
    runs = [run_ours(jpegs, w, args) for w in workers]  # all before tensorflow is imported
    for r in runs:
        line = (f"  resnet_jax {r['workers']} worker(s): {r['images_per_second']:,.0f} images/s, "
                f"{r['cpu_ms_per_image']:.2f} CPU-ms/image, "
                f"{r['bytes_per_image']:,.0f} bytes/image to the device (other processes kept "
                f"{r['other_cores_busy']:.1f} cores busy)")
        if args.baseline == "tfdata":
            b = run_tfdata(jpegs, r["workers"], args)
            r["tfdata_images_per_second"] = b["images_per_second"]
            r["tfdata_cpu_ms_per_image"] = b["cpu_ms_per_image"]
            r["tfdata_other_cores_busy"] = b["other_cores_busy"]
            r["vs_tfdata"] = b["cpu_ms_per_image"] / r["cpu_ms_per_image"]
            line += (f"; tf.data {b['images_per_second']:,.0f} images/s, "
                     f"{b['cpu_ms_per_image']:.2f} CPU-ms/image -> vs_tfdata "
                     f"{r['vs_tfdata']:.2f}x")
        print(line)
    if len(runs) > 1:
        print(f"  scaling {runs[-1]['workers']} vs {runs[0]['workers']} worker(s): "
              f"{runs[-1]['images_per_second'] / runs[0]['images_per_second']:.2f}x images/s")
    end = os.getloadavg()
    print(f"load average {end[0]:.2f} at end (other work on this machine shares its cores)")
    return {"benchmark": "input_pipeline", "recipe": "imagenet", "jpegs": args.jpegs,
            "jpeg_size": [width, height], "batch": args.batch, "warmup": args.warmup,
            "timed_batches": args.batches, "baseline": args.baseline, "runs": runs,
            "loadavg_start": load[0], "loadavg_end": end[0], **m}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=None, choices=["imagenet", "cifar"],
                        help="imagenet: §3.4 over in-memory JPEGs; cifar (default): --dataset "
                             "mode")
    parser.add_argument("--on-device", action="store_true",
                        help="cifar: the train step fed with on-device augmentation against host "
                             "batches, same run (benchmarks/on_device.py)")
    parser.add_argument("--cpu-devices", type=int, default=0, help="--on-device: JAX CPU devices")
    parser.add_argument("--dataset", default="synthetic", help="synthetic, digits, cifar10, ...")
    parser.add_argument("--archive", default=None, help="CIFAR python archive (offline)")
    parser.add_argument("--image", type=int, default=None, help="synthetic image side")
    parser.add_argument("--jpegs", type=int, default=512, help="imagenet: JPEGs to generate")
    parser.add_argument("--jpeg-size", default="500x375", help="imagenet: JPEG width x height")
    parser.add_argument("--baseline", default="tfdata", choices=["tfdata", "none"],
                        help="imagenet: also run tf.data on the same JPEGs")
    parser.add_argument("--batch", type=int, default=None, help="default 128 (imagenet 32)")
    parser.add_argument("--workers", default="2", help="worker count; imagenet: a list, 1,2")
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches (5; 4)")
    parser.add_argument("--batches", type=int, default=None, help="timed batches (50; 16)")
    parser.add_argument("--arch", default=None, help="also time this model's train step")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.on_device:
        if args.recipe == "imagenet":
            raise SystemExit("--on-device is for --recipe cifar (the in-memory CIFAR recipe)")
        import on_device

        return on_device.main(
            ["--arch", args.arch or "resnet20", "--batch", str(args.batch or 128),
             "--cpu-devices", str(args.cpu_devices)]
            + (["--archive", args.archive] if args.archive else [])
            + (["--json"] if args.json else []))
    imagenet = args.recipe == "imagenet"
    args.batch = args.batch or (32 if imagenet else 128)
    args.warmup = args.warmup if args.warmup is not None else (4 if imagenet else 5)
    args.batches = args.batches or (16 if imagenet else 50)

    if imagenet:
        out = _imagenet(args)
        image = 224
    else:
        out = _cifar(args)
        image = out["image_shape"][0]
    if args.arch:
        import train_step

        step = train_step.main([
            "--arch", args.arch, "--batch", str(args.batch), "--image", str(image),
            "--no-peak", "--steps", "5", "--warmup", "1",
        ])
        out["train_step_images_per_second"] = step["images_per_second"]
        for r in out.get("runs", [out]):
            r["vs_train_step"] = r["images_per_second"] / step["images_per_second"]
            print(f"  pipeline ({r['workers']} workers) / {args.arch} train step = "
                  f"{r['vs_train_step']:.1f}x (target >= 3)")
    if args.json:
        print(json.dumps(out, default=float))
    return out


def _cifar(args: argparse.Namespace) -> dict[str, Any]:
    if "," in args.workers:
        raise SystemExit("--workers takes one count without --recipe imagenet")
    workers = int(args.workers)
    config = config_lib.default_config()
    config.dataset = args.dataset
    config.batch_size = args.batch
    config.data.workers = workers
    config.data.archive = args.archive
    if args.image:
        config.data.image_size = args.image
    info = data.info(config)
    stream = data.create(config, "train", seed=0)
    try:
        for _ in range(args.warmup):
            next(stream)
        times = []
        for _ in range(args.batches):
            t = time.perf_counter()
            next(stream)
            times.append(time.perf_counter() - t)
    finally:
        stream.close()
    ips = args.batch / statistics.mean(times)  # mean: a prefetcher's waits are bursty
    m = harness.machine()
    print(f"machine: {m['host']} {m['cpu']} ({m['cpu_count']} cpus), jax {m['jax']}")
    print(f"input pipeline: {args.dataset} {info.image_shape} batch {args.batch}, "
          f"{workers} workers: {ips:,.0f} images/s over {args.batches} batches")
    return {"benchmark": "input_pipeline", "dataset": args.dataset, "batch": args.batch,
            "image_shape": list(info.image_shape), "workers": workers, **m,
            "images_per_second": ips, "timed_batches": args.batches}


if __name__ == "__main__":
    main()
