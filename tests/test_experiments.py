"""The experiment commands: depth study, layer responses (Fig. 7) and architecture tables.

Each fact is checked against a second, independent path: the responses against the BN outputs
of an unrolled clone read by ``nn.intercept_methods`` and a float64 ``np.std``; the tables
against ``summary.summarize``; the depth tables against the runs' ``metrics.jsonl``.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest
from helpers import config_module

import resnet_jax
from resnet_jax import data, models, summary
from resnet_jax.experiments import depth, responses
from resnet_jax.train import config as config_lib
from resnet_jax.train import metrics as metrics_lib
from resnet_jax.train.loop import make_preprocess

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resnet_jax.experiments", *args], cwd=cwd,
                          env=ENV, capture_output=True, text=True, timeout=600)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


# --- the independent path: named BN outputs of an unrolled net, float64 std on the host -------

def _unstack(tree: dict) -> dict:
    """``stage{k}/blocks/...`` (leading axis = blocks 1..n-1) -> ``stage{k}/block{i}/...``."""
    out = {}
    for key, value in tree.items():
        if key == "blocks":
            n = jax.tree.leaves(value)[0].shape[0]
            for i in range(n):
                out[f"block{i + 1}"] = jax.tree.map(lambda a, i=i: a[i], value)
        elif isinstance(value, dict):
            out[key] = _unstack(value)
        else:
            out[key] = value
    return out


def _direct_stds(model: nn.Module, variables: dict, batches: list[dict]) -> dict[str, float]:
    """Std over all masked-in values of each basic block's bn1/bn2 and the CIFAR stem's bn."""
    unrolled = model.clone(scan_blocks=False)
    flat_vars = {k: _unstack(jax.tree.map(np.asarray, dict(v))) for k, v in variables.items()}

    @jax.jit
    def named_outputs(image: jax.Array) -> dict[str, jax.Array]:
        outputs: dict[str, jax.Array] = {}

        def grab(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            path = context.module.path
            if isinstance(context.module, nn.BatchNorm) and (
                path == ("stem", "bn")
                or (path[-1] in ("bn1", "bn2") and path[-2].startswith("block"))
            ):
                outputs["/".join(path)] = out
            return out

        with nn.intercept_methods(grab):
            unrolled.apply(flat_vars, image, train=False)
        return outputs

    values: dict[str, list[np.ndarray]] = {}
    names: list[str] = []
    for batch in batches:
        mask = np.asarray(batch["mask"]).astype(bool)
        for name, out in named_outputs(batch["image"]).items():
            values.setdefault(name, []).append(np.asarray(out, np.float64)[mask].ravel())
    for name in _call_order(unrolled, flat_vars, batches[0]["image"]):
        names.append(name)
    return {n: float(np.std(np.concatenate(values[n]))) for n in names}


def _call_order(model: nn.Module, variables: dict, image: np.ndarray) -> list[str]:
    """Module paths of the BN layers in the order they run (jit returns dicts key-sorted)."""
    order: list[str] = []

    def note(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.BatchNorm):
            order.append("/".join(context.module.path))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(note):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, image)
    return [n for n in order if n == "stem/bn" or n.rsplit("/", 1)[-1] in ("bn1", "bn2")]


def _perturbed(model: nn.Module, rng: int) -> dict:
    """Initial variables with random BN statistics and affine terms (so BN is no identity)."""
    variables = model.init(jax.random.key(rng), np.zeros((1, 32, 32, 3), np.float32))
    r = np.random.RandomState(rng)

    def jitter(path, x):
        name = path[-1].key
        if name in ("mean", "bias"):
            return x + r.normal(0.0, 0.5, x.shape).astype(x.dtype)
        if name in ("var", "scale"):
            return x * r.uniform(0.2, 3.0, x.shape).astype(x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(jitter, variables)


def test_responses_equal_direct_computation() -> None:
    model = models.create("resnet20", width=4)  # scanned stages: stacked intermediates
    variables = _perturbed(model, 1)
    r = np.random.RandomState(0)
    batches = [  # the second batch is padded: masked examples must not count
        {"image": r.normal(1.0, 2.0, (6, 32, 32, 3)).astype(np.float32), "mask": np.ones(6)},
        {"image": r.normal(0.0, 1.0, (6, 32, 32, 3)).astype(np.float32),
         "mask": np.array([1, 1, 0, 1, 0, 0], np.float32)},
    ]
    got = responses.layer_responses(model, variables, batches)
    want = _direct_stds(model, variables, batches)
    expected_order = ["stem/bn"] + [f"stage{k}/block{i}/bn{j}" for k in (1, 2, 3)
                                    for i in (0, 1, 2) for j in (1, 2)]
    assert [x.layer for x in got] == expected_order  # 19 3x3 layers, execution order
    assert [x.index for x in got] == list(range(1, 20))
    np.testing.assert_allclose([x.std for x in got], [want[n] for n in expected_order],
                               rtol=2e-5)
    assert got[0].values == 9 * 32 * 32 * 4 and got[-1].values == 9 * 8 * 8 * 16
    assert len({round(x.std, 3) for x in got}) > 10  # distinct layers, not one repeated


def test_bottleneck_selects_only_its_3x3_layer() -> None:
    model = models.create("resnet50", width=2, num_classes=10)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    _, state = jax.eval_shape(lambda v, x: model.apply(
        v, x, capture_intermediates=responses.follows_3x3_conv, mutable=["intermediates"]),
        variables, x)
    paths = {"/".join(str(p.key) for p in path[:-2])
             for path, _ in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]}
    want = {f"stage{k + 1}/block{i}/bn2" for k, n in enumerate((3, 4, 6, 3)) for i in range(n)}
    assert paths == want  # no 7x7 stem BN, no 1x1 (bn1, bn3, shortcut) BN


def test_depth_then_responses_commands(tmp_path: Path) -> None:
    work = tmp_path / "study"
    args = ["depth", f"--config={ROOT}/configs/digits.py", "--archs=cifar_plain,cifar_resnet",
            "--steps=2", f"--workdir={work}", "--config.model_kwargs.depth=8",
            "--config.model_kwargs.width=4", "--config.batch_size=32"]
    run = _cli(*args, "--jobs=2", cwd=tmp_path)  # one lane per net, each on its own core
    assert run.returncode == 0, run.stderr[-3000:]
    assert "lane 0: cifar_plain on CPU cores" in run.stdout
    assert "lane 1: cifar_resnet on CPU cores" in run.stdout
    assert "cifar_resnet: training in" in (work / "lane1.log").read_text()
    full = config_module("digits").get_config().num_train_steps
    assert f"schedule scaled from {full} to 2 steps" in run.stdout
    md = (work / "depth.md").read_text()
    assert f"Schedule scaled from {full} to 2 steps" in md and "cifar_resnet" in md
    assert (work / "fig6.png").read_bytes()[:4] == b"\x89PNG"
    rows = _rows(work / "depth.csv")
    assert [r["net"] for r in rows] == ["cifar_plain", "cifar_resnet"]
    for r in rows:
        records = metrics_lib.read_jsonl(str(work / r["net"] / "metrics.jsonl"))
        assert float(r["test_error"]) == pytest.approx(100 * records[-1]["test_error"], abs=5e-3)
        train = [x for x in records if "train_error" in x][-1]["train_error"]
        assert float(r["train_error"]) == pytest.approx(100 * train, abs=5e-3)
        assert r["steps"] == "2" and r["paper_test_error"] == ""  # digits: no paper number

    again = _cli(*args, cwd=tmp_path)  # complete runs are skipped, not retrained
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("complete (2 steps), skipped") == 2

    run = _cli("responses", f"--workdir={work}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (work / "fig7.png").read_bytes()[:4] == b"\x89PNG"
    rows = _rows(work / "responses.csv")
    for net in ("cifar_plain", "cifar_resnet"):
        mine = [r for r in rows if r["net"] == net]
        model, variables = resnet_jax.load(str(work / net))
        config = depth.load_study_config(str(work / net))
        stream = data.create(config, "eval", seed=config.seed)
        pre = make_preprocess(config)  # uint8 batches: the run's mean subtraction first
        want = _direct_stds(model, variables, [pre(b) for b in stream])
        stream.close()
        assert [r["layer"] for r in mine] == list(want)  # stem + 3 blocks x 2
        np.testing.assert_allclose([float(r["std"]) for r in mine], list(want.values()),
                                   rtol=1e-4)
        ranks = sorted(mine, key=lambda r: int(r["rank"]))
        assert [float(r["std"]) for r in ranks] == sorted((float(r["std"]) for r in mine),
                                                          reverse=True)


def test_tables_command_equals_summary(tmp_path: Path) -> None:
    run = _cli("tables", f"--out={tmp_path}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    md = (tmp_path / "tables.md").read_text()
    assert "ResNet-34 / VGG-19 multiply-adds: 18.7% here" in md
    for name, want_nets in (("table1", ["resnet18", "resnet34", "resnet50", "resnet101",
                                        "resnet152", "vgg19"]),
                            ("table6", ["resnet20", "resnet32", "resnet44", "resnet56",
                                        "resnet110", "resnet1202"])):
        rows = _rows(tmp_path / f"{name}.csv")
        assert [r["net"] for r in rows] == want_nets
        for r in rows:
            s = summary.summarize(r["net"])
            assert (int(r["params"]), int(r["mult_adds"])) == (s.params, s.mult_adds)
            assert int(r["layers"]) == int(r["net"].removeprefix("resnet").removeprefix("vgg"))
    t1 = {r["net"]: r for r in _rows(tmp_path / "table1.csv")}
    assert float(t1["vgg19"]["paper_mult_adds"]) == 19.6e9
    assert int(t1["vgg19"]["mult_adds"]) == 19_632_062_464  # 16 convs + 3 fc at 224
    assert int(t1["vgg19"]["params"]) == 143_667_240  # as torchvision's vgg19
    t6 = {r["net"]: r for r in _rows(tmp_path / "table6.csv")}
    assert float(t6["resnet1202"]["paper_params"]) == 19.4e6


def test_vgg19_contract() -> None:
    model = models.create("vgg19", width=4, fc_features=8, num_classes=10)
    x = np.zeros((2, 32, 32, 3), np.float32)
    variables = model.init(jax.random.key(0), x, train=False)
    assert set(variables) == {"params"} and len(variables["params"]) == 19
    logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"],
                            bn_axis_name=None)
    assert logits.shape == (2, 10)
    bn = models.create("vgg19", width=4, fc_features=8, num_classes=10, use_bn=True)
    assert "batch_stats" in bn.init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match="unknown VGG override"):
        models.create("vgg19", shortcut="A")


def test_a_failing_lane_is_one_line_with_its_status(tmp_path: Path) -> None:
    run = _cli("depth", f"--config={ROOT}/configs/digits.py", "--archs=cifar_plain,cifar_resnet",
               "--steps=2", f"--workdir={tmp_path}", "--config.model_kwargs.depth=8",
               "--config.dataset=cifar10", "--config.data.archive=/nonexistent/c10.tar.gz",
               "--jobs=2", cwd=tmp_path)
    assert run.returncode == 2, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: lane 0 (cifar_plain): CIFAR "
                                                     "archive '/nonexistent/c10.tar.gz' not found")
    assert "--config.data.archive=/path/to/cifar-10-python.tar.gz" in errors[0]
    assert "Traceback" not in (tmp_path / "lane1.log").read_text()


def test_responses_use_single_views() -> None:
    c = config_module("imagenet_studies").get_config("resnet34_C")
    assert c.data.eval_protocol == "ten_crop"
    single, note = responses.single_view(c)
    assert single.data.eval_protocol == "center" and "'ten_crop' -> 'center'" in note
    assert c.data.eval_protocol == "ten_crop"  # the run's own config is left as it was
    assert single.to_dict() == {**c.to_dict(), "data": {**c.data.to_dict(),
                                                          "eval_protocol": "center"}}
    same = config_module("cifar10").get_config("resnet20")
    assert responses.single_view(same) == (same, "")


def test_lanes_balance_depth_and_keep_every_other_flag() -> None:
    archs = ["plain20", "plain56", "resnet20", "resnet56"]
    assert depth.split_lanes(archs, 2) == [["plain56", "plain20"], ["resnet56", "resnet20"]]
    assert depth.split_lanes(archs, 1) == [["plain56", "resnet56", "plain20", "resnet20"]]
    assert depth.split_lanes(["resnet110", "resnet20", "resnet32"], 2) == [
        ["resnet110"], ["resnet32", "resnet20"]]
    assert depth.split_lanes(["plain20"], 4) == [["plain20"]]
    with pytest.raises(ValueError, match="--jobs must be >= 1"):
        depth.split_lanes(archs, 0)
    argv = ["depth", "--config=c.py", "--archs", "plain20,plain56", "--jobs=2", "--steps=10",
            "--config.data.archive=/x y.tar.gz", "--train_only", "--jobs", "2", "--workdir=W"]
    assert depth.lane_argv(argv, ["plain56"]) == [
        "depth", "--config=c.py", "--steps=10", "--config.data.archive=/x y.tar.gz",
        "--workdir=W", "--archs=plain56", "--jobs=1", "--train_only"]
    cores = len(os.sched_getaffinity(0))
    shares = depth.cpu_shares(cores)
    assert sorted(c for s in shares for c in s) == sorted(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match=f"pass --jobs {cores} or fewer"):
        depth.cpu_shares(cores + 1)


def test_scale_schedule_is_proportional() -> None:
    c = config_module("cifar10").get_config("resnet110")
    note = depth.scale_schedule(c, 2_000)
    assert (c.num_train_steps, tuple(c.lr_boundaries)) == (2_000, (1_000, 1_500))  # 0.5N, 0.75N
    assert c.warmup_steps == 400 and "warm-up kept at 400" in note
    assert "(32000, 48000) -> (1000, 1500)" in note
    with pytest.raises(ValueError, match="counts epochs"):
        depth.scale_schedule(config_module("imagenet").get_config("resnet50"), 100)


def test_study_config_change_is_refused(tmp_path: Path) -> None:
    c = config_module("digits").get_config()
    depth.check_study_config(c, str(tmp_path))
    c.num_train_steps = 5  # resume-safe: a longer or shorter run of the same recipe
    depth.check_study_config(c, str(tmp_path))
    c.learning_rate = 0.2
    with pytest.raises(ValueError, match=r"another config \(fields \['learning_rate'\]\)"):
        depth.check_study_config(c, str(tmp_path))


def test_study_configs() -> None:
    studies = config_module("imagenet_studies")
    assert set(studies.STUDIES) == set(studies.PAPER_ERROR)
    for name, (arch, shortcut) in studies.STUDIES.items():
        c = studies.get_config(name)
        config_lib.validate(c)
        assert (c.model, c.model_kwargs.shortcut, c.data.eval_protocol) == (arch, shortcut,
                                                                           "ten_crop")
        assert str(studies.PAPER_ERROR[name][0]) in studies.__doc__
    assert studies.get_config("resnet34_C").batch_size == 256
    cpu = config_module("cifar10_cpu_depth")
    c = cpu.get_config("resnet56")
    config_lib.validate(c)
    assert (c.batch_size, c.num_train_steps, tuple(c.lr_boundaries), c.learning_rate) == (
        128, 2_000, (1_500, 1_900), 0.1)
    assert "python -m resnet_jax.experiments depth --config configs/cifar10_cpu_depth.py" in (
        cpu.__doc__)
