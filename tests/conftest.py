"""Shared fixtures. JAX runs on CPU; multi-device tests run in subprocesses with
XLA_FLAGS=--xla_force_host_platform_device_count=N so this process keeps one device."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
