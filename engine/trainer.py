"""The training loop, top to bottom, with callbacks; engine.setup builds what it drives.

    from engine.trainer import Callback, train
    class StopAtLoss(Callback):
        def on_eval(self, trainer, record):
            return record["eval_loss"] < 2.0     # True: save and stop the run here
    train(cfg, callbacks=[StopAtLoss()])

Early stopping (`--early_stop.*`, engine.callbacks.EarlyStopping) is such a callback, added
here when the config asks for it.

`Trainer(cfg, run=..., task=..., callbacks=...)` takes a prepared run (engine.setup.setup) and
its own data source (an object like engine.data.TextTask) too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from engine.callbacks import Callback, EarlyStopping, PlotCurves
from engine.checkpoint import Checkpoints, restore_params
from engine.config import Config, TrainingHalted
from engine.data import prefetch
from engine.distributed import is_primary
from engine.family import flops_per_token, model_family
from engine.metrics import (
    MetricsWriter,
    format_bytes,
    mfu,
    peak_flops,
    peak_memory_gb,
    planned_memory_gb,
)
from engine.plan import Plan
from engine.profile import StepTrace
from engine.setup import Run, setup
from engine.step import SUMS
from sharding import bubble, describe_mesh, stages_of

__all__ = ["Callback", "Trainer", "evaluate", "eval_keys", "train"]


def evaluate(run: Run) -> dict[str, float]:
    """Held-out loss, accuracy, bits per byte (per token where the bytes are unknown) and the
    layers' aux values, over the task's eval batches."""
    totals: dict[str, float] = {}
    batches = 0
    for batch in run.task.eval_iter(run.rows):
        sums = jax.device_get(run.eval_step(run.state.params, run.put_batch(batch)))
        totals = {k: totals.get(k, 0.0) + float(v) for k, v in sums.items()}
        batches += 1
    loss_sum, count = totals.pop("loss_sum"), totals.pop("count")
    result = {"eval_loss": loss_sum / count, "eval_accuracy": totals.pop("correct") / count}
    result.update({f"eval_{name}": value / batches for name, value in totals.items()})
    if hasattr(run.task, "eval_bytes"):
        nbytes = run.task.eval_bytes()
        key, per = ("eval_bits_per_byte", nbytes) if nbytes else ("eval_bits_per_token", count)
        result[key] = loss_sum / math.log(2) / per
    return result


def eval_keys(run: Run) -> list[str]:
    """The keys `evaluate` reports for `run`: loss and accuracy, one per layer aux value, and
    bits per byte (bits per token where the task cannot count its bytes)."""
    aux = [f"eval_{name}" for name in run.eval_step.out_info if name not in SUMS]
    keys = ["eval_loss", "eval_accuracy", *aux]
    if hasattr(run.task, "eval_bytes"):
        keys.append("eval_bits_per_byte" if run.task.eval_bytes() else "eval_bits_per_token")
    return keys


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


class Trainer:
    """Trains `cfg` to `cfg.steps`, resuming from the newest checkpoint in its run_dir.

    `quiet` keeps the run's lines off the terminal (a tuner's trials); metrics.jsonl is still
    written. Callbacks see `trainer.run`, `.cfg`, `.start`, `.checkpoints` (None when
    checkpointing is off), `.primary` (the process that writes files) and `.log(line)`.
    """

    def __init__(
        self,
        cfg: Config,
        devices: list[jax.Device] | None = None,
        *,
        run: Run | None = None,
        plan: Plan | None = None,
        task=None,
        callbacks=(),
        quiet: bool = False,
    ):
        if cfg.init_from_hf and run is None:
            from engine import hf

            cfg = hf.model_config(cfg)
        self.cfg = cfg
        self.run = run or setup(cfg, devices, plan=plan, task=task)
        self.callbacks = list(callbacks)
        if cfg.early_stop.enabled:
            self.callbacks.append(EarlyStopping(cfg.early_stop))
        if cfg.log.plot:
            self.callbacks.append(PlotCurves())
        self.start = 0
        self.stop_reason: str | None = None  # why the loop stopped before cfg.steps
        self.checkpoints: Checkpoints | None = None
        self.primary = is_primary()  # process 0 alone writes metrics, logs and the config
        self.log = tqdm.write if self.primary and not quiet else _silent
        self._save_requested = False

    def request_save(self) -> None:
        """Checkpoint the current step (a callback's request, e.g. a new best evaluation)."""
        self._save_requested = True

    def restore_params(self, step: int) -> None:
        """Replace the run's params with those of checkpoint `step`."""
        params = self.checkpoints.restore_params(step)
        self.run.state = dataclasses.replace(self.run.state, params=params)

    def fit(self) -> list[dict]:
        """Run the loop; returns the records of the steps run here (also in metrics.jsonl)."""
        cfg, run = self.cfg, self.run
        run_dir = Path(cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt = None
        if cfg.checkpoint.every or cfg.checkpoint.final or (run_dir / "checkpoints").is_dir():
            ckpt = Checkpoints(run)
        self.checkpoints = ckpt
        start = 0
        restored = ckpt.restore_latest() if ckpt else None
        if restored:
            run.state, start = restored.state, restored.step
            for callback in self.callbacks:
                state = restored.callbacks.get(type(callback).__name__)
                if state is not None:
                    callback.load_state_dict(state)
        elif cfg.init_from:
            run.state = dataclasses.replace(run.state, params=restore_params(cfg.init_from, run))
        elif cfg.init_from_hf:
            from engine import hf

            params = hf.restore_params(cfg.init_from_hf, run)
            run.state = dataclasses.replace(run.state, params=params)
        self.start = start
        primary, log = self.primary, self.log
        if primary:
            config = json.dumps(dataclasses.asdict(cfg), indent=2)
            (run_dir / "config.json").write_text(config + "\n")
        log(_banner(run))
        if not restored and (run_dir / "metrics.jsonl").is_file() and primary:
            log(f"warning: replacing {run_dir / 'metrics.jsonl'}: the earlier run there left no "
                "checkpoint to resume from")  # fmt: skip
        if restored:
            log(f"resumed from step {start} ({restored.path})")
        elif cfg.init_from or cfg.init_from_hf:
            log(f"initialized params from {cfg.init_from or cfg.init_from_hf}")

        n_devices = run.mesh.size
        peak = cfg.peak_flops or peak_flops()
        fpt = flops_per_token(cfg)
        tokens_per_step = cfg.batch_size * run.task.tokens_per_example
        local_devices = [d for d in run.mesh.devices.flat if d.process_index == jax.process_index()]
        writer = MetricsWriter(run_dir, cfg.log.tensorboard and primary, start, enabled=primary)
        # One process alone must not stop: multi-process runs stop at JAX's preemption sync.
        stop = StopSignal() if jax.process_count() == 1 else None
        records, skipped_in_a_row, saved = [], 0, start
        # disable=None: a bar on terminals only, so redirected logs keep just the summary lines.
        shown = cfg.log.progress and primary and log is not _silent
        bar = tqdm(initial=start, total=cfg.steps, disable=None if shown else True, unit="step")
        batches = prefetch(run.task, range(start, cfg.steps), run.rows, cfg.data.prefetch)
        trace = StepTrace(
            cfg.run_dir, cfg.log.profile_from if primary else 0, cfg.log.profile_steps
        )
        # Without a terminal (CI, nohup, notebooks) the bar is off: a line now and then instead.
        quiet = shown and bar.disable
        began = noted = last = time.perf_counter()
        try:
            for callback in self.callbacks:
                callback.on_start(self)
            if self.stop_reason:
                log(f"{self.stop_reason}; nothing to train")
                return records
            for step in range(start, cfg.steps):
                done = step + 1
                waited = time.perf_counter()
                batch = next(batches)
                data_wait = time.perf_counter() - waited
                if done in cfg.debug.nan_steps:
                    batch = _poison(batch)
                with trace.annotate(done):
                    run.state, metrics = run.train_step(run.state, run.put_batch(batch))
                    # Waiting on every step keeps timing honest (and CPU collectives from
                    # piling up).
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
                evaluated = (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps
                if evaluated:
                    record.update(evaluate(run))
                    last = time.perf_counter()  # evaluation time is not the next step's
                if (done % cfg.log.every == 0 or evaluated) and skipped_in_a_row == 0:
                    writer.write(record)
                records.append(record)
                bar.update()
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                if done % cfg.log.summary_every == 0 or done == cfg.steps:
                    log(_summary(record, run.task.tokens_per_example))
                elif quiet and now - noted >= cfg.log.progress_every_s:
                    log(f"step {done}/{cfg.steps} | loss {record['loss']:.4f} | "
                        f"{record['step_time_s'] * 1e3:.0f} ms/step")  # fmt: skip
                    noted = now
                for callback in self.callbacks:
                    callback.on_step(self, record)
                for callback in self.callbacks if evaluated else ():
                    stop_now = callback.on_eval(self, record)
                    if stop_now and done < cfg.steps and not self.stop_reason:
                        name = f"callback {type(callback).__name__}"
                        self.stop_reason = stop_now if isinstance(stop_now, str) else name
                every = cfg.checkpoint.every
                if ckpt and ((every and done % every == 0) or self._save_requested):
                    self._save(ckpt, done)
                    saved = done
                preempted = ckpt is not None and ckpt.reached_preemption(done)
                interrupted = (stop and stop.received) or ("preemption" if preempted else None)
                if interrupted or self.stop_reason:
                    self.stop_reason = interrupted or self.stop_reason
                    if ckpt and saved != done:
                        self._save(ckpt, done)
                    ended = _interrupted if interrupted else _stopped
                    log(ended(self.stop_reason, done, ckpt))
                    return records
            keep = cfg.checkpoint.every or cfg.checkpoint.final
            if ckpt and keep and saved != cfg.steps and start < cfg.steps:
                self._save(ckpt, cfg.steps)
                saved = cfg.steps
            if start >= cfg.steps:
                log(f"nothing to do: the run in {run_dir} already reached step {cfg.steps}")
            else:
                log(_closing(records, time.perf_counter() - began, run_dir, saved, ckpt))
            return records
        finally:
            # Whatever stops the loop, the checkpoint being written completes before exit.
            try:
                if ckpt:
                    ckpt.wait()
                for callback in self.callbacks:
                    callback.on_end(self, records)
            finally:
                if ckpt:
                    ckpt.close()
                if stop:
                    stop.restore()
                trace.close()
                bar.close()
                writer.close()

    def _save(self, ckpt: Checkpoints, step: int) -> None:
        states = {type(c).__name__: c.state_dict() for c in self.callbacks}
        ckpt.save(step, self.run.state, {k: v for k, v in states.items() if v is not None})
        self._save_requested = False
        for callback in self.callbacks:
            callback.on_save(self, step)


def train(
    cfg: Config,
    devices: list[jax.Device] | None = None,
    callbacks=(),
    *,
    plan: Plan | None = None,
    task=None,
) -> list[dict]:
    """Train to `cfg.steps`, resuming from the newest checkpoint in `run_dir` if there is one;
    returns the records of the steps run here (also in metrics.jsonl)."""
    return Trainer(cfg, devices, plan=plan, task=task, callbacks=callbacks).fit()


def _banner(run: Run) -> str:
    cfg = run.cfg
    params = sum(x.size for x in jax.tree.leaves(run.state.params))
    processes = f" | {jax.process_count()} processes" if jax.process_count() > 1 else ""
    planned = planned_memory_gb(run.train_step)
    plan = f" | step needs {format_bytes(planned * 1e9)}/device" if planned is not None else ""
    compiled = "steps reused" if run.reused else f"compiled in {run.compile_s:.1f}s"
    attention = f"attention {run.plan.attention} | " if model_family(cfg).sequence_model else ""
    return (
        f"shardtrain: {cfg.task} | {params / 1e6:.2f}M params | mesh {describe_mesh(run.mesh)}"
        f"{processes} | {_pipeline_summary(run.plan, stages_of(run.mesh))}{run.plan.precision} | "
        f"{attention}{compiled}{plan}"
    )


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


def _closing(records: list[dict], seconds: float, run_dir: Path, saved: int, ckpt) -> str:
    evals = [r for r in records if "eval_loss" in r]
    final = f" | final eval_loss {evals[-1]['eval_loss']:.4f}" if evals else ""
    kept = (
        f"checkpoint: {ckpt.directory / str(saved)}"
        if ckpt and saved
        else "no checkpoint kept (--checkpoint.final=False)"
    )
    return (
        f"done: {len(records)} steps in {seconds:.0f}s{final} | metrics: "
        f"{run_dir / 'metrics.jsonl'} | {kept}"
    )


def _stopped(reason: str, step: int, ckpt) -> str:
    """A callback ended the run: the line says why and where its state is."""
    if ckpt is None:
        return f"{reason}: stopped after step {step}; checkpointing is off, nothing saved"
    return f"{reason}: stopped after step {step}, checkpoint saved in {ckpt.directory / str(step)}"


def _interrupted(reason: str, step: int, ckpt) -> str:
    """A signal or preemption: the same command continues the run."""
    line = _stopped(reason, step, ckpt)
    return line if ckpt is None else f"{line}; run the same command to resume"


def _pipeline_summary(plan: Plan, stages: int) -> str:
    if stages == 1:
        return ""
    repeats, micro = plan.pipeline.repeats, plan.pipeline.microbatches_for(stages)
    return (
        f"{stages} stages x {repeats} repeats, {micro} microbatches, "
        f"bubble {100 * bubble(stages, repeats, micro):.0f}% | "
    )


def _summary(r: dict, tokens_per_example: int = 2) -> str:
    unit = "tok/s" if tokens_per_example > 1 else "examples/s"  # a classifier's "token"
    line = (
        f"step {r['step']:>6} | loss {r['loss']:.4f} | grad_norm {r['grad_norm']:.3f} | "
        f"lr {r['lr']:.2e} | {r['step_time_s'] * 1e3:.0f} ms/step | "
        f"{r['tokens_per_sec']:,.0f} {unit}"
    )
    if r["mfu"] is not None:
        line += f" | MFU {100 * r['mfu']:.1f}%"
    if r["peak_memory_gb"] is not None:
        line += f" | peak mem {r['peak_memory_gb']:.1f} GB"
    if "eval_loss" in r:
        line += f" | eval_loss {r['eval_loss']:.4f} | eval_acc {r['eval_accuracy']:.3f}"
    if "eval_bits_per_byte" in r:
        line += f" | {r['eval_bits_per_byte']:.3f} bpb"
    elif "eval_bits_per_token" in r:
        line += f" | {r['eval_bits_per_token']:.3f} bits/token"
    return line
