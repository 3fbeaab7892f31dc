"""Multi-process runs on JAX's own distributed runtime (one process per host, or several local
processes for testing with `python -m engine.launch`).

Every process runs the same program on the same global mesh; `jax.distributed.initialize`
connects them through a coordinator (process 0). The coordination service's heartbeat bounds
how long survivors wait for a dead peer: they exit non-zero instead of hanging.
"""

from __future__ import annotations

import os

import jax

from engine.config import ConfigError, DistributedConfig

# Launchers that start one process per task and tell each its rank; JAX reads the rest itself.
_CLUSTER_ENV = {"SLURM_NTASKS": "SLURM", "OMPI_COMM_WORLD_SIZE": "Open MPI"}


def detected_cluster() -> str | None:
    for var, name in _CLUSTER_ENV.items():
        if int(os.environ.get(var, "1") or 1) > 1:
            return name
    return None


def initialize(cfg: DistributedConfig) -> None:
    """Join the distributed runtime if this is a multi-process run; no-op otherwise."""
    explicit = bool(cfg.coordinator_address) or cfg.num_processes > 1
    if not explicit and detected_cluster() is None:
        return
    if explicit and not (cfg.coordinator_address and cfg.num_processes > 1 and cfg.process_id >= 0):
        raise ConfigError(
            "A multi-process run needs all of --distributed.coordinator_address=HOST:PORT, "
            "--distributed.num_processes=N (> 1) and --distributed.process_id=I; got "
            f"'{cfg.coordinator_address}', {cfg.num_processes}, {cfg.process_id}."
        )
    if explicit and not 0 <= cfg.process_id < cfg.num_processes:
        raise ConfigError(
            f"--distributed.process_id={cfg.process_id} is outside 0..{cfg.num_processes - 1}; "
            "give each process a distinct id below --distributed.num_processes."
        )
    if jax.config.jax_platforms == "cpu" or os.environ.get("JAX_PLATFORMS") == "cpu":
        # CPU devices of different processes talk through gloo (the default is none).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if explicit:
        kwargs = dict(
            coordinator_address=cfg.coordinator_address,
            num_processes=cfg.num_processes,
            process_id=cfg.process_id,
        )
    jax.distributed.initialize(
        **kwargs,
        initialization_timeout=cfg.initialization_timeout_s,
        heartbeat_timeout_seconds=cfg.heartbeat_timeout_s,
    )


def is_primary() -> bool:
    """Process 0 alone writes metrics, logs and configs (every process writes its checkpoint
    shards)."""
    return jax.process_index() == 0
