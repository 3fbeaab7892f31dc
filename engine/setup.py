"""Set up a run: from a config and an execution plan to a mesh, a sharded train state and the
once-compiled train and eval steps. The loop that drives them is engine.trainer."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from engine.config import Config, ConfigError
from engine.data import TASKS, batch_shapes, make_task
from engine.family import build_model, model_arch, model_family
from engine.hostmem import prepare_cpu
from engine.optim import hyperparams, make_optimizer
from engine.plan import Plan, violations
from engine.precision import POLICIES, LossScale
from engine.step import TrainState, make_eval_step, make_train_step
from sharding import (
    axis_rules,
    batch_sharding,
    make_mesh,
    process_block,
    stages_of,
    tree_shardings,
)


@dataclasses.dataclass
class Run:
    """Everything a training loop needs, built once from a config and a plan."""

    cfg: Config
    plan: Plan
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    state: TrainState
    state_shardings: Any
    batch_shardings: dict[str, NamedSharding]
    train_step: Any  # compiled: (state, batch) -> (state, metrics)
    eval_step: Any  # compiled: (params, batch) -> sums; None from setup(evaluate=False)
    task: Any
    compile_s: float
    blocks: dict[str, tuple[slice, ...]]  # per batch key: this process's block of the array
    reused: bool = False  # the steps came from a StepCache: nothing was compiled here

    @property
    def rows(self) -> range:
        """The rows of each global batch that this process's devices hold."""
        first = self.blocks["inputs"][0]
        return range(first.start, first.stop)

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """One global array per key from this process's rows (or from the whole batch); of
        each row, only the columns this process's devices hold are sent."""
        size = self.cfg.batch_size
        whole = len(next(iter(batch.values()))) == size != len(self.rows)
        out = {}
        for k, v in batch.items():
            rows, *columns = self.blocks[k]
            shape = (size, *v.shape[1:])
            v = v[(rows if whole else slice(None), *columns)]
            out[k] = jax.make_array_from_process_local_data(self.batch_shardings[k], v, shape)
        return out


# Config keys no compiled program depends on: the optimizer's scalars are inputs of the step
# (engine.optim.hyperparams), the seed an input of the initializer, the rest the loop's.
RUNTIME_KEYS = (
    "optim.lr", "optim.warmup_steps", "optim.min_lr_ratio", "optim.b1", "optim.b2", "optim.eps",
    "optim.weight_decay", "optim.clip_norm", "steps", "seed", "run_dir", "eval_every",
    "checkpoint", "early_stop", "log", "debug", "compile_cache", "peak_flops", "init_from",
    "data.prefetch", "data.eval_batches", "data.cache_dir",
)  # fmt: skip


@dataclasses.dataclass
class Compiled:
    """What setup compiles for a config, plan and devices: the same for every run that differs
    from it only in RUNTIME_KEYS."""

    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    abstract_state: TrainState
    state_shardings: Any
    batch_shardings: dict[str, NamedSharding]
    init: Any  # jitted (compiled at its first call): (hyperparams, key) -> state
    train_step: Any
    eval_step: Any
    compile_s: float


class StepCache:
    """Compiled programs kept for the runs of one process (a hyper-parameter search): a run
    whose config differs from an earlier one only in RUNTIME_KEYS, on the same devices, reuses
    its programs without tracing or compiling anything."""

    def __init__(self):
        self._entries: dict[str, Compiled] = {}
        self.compiles = 0
        self.hits = 0

    @staticmethod
    def key(cfg: Config, plan: Plan, devices: list[jax.Device]) -> str:
        values = dataclasses.asdict(cfg)
        for dotted in RUNTIME_KEYS:
            *sections, name = dotted.split(".")
            section = values
            for part in sections:
                section = section[part]
            section.pop(name)
        ids = [d.id for d in devices]
        return json.dumps([values, repr(plan), ids], sort_keys=True, default=str)

    def get(self, key: str) -> Compiled | None:
        found = self._entries.get(key)
        self.hits += found is not None
        return found

    def put(self, key: str, compiled: Compiled) -> None:
        self._entries[key] = compiled
        self.compiles += 1


def setup(
    cfg: Config,
    devices: list[jax.Device] | None = None,
    init: bool = True,
    plan: Plan | None = None,
    task=None,
    cache: StepCache | None = None,
    evaluate: bool = True,
) -> Run:
    """Mesh, sharded initial state and the once-compiled train and eval steps.

    `plan` defaults to the one the config's keys give (Plan.from_config); `devices` to all,
    and the mesh must use exactly these; `task` (the data) to the config's (engine.data);
    `cache` keeps the compiled programs for later runs of this process.

    With `init=False` and no `task` nothing is allocated or opened: the state and batch stay
    abstract (shapes and shardings from the config alone) and `run.task` is None, enough to
    compile and read `memory_analysis()` for models that would not fit here; with
    `evaluate=False` as well, no eval step is compiled (`run.eval_step` is None; a quarter to a
    third of the compile time).
    """
    if cache is not None and not evaluate:
        raise ValueError("setup(evaluate=False) compiles no eval step: it cannot fill a cache")
    devices = list(jax.devices() if devices is None else devices)
    if devices[0].platform == "cpu" and (warning := prepare_cpu(len(devices))):
        print(f"warning: {warning}", file=sys.stderr)
    plan = (plan or Plan.from_config(cfg)).on(cfg, devices[0].platform)
    key = StepCache.key(cfg, plan, devices) if cache is not None else ""
    compiled = cache.get(key) if cache is not None else None
    reused = compiled is not None
    if not reused:
        problems = violations(cfg, plan, devices)
        if problems:
            raise problems[0]

    if task is None and not init:
        shapes = batch_shapes(cfg.task, cfg.data, cfg.batch_size)
    else:
        task = task or make_task(cfg.task, cfg.data, cfg.batch_size, cfg.seed)
        if cfg.task == "lm" and task.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"--data.source={cfg.data.source} has {task.vocab_size} token ids but "
                f"--model.vocab_size={cfg.model.vocab_size}; set --model.vocab_size="
                f"{task.vocab_size} or more."
            )
        shapes = {k: (v.shape, v.dtype) for k, v in task.train_batch(0).items()}
    names = task.batch_names if task is not None else TASKS[cfg.task].batch_names

    if not reused:
        compiled = _compile(cfg, plan, devices, shapes, names, evaluate)
        if cache is not None:
            cache.put(key, compiled)
    state = compiled.abstract_state
    if init:
        hparams = hyperparams(cfg.optim, cfg.steps)  # an input, so no program depends on them
        with jax.set_mesh(compiled.mesh), axis_rules(plan.rules):
            state = compiled.init(hparams, jax.random.key(cfg.seed))
    shardings = compiled.batch_shardings
    blocks = {k: process_block(shardings[k], shape) for k, (shape, _) in shapes.items()}
    return Run(
        cfg=cfg, plan=plan, mesh=compiled.mesh, graphdef=compiled.graphdef, state=state,
        state_shardings=compiled.state_shardings, batch_shardings=shardings,
        train_step=compiled.train_step, eval_step=compiled.eval_step, task=task,
        compile_s=0.0 if reused else compiled.compile_s, blocks=blocks, reused=reused,
    )  # fmt: skip


def _compile(
    cfg: Config, plan: Plan, devices, shapes: dict, names: dict, evaluate: bool
) -> Compiled:
    mesh = make_mesh(plan.mesh, devices, plan.axes)
    stages = stages_of(mesh)
    if stages == 1 and plan.pipeline != type(plan.pipeline)():
        print("warning: --pipeline.* has no effect with --mesh.pipeline=1.", file=sys.stderr)
    rules, policy = plan.rules, POLICIES[plan.precision]
    tx, _ = make_optimizer(cfg.optim, cfg.steps)

    # violations() already checked every parameter against the mesh, from these shapes.
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0), plan, stages)))

    def init_fn(hparams, key) -> TrainState:
        params = nnx.state(build_model(cfg, nnx.Rngs(key), plan, stages))
        loss_scale = LossScale.create() if policy.loss_scaling else None
        return TrainState(jnp.int32(0), params, tx.init(params), loss_scale, hparams)

    batch_shardings = {
        k: batch_sharding(mesh, rules, names[k][: len(shape)]) for k, (shape, _) in shapes.items()
    }
    abstract_batch = {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_shardings[k])
        for k, (shape, dtype) in shapes.items()
    }
    hparams = jax.eval_shape(lambda: hyperparams(cfg.optim, cfg.steps))
    abstract_key = jax.eval_shape(lambda: jax.random.key(0))
    abstract_state = jax.eval_shape(init_fn, hparams, abstract_key)
    state_shardings = tree_shardings(abstract_state, mesh, rules)

    family = model_family(cfg)
    chunks = plan.loss_chunks if family.sequence_model else 1
    train_fn = make_train_step(
        graphdef, policy, plan.microbatches, batch_shardings["inputs"],
        skip_nonfinite=cfg.nan_policy == "skip", loss_chunks=chunks,
        aux_weights=family.aux_weights(model_arch(cfg)), load_balance=plan.context_load_balance,
    )  # fmt: skip
    eval_fn = make_eval_step(graphdef, policy, chunks, plan.context_load_balance)
    replicated = NamedSharding(mesh, P())  # scalar metrics, readable on every host
    start = time.perf_counter()
    with jax.set_mesh(mesh), axis_rules(rules):
        # Lowered and compiled ahead of time: exactly one compilation per step function.
        train_step = (
            jax.jit(
                train_fn,
                in_shardings=(state_shardings, batch_shardings),
                out_shardings=(state_shardings, replicated),
                donate_argnums=0,
            )
            .lower(abstract_state, abstract_batch)
            .compile()
        )
        eval_step = None
        if evaluate:
            eval_step = (
                jax.jit(
                    eval_fn,
                    in_shardings=(state_shardings.params, batch_shardings),
                    out_shardings=replicated,
                )
                .lower(abstract_state.params, abstract_batch)
                .compile()
            )
    compile_s = time.perf_counter() - start
    return Compiled(
        mesh=mesh, graphdef=graphdef, abstract_state=abstract_state,
        state_shardings=state_shardings, batch_shardings=batch_shardings,
        init=jax.jit(init_fn, out_shardings=state_shardings),
        train_step=train_step, eval_step=eval_step, compile_s=compile_s,
    )  # fmt: skip
