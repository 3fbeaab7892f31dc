"""Estimates from shapes alone: compile a config's train step for a plan without opening data
or allocating the state, and read XLA's memory plan. The one memory sweep benchmarks use."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator

import jax

from engine.config import Config
from engine.metrics import planned_memory_gb
from engine.plan import Plan
from engine.setup import Run, setup


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Per-device GB of one compiled train step, by XLA's own plan."""

    state_gb: float  # params, optimizer state: each device's shards
    args_gb: float  # state + batch
    temp_gb: float  # activations and other temporaries
    total_gb: float  # inputs + outputs not aliased to donated inputs + temporaries
    compile_s: float


def compile_abstract(
    cfg: Config, plan: Plan | None = None, devices: list[jax.Device] | None = None
) -> Run:
    """`cfg`'s train step compiled for `plan` on `devices` (default all), from shapes alone: no
    data opened, no state allocated (`run.state` holds ShapeDtypeStructs), no eval step."""
    return setup(cfg, devices, init=False, plan=plan, evaluate=False)


def memory(run: Run) -> MemoryEstimate:
    m = run.train_step.memory_analysis()
    state = sum(
        math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
        for x, s in zip(
            jax.tree.leaves(run.state), jax.tree.leaves(run.state_shardings), strict=True
        )
    )
    return MemoryEstimate(
        state / 1e9,
        m.argument_size_in_bytes / 1e9,
        m.temp_size_in_bytes / 1e9,
        planned_memory_gb(run.train_step),
        run.compile_s,
    )


def memory_sweep(
    variants: Iterable[tuple[str, Config, list[jax.Device] | None]],
) -> Iterator[tuple[str, Run, MemoryEstimate]]:
    """(label, run, estimate) for each (label, config, devices): each compiled abstractly."""
    for label, cfg, devices in variants:
        run = compile_abstract(cfg, devices=devices)
        yield label, run, memory(run)
