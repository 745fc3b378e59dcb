"""Input-pipeline throughput, and its ratio to what the train step consumes, in the same run.

    python benchmarks/input_pipeline.py --dataset synthetic --batch 128
    python benchmarks/input_pipeline.py --dataset cifar10 --archive /data/cifar-10-python.tar.gz \
        --arch resnet20 --json

Times ``resnet_jax.data.create(config, "train")`` (host-local numpy batches with the paper's
augmentation, threaded prefetch) over ``--batches`` batches after ``--warmup``; with ``--arch``
it then times that model's train step on the same batch and prints pipeline / step (target >= 3).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import harness

from resnet_jax import data
from resnet_jax.train import config as config_lib


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="synthetic", help="synthetic, digits, cifar10, ...")
    parser.add_argument("--archive", default=None, help="CIFAR python archive (offline)")
    parser.add_argument("--image", type=int, default=None, help="synthetic image side")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches")
    parser.add_argument("--batches", type=int, default=50, help="timed batches")
    parser.add_argument("--arch", default=None, help="also time this model's train step")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    config = config_lib.default_config()
    config.dataset = args.dataset
    config.batch_size = args.batch
    config.data.workers = args.workers
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
            batch = next(stream)
            times.append(time.perf_counter() - t)
    finally:
        stream.close()
    ips = args.batch / statistics.mean(times)  # mean: a prefetcher's waits are bursty
    m = harness.machine()
    out = {"benchmark": "input_pipeline", "dataset": args.dataset, "batch": args.batch,
           "image_shape": list(info.image_shape), "workers": args.workers, **m,
           "images_per_second": ips, "timed_batches": args.batches}
    print(f"machine: {m['host']} {m['cpu']} ({m['cpu_count']} cpus), jax {m['jax']}")
    print(f"input pipeline: {args.dataset} {info.image_shape} batch {args.batch}, "
          f"{args.workers} workers: {ips:,.0f} images/s over {args.batches} batches")
    if args.arch:
        import train_step

        step = train_step.main([
            "--arch", args.arch, "--batch", str(args.batch), "--image", str(info.image_shape[0]),
            "--no-peak", "--steps", "5", "--warmup", "1",
        ])
        out["train_step_images_per_second"] = step["images_per_second"]
        out["vs_train_step"] = ips / step["images_per_second"]
        print(f"  pipeline / {args.arch} train step = {out['vs_train_step']:.1f}x (target >= 3)")
    del batch
    if args.json:
        print(json.dumps(out, default=float))
    return out


if __name__ == "__main__":
    main()
