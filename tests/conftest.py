import os
import tempfile

# The suite compiles a few hundred small programs and runs each for a handful of steps, so
# it spends most of its time in XLA:CPU's LLVM backend: level 1 compiles 20-35 % faster than
# the default (measured on `tiny`) and gave bit-identical losses. Tests only; never set by the
# engine.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=1"

# Eight virtual CPU devices, before JAX is first imported: every mesh up to 8 runs on a laptop.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), TEST_XLA_FLAGS, "--xla_force_host_platform_device_count=8"]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole suite, in-process and CLI runs alike (the
# command line's default --compile_cache yields to this variable): many tests compile the same
# reference run again. In-process JAX writes only programs that took a second or more to
# compile (its default): thousands of small eager-op programs on disk cost more than they save.
CLI_COMPILATION_CACHE = os.path.join(
    tempfile.gettempdir(), f"shardtrain-cli-jax-cache-{os.getuid()}"
)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CLI_COMPILATION_CACHE)

import dataclasses  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from engine.config import PRESETS, Config  # noqa: E402
from sharding import MeshConfig  # noqa: E402


def tiny_config(run_dir, mesh: dict | None = None, **overrides) -> Config:
    """The `tiny` preset, quiet, on `mesh` (default: data parallel over all devices)."""
    base = PRESETS["tiny"]
    log = dataclasses.replace(base.log, progress=False, tensorboard=False, summary_every=10**6)
    mesh_cfg = MeshConfig(**{"data": -1 if not mesh else 1, **(mesh or {})})
    # Library runs in tests keep no final checkpoint, so a second run in one directory starts
    # afresh; CLI runs keep the default (save at the end).
    overrides.setdefault("checkpoint", dataclasses.replace(base.checkpoint, final=False))
    return dataclasses.replace(base, mesh=mesh_cfg, log=log, run_dir=str(run_dir), **overrides)


@pytest.fixture
def tiny(tmp_path):
    """`tiny(mesh=dict(data=2), steps=5, ...)` -> a quiet tiny config writing under tmp_path."""
    return lambda mesh=None, **overrides: tiny_config(tmp_path / "run", mesh, **overrides)


ROOT = Path(__file__).resolve().parents[1]


def cli_env(devices: int = 8) -> dict[str, str]:
    """The environment of a CLI subprocess: `devices` virtual CPU devices, and one persistent
    compilation cache for all of them, since CLI runs compile the same small programs again and
    again (a hit returns the same executable: results unchanged, start-up halved)."""
    flags = f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}"
    env = dict(os.environ, XLA_FLAGS=flags)
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    return env


def cli(*args, devices=8, background=False, module="engine.train"):
    """`python -m MODULE ARGS` as a user runs it, with `devices` virtual CPU devices: the
    finished process, or with `background` the running one."""
    env = cli_env(devices)
    command = [sys.executable, "-m", module, *args]
    if background:
        pipe = subprocess.PIPE
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=pipe, stderr=pipe, text=True)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def assert_same_hf_tensors(a, b) -> None:
    """Two Hugging Face directories hold the same tensor names, dtypes and bytes."""
    from engine.hf import Checkpoint

    src, dst = Checkpoint(a), Checkpoint(b)
    assert src.weight_map.keys() == dst.weight_map.keys()
    for name in src.weight_map:
        x = src.files[src.weight_map[name]].get(name)
        y = dst.files[dst.weight_map[name]].get(name)
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), name


def jaxpr_equations(jaxpr):
    """Every equation of `jaxpr` and of the jaxprs inside it (scan, remat, shard_map, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from jaxpr_equations(sub)


def torch_logits(model, tokens):
    """A transformers model's fp32 logits for integer `tokens` (numpy)."""
    import torch

    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()
