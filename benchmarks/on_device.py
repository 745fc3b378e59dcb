"""CIFAR training steps with the augmentation on the device, against host batches, same run.

    python benchmarks/input_pipeline.py --recipe cifar --on-device --arch resnet20 --json
    python benchmarks/on_device.py --archive /data/cifar-10-python.tar.gz --cpu-devices 2

Three ways to feed the same train step (the loop's own pieces: ``data.create``,
``parallel.compile``, ``train.loop.make_preprocess``), each timed as ``--steps`` steps dispatched
back to back (the host prepares batch k+1 while the device runs step k, as in the loop) and
synchronised once, repeated ``--repeats`` times (median and spread):

* ``float_batch``: the step alone on one float32 batch already on the device, no preprocess —
  the train step as it was before batches became uint8 (the bar the step must not drop below);
* ``host``: uint8 host batches (§4.2 draws included) sent every step, preprocess in the step;
* ``on_device``: ``data.on_device=True``: the training images live on the device, the host
  sends indices and draws, the device gathers, pads, crops and flips.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from typing import Any

import harness
import jax
import numpy as np

from resnet_jax import data, models, parallel
from resnet_jax.train import config as config_lib
from resnet_jax.train.loop import device_gather, make_preprocess
from resnet_jax.train.state import create_train_state
from resnet_jax.train.step import train_step


def _config(args: argparse.Namespace, on_device: bool) -> Any:
    c = config_lib.default_config()
    c.model, c.batch_size, c.parallel = args.arch, args.batch, args.parallel
    if args.archive:
        c.dataset, c.data.archive = "cifar10", args.archive
    else:
        c.dataset, c.data.num_train = "synthetic", args.num_train
    c.data.on_device = on_device
    return c


def _time(run_steps: Any, steps: int, repeats: int) -> list[float]:
    run_steps(2)  # compile + warm up
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        run_steps(steps)
        rates.append(steps / (time.perf_counter() - t))
    return rates


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--archive", default=None, help="CIFAR-10 python archive (default: "
                        "synthetic 32x32 images)")
    parser.add_argument("--num-train", type=int, default=50_000, help="synthetic split size")
    parser.add_argument("--parallel", default="jit", choices=["jit", "pmap"])
    parser.add_argument("--cpu-devices", type=int, default=0)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    parallel.set_cpu_devices(args.cpu_devices)
    parallel.check_batch_size(args.batch, "batch")

    host_cfg, dev_cfg = _config(args, False), _config(args, True)
    info = data.info(host_cfg)
    model = models.create(args.arch, num_classes=info.num_classes)
    state0 = create_train_state(host_cfg, model, jax.random.PRNGKey(0),
                                image_shape=info.image_shape)
    rng = jax.random.PRNGKey(1)
    pre = make_preprocess(host_cfg)
    results: dict[str, dict[str, Any]] = {}

    # float_batch: the step alone, on a float batch the device already holds (the old contract).
    plain = parallel.compile(train_step, args.parallel)
    holder = {"state": plain.replicate(state0)}
    with data.create(host_cfg, "train") as stream:
        first = next(stream)
    float_batch = plain.shard({"image": np.asarray(jax.jit(pre)(first)["image"]),
                               "label": first["label"]})

    def run_float(n: int) -> None:
        for _ in range(n):
            holder["state"], m = plain(holder["state"], float_batch, rng)
        jax.block_until_ready(m)

    results["float_batch"] = {"rates": _time(run_float, args.steps, args.repeats),
                              "host_bytes_per_image": 0.0}

    for name, cfg in (("host", host_cfg), ("on_device", dev_cfg)):
        step = parallel.compile(functools.partial(train_step, preprocess=pre), args.parallel)
        holder["state"] = step.replicate(state0)
        gather = device_gather(cfg)  # None for host batches
        stream = data.create(cfg, "train")
        sent = {"bytes": 0, "images": 0}

        def run(n: int, stream: Any = stream, step: Any = step, gather: Any = gather,
                sent: dict = sent) -> None:
            for _ in range(n):
                batch = next(stream)
                sent["bytes"] += sum(v.nbytes for v in batch.values())
                sent["images"] += args.batch
                if gather is not None:
                    batch = gather(batch)
                holder["state"], m = step(holder["state"], batch, rng)
            jax.block_until_ready(m)

        rates = _time(run, args.steps, args.repeats)
        stream.close()
        results[name] = {"rates": rates, "host_bytes_per_image": sent["bytes"] / sent["images"]}

    m = harness.machine()
    out: dict[str, Any] = {"benchmark": "cifar_on_device", "arch": args.arch, "batch": args.batch,
                           "dataset": host_cfg.dataset, "parallel": args.parallel,
                           "cpu_devices": args.cpu_devices, **m, "runs": []}
    print(f"machine: {m['host']} {m['cpu']} ({m['cpu_count']} cpus), jax {m['jax']}, "
          f"{m['devices']}")
    base = statistics.median(results["float_batch"]["rates"]) * args.batch
    host = statistics.median(results["host"]["rates"]) * args.batch
    for name, r in results.items():
        ips = [x * args.batch for x in r["rates"]]
        med = statistics.median(ips)
        row = {"feed": name, "images_per_second": med, "spread": [min(ips), max(ips)],
               "host_bytes_per_image": r["host_bytes_per_image"], "vs_float_batch": med / base,
               "vs_host": med / host}
        out["runs"].append(row)
        print(f"  {name:12s} {med:10,.0f} images/s ({min(ips):,.0f}-{max(ips):,.0f}), "
              f"{r['host_bytes_per_image']:7.1f} host bytes/image, {med / base:.2f}x the float "
              f"batch step, {med / host:.2f}x host batches")
    if args.json:
        print(json.dumps(out, default=float))
    return out


if __name__ == "__main__":
    main()
