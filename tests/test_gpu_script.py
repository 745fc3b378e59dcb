"""benchmarks/gpu.sh, the prepared device run, kept from rotting while no device is lent: its CPU
dry run end to end on a small archive in the official layout, the packer's lossless round trip
and one-line errors, the import check, the resume paths and the $OUT limits."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile

import pytest
from test_data_archive import known, write_archive

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
NAME = "cifar-10-python.tar.gz"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pack_cifar = _module("pack_cifar")
gpu_report = _module("gpu_report")


def gpu_sh(*args: str, env: dict[str, str] | None = None, timeout: int = 300):
    full = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          env=full, timeout=timeout, check=False)


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> pathlib.Path:
    """64 training and 32 test images in the official python layout."""
    return write_archive(tmp_path_factory.mktemp("cifar") / NAME, "cifar10", known(64, 10, 0),
                         known(32, 10, 1))


@pytest.mark.slow
def test_dry_run_runs_every_call_and_resumes(archive, tmp_path):
    top = tmp_path / "dry"
    # One benchmark (the training run's step) keeps it short; every command line is parsed below.
    env = {"CIFAR_ARCHIVE": str(archive), "GPU_BENCH": "r20_b128_jit"}
    r = gpu_sh("--dry-run", str(top), env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]

    # Each call saw only its own part; the last one joined them into the original, byte for byte.
    for i in (1, 2, 3):
        assert sorted(os.listdir(top / f"carry{i}" / "cifar")) == \
            [f"{NAME}.part{i}of3", f"{NAME}.parts.json"]
    assert sha256(top / "state" / "cifar" / NAME) == sha256(archive)
    assert "parts 1, 2, 3 of 3 staged (this call: 3); complete" in r.stdout

    # What each call leaves in $OUT, all within the device tool's limits (checked by the script).
    assert sorted(os.listdir(top / "call1")) == \
        ["bench.jsonl", "bench.log", "bench.md", "profile_smoke.json", "setup.log", "smoke.log"]
    assert sorted(os.listdir(top / "call3")) == \
        ["curves.png", "metrics.jsonl", "profile.json", "run.tar.gz", "setup.log", "summary.txt",
         "train.log"]
    bench = [json.loads(line) for line in (top / "call1" / "bench.jsonl").read_text().splitlines()]
    assert [b["name"] for b in bench] == ["r20_b128_jit"]
    assert all(b["images_per_second"] > 0 and b["backend"] == "cpu" for b in bench)
    assert "step 2: test error" in (top / "call1" / "smoke.log").read_text()

    # The profiled steps 1-2 of the smoke (call 1) and of the training run (call 3): host time
    # per step and device idle fraction, in range (the dry run's profile-check passed too).
    for name, log in (("call1/profile_smoke.json", "call1/smoke.log"),
                      ("call3/profile.json", "call3/train.log")):
        fig = json.loads((top / name).read_text())
        assert fig["steps"] == [1, 3] and fig["steps_seen"] == 2 and fig["platform"] == "cpu"
        assert 0 <= fig["idle"] <= 1 and fig["host_ms"] > 0 and fig["step_ms"] > 0, fig
        assert fig["device_events"] > 0 and list(fig["idle_per_device"]) == ["0"], fig
        assert f"profile: {gpu_report.profile_line(fig)}" in (top / log).read_text()
    line = gpu_report.profile_line(fig)  # the training run's, in its summary
    with tarfile.open(top / "call3" / "run.tar.gz") as tar:
        members = tar.getnames()
    assert "./profile_figures.json" in members and "./checkpoints" in members
    assert not [m for m in members if "plugins" in m], members

    summary = (top / "call3" / "summary.txt").read_text().strip()
    match = re.fullmatch(r"resnet20 on cifar10: test error (\d+\.\d\d)% \(paper 8\.75%\) after "
                         r"4/4 steps of batch 8; [\d,]+ images/s \(median of 2 logged "
                         r"intervals\); host [\d.]+ ms of a [\d.]+ ms step, device idle "
                         r"\d+\.\d% \(steps 1-2, cpu\); wall \d+ s in train\.py; 1 x cpu \(cpu\)",
                         summary)
    assert match and line in summary, summary
    records = [json.loads(line) for line in (top / "call3" / "metrics.jsonl").read_text()
               .splitlines()]
    assert f"{100 * records[-1]['test_error']:.2f}" == match.group(1)
    assert r.stdout.strip().endswith(summary)

    # The time limit stops train.py (exit 124) with a summary saying how to resume ...
    state = tmp_path / "state2"
    shutil.copytree(top / "state" / "parts", state / "parts")
    env = {"GPU_DRY": "1", "GPU_STATE": str(state), "GPU_CARRY": str(tmp_path / "none")}
    r = gpu_sh("train", str(tmp_path / "out_a"), env={**env, "TRAIN_LIMIT_S": "1"})
    assert r.returncode == 124, (r.stdout + r.stderr)[-3000:]
    assert re.search(r"INCOMPLETE at step 0/4 \(time limit 1 s\).*rerun `bash benchmarks/"
                     r"gpu.sh train` to resume", (tmp_path / "out_a" / "summary.txt").read_text())
    # ... and a fresh machine picks the run up from a carried run.tar.gz (call 3's workdir: its
    # checkpoints and metrics; train.py's own resume is tests/test_train_loop.py's).
    shutil.rmtree(state / "run")
    (tmp_path / "carry").mkdir()
    shutil.copy(top / "call3" / "run.tar.gz", tmp_path / "carry" / "run.tar.gz")
    r = gpu_sh("train", str(tmp_path / "out_b"),
               env={**env, "TRAIN_LIMIT_S": "1", "GPU_CARRY": str(tmp_path / "carry")})
    assert "resuming from the carried run.tar.gz" in r.stdout, (r.stdout + r.stderr)[-3000:]
    assert (state / "run" / "checkpoints").is_dir()
    resumed = (tmp_path / "out_b" / "summary.txt").read_text()
    assert f"test error {match.group(1)}% (paper 8.75%) after 4/4" in resumed
    # run.tar.gz carries no trace (plugins/), only the figures read from it in call 3.
    assert line in resumed and "before the workdir travelled without it" in \
        (tmp_path / "out_b" / "train.log").read_text()


def test_every_benchmark_command_line_parses():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import harness
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = subprocess.run(["bash", str(SCRIPT), "--list-bench"], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert len(out) == 8 and out[0].startswith("r20_b128_jit ")
    for line in out:
        name, limit, script, *args = line.split()
        assert (ROOT / "benchmarks" / script).is_file() and int(limit) > 0
        parser = argparse.ArgumentParser()
        harness.add_common_args(parser)
        parsed = parser.parse_args([*args, "--json"])
        assert parsed.arch in ("resnet20", "resnet50"), name


def test_missing_package_stops_with_one_line(tmp_path):
    shim = tmp_path / "shim" / "grain"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'portpicker'\", name='portpicker')\n")
    r = gpu_sh("check", str(tmp_path / "out"),
               env={"PYTHONPATH": str(shim.parent), "GPU_DRY": "1",
                    "GPU_STATE": str(tmp_path / "state"), "GPU_CARRY": str(tmp_path / "none")})
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert line == ("gpu.sh: missing Python packages: grain (ModuleNotFoundError: No module "
                     "named 'portpicker'); carry the wheels of benchmarks/gpu-wheels.txt in "
                     ".gpu/whl (`bash benchmarks/gpu.sh prepare` downloads them)"), line
    assert line in (tmp_path / "out" / "setup.log").read_text()


def test_call3_names_the_parts_that_did_not_arrive(tmp_path):
    src = tmp_path / NAME
    src.write_bytes(os.urandom(3000))
    pack_cifar.pack(str(src), str(tmp_path / "carry" / "cifar"), min_parts=3)
    for i in (1, 3):
        (tmp_path / "carry" / "cifar" / f"{NAME}.part{i}of3").unlink()
    r = gpu_sh("call3", str(tmp_path / "out"),
               env={"GPU_DRY": "1", "GPU_STATE": str(tmp_path / "state"),
                    "GPU_CARRY": str(tmp_path / "carry")})
    assert r.returncode == 3
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"gpu.sh: pack_cifar.py unpack: missing part 1 of 3 ({NAME}.part1of3)")
    assert f"missing part 3 of 3 ({NAME}.part3of3)" in line and "start again from call 1" in line
    assert "parts 2 of 3 staged (this call: 2); missing: 1, 3" in r.stdout


def test_wheels_pin_what_the_device_image_lacks():
    pinned = gpu_report._pinned()
    assert pinned == {"ml-collections", "tensorboardx", "grain", "array-record", "portpicker"}
    text = (ROOT / "benchmarks" / "gpu-wheels.txt").read_text()
    assert "--python-version 3.12" in text and all("==" in line for line in text.splitlines()
                                                  if line and not line.startswith("#"))
    assert "/.gpu/" in (ROOT / ".gitignore").read_text().split()


def test_pack_unpack_round_trip_is_lossless(tmp_path):
    src = tmp_path / NAME
    src.write_bytes(os.urandom(10_001))
    m = pack_cifar.pack(str(src), str(tmp_path / "parts"), max_mib=4_000 / 2**20)
    assert [p["size"] for p in m["parts"]] == [3334, 3334, 3333]  # the fewest, equal
    assert m["sha256"] == sha256(src) and m["size"] == 10_001
    dest = tmp_path / "out" / NAME
    pack_cifar.unpack(str(tmp_path / "parts"), str(dest))
    assert dest.read_bytes() == src.read_bytes()
    # --min-parts splits a small file anyway; an earlier packing's parts are removed.
    m = pack_cifar.pack(str(src), str(tmp_path / "parts"), min_parts=4)
    assert sorted(os.listdir(tmp_path / "parts")) == \
        sorted([f"{NAME}.part{i}of4" for i in range(1, 5)] + [f"{NAME}.parts.json"])
    pack_cifar.unpack(str(tmp_path / "parts"), str(tmp_path / "again"))
    assert (tmp_path / "again").read_bytes() == src.read_bytes()


@pytest.fixture
def packed(tmp_path):
    src = tmp_path / NAME
    src.write_bytes(os.urandom(3000))
    pack_cifar.pack(str(src), str(tmp_path / "parts"), min_parts=3)
    return tmp_path / "parts"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pack_cifar.py"), *args],
                          capture_output=True, text=True, check=False)


def test_unpack_names_the_missing_part(packed, tmp_path):
    (packed / f"{NAME}.part2of3").unlink()
    r = cli("unpack", str(packed), str(tmp_path / "x"))
    assert r.returncode == 1 and not (tmp_path / "x").exists()
    assert r.stderr == (f"pack_cifar.py unpack: missing part 2 of 3 ({NAME}.part2of3): not in "
                        f"{packed}\n")


def test_unpack_names_the_corrupt_part(packed, tmp_path):
    part = packed / f"{NAME}.part3of3"
    data = bytearray(part.read_bytes())
    data[7] ^= 1
    part.write_bytes(bytes(data))
    r = cli("unpack", str(packed), str(tmp_path / "x"))
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith(f"pack_cifar.py unpack: corrupt part 3 of 3 ({NAME}.part3of3): "
                               "sha256 ")
    part.write_bytes(bytes(data[:-1]))
    assert "corrupt part 3 of 3" in cli("unpack", str(packed), str(tmp_path / "x")).stderr
    assert "999 bytes, the manifest says 1000" in cli("unpack", str(packed), "x").stderr


def test_stash_keeps_parts_across_calls_and_refuses_a_corrupt_one(packed, tmp_path):
    stage = tmp_path / "stage"
    for i in (1, 3):
        carry = tmp_path / f"carry{i}"
        carry.mkdir()
        for f in (f"{NAME}.parts.json", f"{NAME}.part{i}of3"):
            shutil.copy(packed / f, carry / f)
        line = pack_cifar.stash(str(carry), str(stage))
    assert line == f"{NAME}: parts 1, 3 of 3 staged (this call: 3); missing: 2"
    r = cli("unpack", str(stage), str(tmp_path / "x"))
    assert r.stderr == f"pack_cifar.py unpack: missing part 2 of 3 ({NAME}.part2of3): not in " \
        f"{stage}\n"
    bad = tmp_path / "carry2"
    bad.mkdir()
    shutil.copy(packed / f"{NAME}.parts.json", bad)
    (bad / f"{NAME}.part2of3").write_bytes(b"\0" * 1000)
    r = cli("stash", str(bad), str(stage))
    assert r.returncode == 1 and r.stderr.startswith(
        f"pack_cifar.py stash: corrupt part 2 of 3 ({NAME}.part2of3): sha256 ")
    assert "(as carried)" in r.stderr and len(r.stderr.splitlines()) == 1


def test_out_check_applies_the_device_tools_limits(tmp_path):
    for i in range(8):
        (tmp_path / f"f{i}.txt").write_text("x")
    assert gpu_report.out_check(str(tmp_path)) == []
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.txt").write_text("x")
    (tmp_path / "bad name.txt").write_text("x")
    problems = " ".join(gpu_report.out_check(str(tmp_path)))
    assert "more than 2 folders down" in problems and "name not in" in problems
    assert "10 files" in problems


def _write_trace(workdir: pathlib.Path, platform: str, devices: int,
                 names: dict[tuple[int, int | None], str], spans: list[tuple]) -> None:
    """A ``jax.profiler``-style trace (Chrome trace JSON, gzipped) and the ProfileWindow
    manifest naming it; ``spans``: (pid, tid, name, ts µs, dur µs, args)."""
    events = [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": n}}
              for (pid, tid), n in names.items() if tid is None]
    events += [{"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": n}}
               for (pid, tid), n in names.items() if tid is not None]
    events += [{"ph": "X", "pid": p, "tid": t, "name": n, "ts": ts, "dur": d, "args": a}
               for p, t, n, ts, d, a in spans]
    run = workdir / "plugins" / "profile" / "2026_12_03_12_00_00"
    run.mkdir(parents=True)
    with gzip.open(run / "host.trace.json.gz", "wt") as f:
        json.dump({"displayTimeUnit": "ns", "traceEvents": events}, f)
    (workdir / "profile.json").write_text(json.dumps({
        "trace": "plugins/profile/2026_12_03_12_00_00/host.trace.json.gz", "steps": [5, 8],
        "platform": platform, "devices": devices, "annotation": "train_step"}))


def _steps(pid: int, tid: int) -> list[tuple]:
    return [(pid, tid, "train_step", 0, 2, {"step_num": "5"}),
            (pid, tid, "train_step", 10, 3, {"step_num": "6"}),
            (pid, tid, "train_step", 20, 4, {"step_num": "7"})]


def test_profile_reads_gpu_stream_events_only(tmp_path):
    names = {(1, None): "/host:CPU", (1, 10): "python", (2, None): "/device:GPU:0",
             (2, 20): "Stream #7(Kernel)", (2, 21): "Stream #9(MemcpyH2D)", (2, 22): "XLA Ops"}
    _write_trace(tmp_path, "gpu", 1, names, [
        *_steps(1, 10),
        (1, 10, "fusion.1", 0, 30, {"hlo_op": "fusion.1"}),  # host-side: not device activity
        (2, 22, "fusion.1", 0, 40, {}),                       # a derived line: not counted
        (2, 20, "k1", -5, 10, {}), (2, 20, "k2", 4, 4, {}),   # 0..8 once clipped and joined
        (2, 20, "k3", 12, 3, {}), (2, 21, "copy", 14, 4, {}),  # 12..18 across two streams
        (2, 20, "k4", 22, 8, {})])                            # 22..30: the window's end
    fig = gpu_report.profile_figures(str(tmp_path))
    assert fig["window_ms"] == pytest.approx(0.030) and fig["device_events"] == 5
    assert fig["device_busy_ms"] == {"0": pytest.approx(0.022)}
    assert fig["idle"] == pytest.approx(8 / 30) and fig["steps_seen"] == 3
    assert fig["host_ms"] == pytest.approx(0.003) and fig["step_ms"] == pytest.approx(0.010)
    assert gpu_report.profile_line(fig) == \
        "host 0.00 ms of a 0.01 ms step, device idle 26.7% (steps 5-7, gpu)"
    assert gpu_report.profile_check(str(tmp_path / "fig.json")).endswith("missing (gpu_report."
                                                                          "py profile did not "
                                                                          "write it)")
    assert gpu_report.main(["profile", str(tmp_path), "--json", str(tmp_path / "fig.json")]) == 0
    assert gpu_report.profile_check(str(tmp_path / "fig.json")) == ""
    # Saved in the workdir: a workdir that travelled without its trace reports those, noted.
    trace = tmp_path / "plugins" / "profile" / "2026_12_03_12_00_00" / "host.trace.json.gz"
    data = trace.read_bytes()
    trace.unlink()
    again, note = gpu_report.profile_report(str(tmp_path))
    assert again == json.loads((tmp_path / "fig.json").read_text()) and "travelled" in note
    (tmp_path / "profile_figures.json").write_text(json.dumps({**again, "trace": "other"}))
    with pytest.raises(gpu_report.ProfileError, match="not a readable gzipped JSON trace"):
        gpu_report.profile_report(str(tmp_path))  # figures of another trace: not used
    trace.write_bytes(data)
    fig["idle"] = 1.5
    (tmp_path / "bad.json").write_text(json.dumps(fig))
    assert "idle 1.5 outside [0, 1]" in gpu_report.profile_check(str(tmp_path / "bad.json"))
    fig["idle"], fig["host_ms"] = 0.5, None
    (tmp_path / "bad.json").write_text(json.dumps(fig))
    assert gpu_report.main(["profile-check", str(tmp_path / "fig.json"),
                            str(tmp_path / "bad.json")]) == 1


def test_profile_reads_cpu_thunks_per_device(tmp_path):
    names = {(1, None): "/host:CPU", (1, 10): "python", (1, 11): "tf_XLAPjRtCpuClient/1",
             (1, 12): "tf_XLAEigen/2"}
    op = {"hlo_op": "conv", "device_ordinal": "0"}
    _write_trace(tmp_path, "cpu", 3, names, [
        *_steps(1, 10),
        (1, 11, "conv", 1, 9, op), (1, 12, "conv", 2, 3, op),  # nested in one device: 1..10
        (1, 10, "small", 12, 2, op),                            # inline on the caller: 12..14
        (1, 11, "Wait for usage holds", 14, 10, {}),            # not an XLA thunk
        (1, 12, "dot", 5, 19, {"hlo_op": "dot", "device_ordinal": "1"})])  # 5..24
    fig = gpu_report.profile_figures(str(tmp_path))
    assert fig["window_ms"] == pytest.approx(0.024)  # the last step's end
    assert fig["device_busy_ms"] == {"0": pytest.approx(0.011), "1": pytest.approx(0.019),
                                     "2": 0.0}
    assert fig["idle_per_device"]["2"] == 1.0
    assert fig["idle"] == pytest.approx(1 - (11 + 19) / 24 / 3)


def test_profile_errors_name_the_fix(tmp_path, capsys):
    assert gpu_report.main(["profile", str(tmp_path)]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("gpu_report.py profile: no ") and \
        "set --config.profile_steps=START,STOP" in line
    names = {(1, None): "/host:CPU", (1, 10): "python"}
    _write_trace(tmp_path / "a", "gpu", 1, names, _steps(1, 10))
    with pytest.raises(gpu_report.ProfileError, match="no /device:GPU:N process with 'Stream #' "
                       r"lines \(was CUPTI found\?\)"):
        gpu_report.profile_figures(str(tmp_path / "a"))
    _write_trace(tmp_path / "b", "cpu", 1, names, _steps(1, 10)[:1])
    with pytest.raises(gpu_report.ProfileError, match="1 'train_step' step annotations, need 2"):
        gpu_report.profile_figures(str(tmp_path / "b"))
