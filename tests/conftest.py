import os

# Eight virtual CPU devices, before JAX is first imported: every mesh up to 8 runs on a laptop.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402

import pytest  # noqa: E402

from engine.config import PRESETS, Config  # noqa: E402
from sharding import MeshConfig  # noqa: E402


def tiny_config(run_dir, mesh: dict | None = None, **overrides) -> Config:
    """The `tiny` preset, quiet, on `mesh` (default: data parallel over all devices)."""
    base = PRESETS["tiny"]
    log = dataclasses.replace(base.log, progress=False, tensorboard=False, summary_every=10**6)
    mesh_cfg = MeshConfig(**{"data": -1 if not mesh else 1, **(mesh or {})})
    return dataclasses.replace(base, mesh=mesh_cfg, log=log, run_dir=str(run_dir), **overrides)


@pytest.fixture
def tiny(tmp_path):
    """`tiny(mesh=dict(data=2), steps=5, ...)` -> a quiet tiny config writing under tmp_path."""
    return lambda mesh=None, **overrides: tiny_config(tmp_path / "run", mesh, **overrides)
