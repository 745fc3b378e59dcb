"""Shared test helpers (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import ml_collections

from resnet_jax import data

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def config_module(name: str) -> Any:
    """``configs/<name>.py`` as a module (``.get_config(arch)``; configs/ is no package)."""
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def data_config(
    dataset: str = "synthetic", *, batch_size: int = 4, eval_batch_size: int = 4,
    **data_fields: Any,
) -> ml_collections.ConfigDict:
    """The run-config fields the data package reads, with ``data`` overrides; in-process
    (``workers=0``) unless asked, as worker processes cost ~1 s each to start."""
    d = data.default_config()
    d.workers = 0
    d.update(data_fields)
    return ml_collections.ConfigDict(
        dict(dataset=dataset, batch_size=batch_size, eval_batch_size=eval_batch_size, data=d)
    )


def override(config: ml_collections.ConfigDict, **fields: Any) -> ml_collections.ConfigDict:
    """Sets dotted fields (``**{"data.on_device": True}``) on ``config``; returns it."""
    for key, value in fields.items():
        target = config
        *parents, leaf = key.split(".")
        for part in parents:
            target = target[part]
        target[leaf] = value
    return config


def onednn_status() -> tuple[bool, str]:
    """(whether the oneDNN extension builds and loads here, why not). Under
    ``RESNET_JAX_REQUIRE_ONEDNN=1`` (CI) an unavailable extension is an error, not a skip."""
    import os

    from resnet_jax.errors import ExtensionUnavailable
    from resnet_jax.ops import onednn

    try:
        onednn.load()
    except ExtensionUnavailable as e:
        if os.environ.get("RESNET_JAX_REQUIRE_ONEDNN") == "1":
            raise RuntimeError(f"RESNET_JAX_REQUIRE_ONEDNN=1 but the oneDNN extension is "
                               f"unavailable: {e}") from e
        return False, str(e)
    return True, ""


def run_on_cpu_devices(script: str, devices: int, *args: str, timeout: int = 300) -> str:
    """Run ``python -c script *args`` with the host CPU split into ``devices`` JAX devices (the
    flag must be set before JAX starts, hence a process of its own); asserts it exits 0 and
    prints "ok" last; returns its stdout."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
    return done.stdout
