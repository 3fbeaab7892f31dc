"""Set up a run (mesh, model, sharded state, compiled steps) and train it, top to bottom."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from engine.checkpoint import Checkpoints, restore_params
from engine.config import Config, ConfigError, TrainingHalted, validate
from engine.data import make_task, prefetch
from engine.distributed import is_primary
from engine.metrics import MetricsWriter, mfu, peak_flops, peak_memory_gb, planned_memory_gb
from engine.optim import make_optimizer
from engine.precision import POLICIES, LossScale
from engine.profile import StepTrace
from engine.step import TrainState, make_eval_step, make_train_step
from models import Llama, MLPClassifier
from sharding import (
    RULE_PRESETS,
    PipelineConfig,
    apply_pipeline,
    axis_rules,
    batch_sharding,
    bubble,
    check_divisible,
    describe_mesh,
    make_mesh,
    mesh_flags,
    tree_shardings,
)


def build_model(cfg: Config, rngs: nnx.Rngs, stages: int = 1) -> nnx.Module:
    """The model, with its layers split into `stages` pipeline stages when there are several."""
    if cfg.task == "digits":
        return MLPClassifier(cfg.classifier, rngs)
    model = Llama(cfg.model, rngs)
    if stages > 1:
        apply_pipeline(model, stages, cfg.pipeline)
    return model


def flops_per_token(cfg: Config) -> float:
    model_cfg = cfg.classifier if cfg.task == "digits" else cfg.model
    return model_cfg.flops_per_token(cfg.data.seq_len)


@dataclasses.dataclass
class Run:
    """Everything a training loop needs, built once from a config."""

    cfg: Config
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    state: TrainState
    state_shardings: Any
    batch_shardings: dict[str, jax.sharding.NamedSharding]
    train_step: Any  # compiled: (state, batch) -> (state, metrics)
    eval_step: Any  # compiled: (params, batch) -> sums
    task: Any
    compile_s: float
    rows: range  # the rows of each global batch that this process's devices hold

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """One global array per key from this process's rows (or from the whole batch)."""
        size = self.cfg.batch_size
        if len(next(iter(batch.values()))) == size != len(self.rows):
            batch = {k: v[self.rows.start : self.rows.stop] for k, v in batch.items()}
        return {
            k: jax.make_array_from_process_local_data(
                self.batch_shardings[k], v, (size, *v.shape[1:])
            )
            for k, v in batch.items()
        }


def process_rows(sharding: NamedSharding, shape: tuple[int, ...]) -> range:
    """The rows of a global batch of `shape` that this process's devices hold: one contiguous
    block, since devices are laid out process by process along the mesh."""
    index = sharding.devices_indices_map(shape)
    spans = {index[d][0].indices(shape[0])[:2] for d in sharding.addressable_devices}
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    if sum(b - a for a, b in spans) != hi - lo:
        raise ConfigError(
            f"This process's devices hold rows {sorted(spans)} of the batch, not one block; "
            "order the mesh so that data-parallel axes come before tensor/pipeline ones."
        )
    return range(lo, hi)


def _check_batch(cfg: Config, sharding: jax.sharding.NamedSharding, stages: int) -> None:
    """The global batch must split into accumulation steps, those into pipeline microbatches,
    and each of those over the data-parallel devices."""
    axes = sharding.spec[0] or ()
    axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a != "pipeline")
    ways = int(np.prod([sharding.mesh.shape[a] for a in axes]))
    accum = cfg.optim.microbatches
    pipe = cfg.pipeline.microbatches_for(stages) if stages > 1 else 1
    if cfg.batch_size % (accum * pipe * ways) == 0:
        return
    splits = [f"{ways} data-parallel shards ({mesh_flags(sharding.mesh, axes) or '1 device'})"]
    if pipe > 1:
        splits.insert(0, f"{pipe} pipeline microbatches (--pipeline.microbatches={pipe})")
    if accum > 1:
        splits.insert(0, f"{accum} accumulation steps (--optim.microbatches={accum})")
    raise ConfigError(
        f"--batch_size={cfg.batch_size} does not split into {' x '.join(splits)}; use a batch "
        f"size that is a multiple of {accum * pipe * ways}."
    )


def _check_attention(cfg: Config, mesh: jax.sharding.Mesh) -> None:
    if cfg.task != "lm" or cfg.model.attention != "cudnn":
        return
    platform = mesh.devices.flat[0].platform
    if platform not in ("gpu", "cuda"):  # jax names CUDA devices "gpu"
        raise ConfigError(
            f"--model.attention=cudnn runs on NVIDIA GPUs only, and these devices are {platform}; "
            "use --model.attention=xla."
        )
    if POLICIES[cfg.precision].compute_dtype == jnp.float32:
        raise ConfigError(
            f"--model.attention=cudnn takes 16-bit inputs, and --precision={cfg.precision} "
            "computes in float32; use --precision=bf16 (or --model.attention=xla)."
        )


def setup(cfg: Config, devices: list[jax.Device] | None = None, init: bool = True) -> Run:
    """Mesh, sharded initial state and the once-compiled train and eval steps.

    `devices` defaults to all; the mesh must use exactly these. With `init=False` the state stays
    abstract (shapes and shardings only): enough to compile and read `memory_analysis()` for
    models that would not fit here.
    """
    validate(cfg)
    mesh = make_mesh(cfg.mesh, devices)
    _check_attention(cfg, mesh)
    stages = mesh.shape["pipeline"]
    if stages > 1 and cfg.task != "lm":
        raise ConfigError(
            f"--mesh.pipeline={stages} needs a model with a stack of layers (--task=lm); "
            f"--task={cfg.task} has none to split, so use --mesh.pipeline=1."
        )
    if stages == 1 and cfg.pipeline != PipelineConfig():
        print("warning: --pipeline.* has no effect with --mesh.pipeline=1.", file=sys.stderr)
    rules = RULE_PRESETS[cfg.rules]
    policy = POLICIES[cfg.precision]
    tx, schedule = make_optimizer(cfg.optim, cfg.steps)

    # Shapes and logical names first (no memory), so a bad mesh fails before any allocation.
    abstract_model = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(cfg.seed), stages))
    graphdef, abstract_params = nnx.split(abstract_model)
    check_divisible(abstract_params, mesh, rules)

    def init_fn() -> TrainState:
        params = nnx.state(build_model(cfg, nnx.Rngs(cfg.seed), stages))
        loss_scale = LossScale.create() if policy.loss_scaling else None
        return TrainState(jnp.int32(0), params, tx.init(params), loss_scale)

    task = make_task(cfg.task, cfg.data, cfg.batch_size, cfg.seed)
    if cfg.task == "lm" and task.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"--data.source={cfg.data.source} has {task.vocab_size} token ids but "
            f"--model.vocab_size={cfg.model.vocab_size}; set --model.vocab_size="
            f"{task.vocab_size} or more."
        )
    example = task.train_batch(0)
    batch_shardings = {k: batch_sharding(mesh, rules, v.ndim) for k, v in example.items()}
    _check_batch(cfg, batch_shardings["inputs"], stages)
    abstract_batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_shardings[k])
        for k, v in example.items()
    }

    abstract_state = jax.eval_shape(init_fn)
    state_shardings = tree_shardings(abstract_state, mesh, rules)
    state = abstract_state
    if init:
        with jax.set_mesh(mesh), axis_rules(rules):
            state = jax.jit(init_fn, out_shardings=state_shardings)()

    chunks = cfg.model.loss_chunks if cfg.task == "lm" else 1
    train_fn = make_train_step(
        graphdef, tx, schedule, policy, cfg.optim.clip_norm, cfg.optim.microbatches,
        batch_shardings["inputs"], skip_nonfinite=cfg.nan_policy == "skip", loss_chunks=chunks,
    )  # fmt: skip
    eval_fn = make_eval_step(graphdef, policy, chunks)
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
    return Run(
        cfg=cfg, mesh=mesh, graphdef=graphdef, state=state, state_shardings=state_shardings,
        batch_shardings=batch_shardings, train_step=train_step, eval_step=eval_step, task=task,
        compile_s=compile_s, rows=process_rows(batch_shardings["inputs"], example["inputs"].shape),
    )  # fmt: skip


def evaluate(run: Run) -> dict[str, float]:
    totals = {"loss_sum": 0.0, "count": 0.0, "correct": 0.0}
    for batch in run.task.eval_iter(run.rows):
        sums = jax.device_get(run.eval_step(run.state.params, run.put_batch(batch)))
        totals = {k: totals[k] + float(sums[k]) for k in totals}
    loss = totals["loss_sum"] / totals["count"]
    result = {"eval_loss": loss, "eval_accuracy": totals["correct"] / totals["count"]}
    if run.cfg.task == "lm":
        result["eval_bits_per_byte"] = loss / math.log(2)
    return result


class StopSignal:
    """SIGTERM / SIGINT ask the loop to finish its step, save and exit 0 (preemption, Ctrl-C)."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers live there only
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _poison(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    mask = batch["mask"].astype(np.float32)  # a copy
    mask.flat[0] = np.nan
    return {**batch, "mask": mask}


def train(cfg: Config, devices: list[jax.Device] | None = None) -> list[dict]:
    """Train to `cfg.steps`, resuming from the newest checkpoint in `run_dir` if there is one;
    returns the records of the steps run here (also in metrics.jsonl)."""
    if cfg.init_from_hf:
        from engine import hf

        cfg = hf.model_config(cfg)
    run = setup(cfg, devices)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = None
    if cfg.checkpoint.every or (run_dir / "checkpoints").is_dir():
        ckpt = Checkpoints(run)
    start = 0
    restored = ckpt.restore_latest() if ckpt else None
    if restored:
        run.state, start = restored.state, restored.step
    elif cfg.init_from:
        run.state = dataclasses.replace(run.state, params=restore_params(cfg.init_from, run))
    elif cfg.init_from_hf:
        from engine import hf

        run.state = dataclasses.replace(run.state, params=hf.restore_params(cfg.init_from_hf, run))
    primary = is_primary()  # process 0 alone writes metrics, logs and the config
    log = tqdm.write if primary else _silent
    if primary:
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    n_devices = run.mesh.size
    peak = cfg.peak_flops or peak_flops()
    fpt = flops_per_token(cfg)
    tokens_per_step = cfg.batch_size * run.task.tokens_per_example
    params = sum(x.size for x in jax.tree.leaves(run.state.params))
    processes = f" | {jax.process_count()} processes" if jax.process_count() > 1 else ""
    planned = planned_memory_gb(run.train_step)
    plan = f" | step needs {planned:.2f} GB/device" if planned is not None else ""
    log(
        f"shardtrain: {cfg.task} | {params / 1e6:.2f}M params | mesh {describe_mesh(run.mesh)}"
        f"{processes} | {_pipeline_summary(cfg, run.mesh.shape['pipeline'])}{cfg.precision} | "
        f"compiled in {run.compile_s:.1f}s{plan}"
    )
    local_devices = [d for d in run.mesh.devices.flat if d.process_index == jax.process_index()]
    if restored:
        log(f"resumed from step {start} ({restored.path})")
    elif cfg.init_from or cfg.init_from_hf:
        log(f"initialized params from {cfg.init_from or cfg.init_from_hf}")

    writer = MetricsWriter(run_dir, cfg.log.tensorboard and primary, start, enabled=primary)
    # One process alone must not stop: multi-process runs stop at JAX's preemption sync point.
    stop = StopSignal() if jax.process_count() == 1 else None
    records, skipped_in_a_row, saved = [], 0, start
    # disable=None: a bar on terminals only, so redirected logs keep just the summary lines.
    bar = tqdm(
        initial=start,
        total=cfg.steps,
        disable=None if cfg.log.progress and primary else True,
        unit="step",
    )
    batches = prefetch(run.task, range(start, cfg.steps), run.rows, cfg.data.prefetch)
    trace = StepTrace(cfg.run_dir, cfg.log.profile_from if primary else 0, cfg.log.profile_steps)
    last = time.perf_counter()
    try:
        for step in range(start, cfg.steps):
            done = step + 1
            waited = time.perf_counter()
            batch = next(batches)
            data_wait = time.perf_counter() - waited
            if done in cfg.debug.nan_steps:
                batch = _poison(batch)
            with trace.annotate(done):
                run.state, metrics = run.train_step(run.state, run.put_batch(batch))
                # Waiting on every step keeps timing honest (and CPU collectives from piling up).
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.perf_counter()
            step_time, last = now - last, now
            for line in trace.finish(done, step_time):
                log(line)
            record = {
                "step": done,
                **metrics,
                "step_time_s": step_time,
                "data_wait_s": data_wait,
                "tokens_per_sec": tokens_per_step / step_time,
                "mfu": mfu(fpt, tokens_per_step / step_time, n_devices, peak),
                "peak_memory_gb": peak_memory_gb(local_devices),
            }
            if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):
                writer.write(record)
                skipped_in_a_row += 1
                _check_nonfinite(cfg, done, record, skipped_in_a_row, saved, ckpt)
            else:
                skipped_in_a_row = 0
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
                record.update(evaluate(run))
                last = time.perf_counter()  # evaluation time is not the next step's
            if (done % cfg.log.every == 0 or "eval_loss" in record) and skipped_in_a_row == 0:
                writer.write(record)
            records.append(record)
            bar.update()
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if done % cfg.log.summary_every == 0 or done == cfg.steps:
                log(_summary(record))
            if ckpt and cfg.checkpoint.every and done % cfg.checkpoint.every == 0:
                ckpt.save(done, run.state)
                saved = done
            preempted = ckpt is not None and ckpt.reached_preemption(done)
            received = stop and stop.received
            if received or preempted:
                if ckpt and saved != done:
                    ckpt.save(done, run.state)
                log(_stopped(received or "preemption", done, ckpt))
                return records
        if ckpt and cfg.checkpoint.every and saved != cfg.steps and start < cfg.steps:
            ckpt.save(cfg.steps, run.state)
        if start >= cfg.steps:
            log(f"nothing to do: the run in {run_dir} already reached step {cfg.steps}")
        return records
    finally:
        # Whatever stops the loop, the checkpoint being written completes before exit.
        if ckpt:
            ckpt.wait()
            ckpt.close()
        if stop:
            stop.restore()
        trace.close()
        bar.close()
        writer.close()


def _silent(*args, **kwargs) -> None:
    pass


def _check_nonfinite(cfg: Config, step: int, record: dict, in_a_row: int, saved: int, ckpt):
    """Halt on a non-finite step unless --nan_policy=skip allows one more."""
    what = f"step {step}: loss {record['loss']}, grad_norm {record['grad_norm']}"
    kept = f"the last good checkpoint is step {saved}" if ckpt and saved else "no checkpoint"
    if cfg.nan_policy == "halt":
        raise TrainingHalted(
            f"{what} is not finite; halted (--nan_policy=halt) without saving this state, "
            f"{kept}. Lower --optim.lr or raise --optim.warmup_steps, or pass "
            "--nan_policy=skip to drop such steps."
        )
    if in_a_row >= cfg.nan_skip_limit:
        raise TrainingHalted(
            f"{what} makes {in_a_row} non-finite steps in a row; halted "
            f"(--nan_skip_limit={cfg.nan_skip_limit}), {kept}."
        )
    tqdm.write(f"warning: {what} is not finite; update skipped (--nan_policy=skip)")


def _stopped(reason: str, step: int, ckpt) -> str:
    if ckpt is None:
        return f"{reason}: stopped after step {step}; checkpointing is off, nothing saved"
    return (
        f"{reason}: stopped after step {step}, checkpoint saved in {ckpt.directory / str(step)}; "
        "run the same command to resume"
    )


def _pipeline_summary(cfg: Config, stages: int) -> str:
    if stages == 1:
        return ""
    repeats, micro = cfg.pipeline.repeats, cfg.pipeline.microbatches_for(stages)
    return (
        f"{stages} stages x {repeats} repeats, {micro} microbatches, "
        f"bubble {100 * bubble(stages, repeats, micro):.0f}% | "
    )


def _summary(r: dict) -> str:
    line = (
        f"step {r['step']:>6} | loss {r['loss']:.4f} | grad_norm {r['grad_norm']:.3f} | "
        f"lr {r['lr']:.2e} | {r['step_time_s'] * 1e3:.0f} ms/step | "
        f"{r['tokens_per_sec']:,.0f} tok/s"
    )
    if r["mfu"] is not None:
        line += f" | MFU {100 * r['mfu']:.1f}%"
    if r["peak_memory_gb"] is not None:
        line += f" | peak mem {r['peak_memory_gb']:.1f} GB"
    if "eval_loss" in r:
        line += f" | eval_loss {r['eval_loss']:.4f} | eval_acc {r['eval_accuracy']:.3f}"
    if "eval_bits_per_byte" in r:
        line += f" | {r['eval_bits_per_byte']:.3f} bpb"
    return line
