"""The paper's experiments, one command each.

    python -m resnet_jax.experiments depth --config configs/cifar10.py \
        --archs plain20,plain56,resnet20,resnet56 [--steps N] --workdir W [--config.field=value]
    python -m resnet_jax.experiments responses --workdir W
    python -m resnet_jax.experiments tables [--out DIR]

``depth`` trains each net of ``--archs`` (default: Fig. 6's nets) with the same recipe, one after
another, in ``W/<arch>``: a complete run is skipped, a partial one resumes from its checkpoints.
``--jobs N`` trains N nets at once instead, each process pinned to its own share of the CPU
cores (on 2 cores, two one-core lanes train 1.5x the images/s of one two-core run); the nets
are balanced over the lanes by depth and each lane logs to ``W/lane<i>.log``.
``--train_only`` trains and writes no figure or table (what each lane runs).
The config file is loaded once per net as ``get_config(arch)`` (so per-net settings such as
ResNet-110's warm-up apply; a ``get_config()`` without arguments gets ``model = arch``), then the
``--config.*`` overrides are applied (parsed and type-checked by ml_collections' config_flags,
as in train.py). ``--steps N`` shortens the schedule proportionally (lr boundaries 32k/48k of
64k become 0.5N/0.75N) and says so in the output and in ``depth.md``.

``responses`` loads every net of a depth study (``resnet_jax.load``) and measures Fig. 7's layer
responses on its test set (the data config saved with the run).

Exit status: 0 done; 2 usage, config or data error (one line); otherwise as train.py (with
``--jobs``: the first failing lane's status and error line).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

COMMANDS = ("depth", "responses", "tables")
STUDY = "study.json"

config_flags.DEFINE_config_file("config", None, "configs/<family>.py (depth)", lock_config=True)
flags.DEFINE_list("archs", None, "depth: comma-separated registry names (default: Fig. 6's nets)")
flags.DEFINE_integer("steps", None, "depth: train N steps, the schedule scaled to N")
flags.DEFINE_string("workdir", None, "depth / responses: the study directory")
flags.DEFINE_integer("jobs", 1, "depth: train this many nets at once, each process pinned to "
                     "its own share of the CPU cores (CPU runs; log in W/lane<i>.log)")
flags.DEFINE_bool("train_only", False, "depth: train the nets, write no figure or table")
flags.DEFINE_string("out", "tables", "tables: output directory")
FLAGS = flags.FLAGS


def _config_module(path: str) -> object:
    from resnet_jax.errors import ConfigError

    spec = importlib.util.spec_from_file_location("experiment_config", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"--config {path} is not a Python file.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def net_configs(path: str, archs: list[str], overrides: dict,
                steps: int | None) -> tuple[dict[str, ml_collections.ConfigDict], str]:
    """One config per arch: ``get_config(arch)`` (or ``get_config()`` + ``model = arch``), the
    flattened ``overrides``, then the ``steps`` scaling. Returns the configs and the scaling
    note ("" without ``steps``)."""
    from resnet_jax.experiments import depth
    from resnet_jax.train import config as config_lib

    get_config = _config_module(path).get_config
    takes_arch = bool(inspect.signature(get_config).parameters)
    configs, note = {}, ""
    for arch in archs:
        config = get_config(arch) if takes_arch else get_config()
        if not takes_arch:
            config.model = arch
        config.update_from_flattened_dict(overrides)
        config_lib.length_from_overrides(config, overrides)  # the given length unit wins
        if steps is not None:
            note = depth.scale_schedule(config, steps)
        configs[arch] = config
    return configs, note


def run_depth() -> None:
    from resnet_jax.experiments import depth

    if FLAGS.config is None or FLAGS.workdir is None:
        raise app.UsageError("depth needs --config and --workdir.")
    archs = FLAGS.archs or list(depth.FIG6_ARCHS)
    path = config_flags.get_config_filename(FLAGS["config"])
    overrides = config_flags.get_override_values(FLAGS["config"])
    configs, note = net_configs(path, archs, overrides, FLAGS.steps)
    if note:
        print(f"NOTE: {note}; the paper's schedule is 64k iterations (lr /10 at 32k, 48k), so "
              "these errors are not the paper's.", flush=True)
    os.makedirs(FLAGS.workdir, exist_ok=True)
    if FLAGS.train_only:  # a lane of --jobs, or a user who plots later: study.json is not ours
        depth.run_study(configs, FLAGS.workdir)
        return
    with open(os.path.join(FLAGS.workdir, STUDY), "w") as f:
        json.dump({"archs": archs, "config": path, "overrides": overrides,
                   "steps": FLAGS.steps, "note": note}, f, indent=1, default=str)
    lanes = depth.split_lanes(archs, FLAGS.jobs)
    if len(lanes) > 1:
        for arch, config in configs.items():  # a changed recipe fails here, before any lane
            depth.check_study_config(config, os.path.join(FLAGS.workdir, arch))
        depth.run_lanes(sys.argv[1:], lanes, FLAGS.workdir)  # a failed lane: cli.CommandFailed
    depth.run_study(configs, FLAGS.workdir)  # with lanes: every net is complete, all skipped
    first = configs[archs[0]]
    depth.plot_fig6(archs, FLAGS.workdir, os.path.join(FLAGS.workdir, "fig6.png"),
                    title=f"{first.dataset}, {first.num_train_steps} iterations")
    rows = depth.results(archs, FLAGS.workdir, cifar10=first.dataset == "cifar10")
    text = depth.write_tables(rows, FLAGS.workdir, depth.recipe_header(first, archs, note))
    print(text)
    print(f"wrote {FLAGS.workdir}/fig6.png, depth.md, depth.csv")


def run_responses() -> None:
    import resnet_jax
    from resnet_jax import data
    from resnet_jax.errors import ConfigError
    from resnet_jax.experiments import depth, responses
    from resnet_jax.train import loop

    if FLAGS.workdir is None:
        raise app.UsageError("responses needs --workdir (a depth study's directory).")
    study = os.path.join(FLAGS.workdir, STUDY)
    if not os.path.exists(study):
        raise ConfigError(f"{study} is missing; run the depth command on {FLAGS.workdir} "
                          "first.")
    with open(study) as f:
        archs = json.load(f)["archs"]
    per_net = {}
    for arch in archs:
        netdir = os.path.join(FLAGS.workdir, arch)
        config, note = responses.single_view(depth.load_study_config(netdir))
        if note:
            print(f"{arch}: {note}", flush=True)
        model, variables = resnet_jax.load(netdir)
        stream = data.create(config, "eval", seed=config.seed)
        try:
            per_net[arch] = responses.layer_responses(
                model, variables, stream, preprocess=loop.make_preprocess(config))
        finally:
            stream.close()
        stds = [r.std for r in per_net[arch]]
        print(f"{arch}: {len(stds)} 3x3 layers, response std {min(stds):.3f}..{max(stds):.3f}",
              flush=True)
    responses.write_csv(per_net, os.path.join(FLAGS.workdir, "responses.csv"))
    responses.plot_fig7(per_net, os.path.join(FLAGS.workdir, "fig7.png"),
                        title="std of 3x3 layer responses (after BN, before ReLU/addition)")
    print(f"wrote {FLAGS.workdir}/fig7.png, responses.csv")


def run_tables() -> None:
    from resnet_jax.experiments import tables

    print(tables.write_tables(FLAGS.out))
    print(f"wrote {FLAGS.out}/tables.md, table1.csv, table6.csv")


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"give one command of {COMMANDS}; got {argv[1:]}.")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from resnet_jax import cli

    with cli.exit_on_error():
        {"depth": run_depth, "responses": run_responses, "tables": run_tables}[argv[1]]()


if __name__ == "__main__":
    app.run(main)
