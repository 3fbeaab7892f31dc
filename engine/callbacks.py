"""Hooks of the training loop, and early stopping built on them.

A callback sees the loop's events and may stop the run, ask for a checkpoint and keep a small
JSON state in every checkpoint, so that a resumed run continues where it was (a patience count
survives a kill). Early stopping (`--early_stop.*`) and the tuner's pruning (engine.tune) are
callbacks: the loop in engine.trainer has no branch for either.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from engine.trainer import Trainer


class Callback:
    """Hooks of the training loop; override the ones you need."""

    def on_start(self, trainer: Trainer) -> None:
        """Before the first step (after any resume): `trainer.start` is the step resumed from.
        Setting `trainer.stop_reason` here ends the run before it trains."""

    def on_step(self, trainer: Trainer, record: dict) -> None:
        """After every step, with its metrics.jsonl record (eval keys too after an evaluation)."""

    def on_eval(self, trainer: Trainer, record: dict) -> bool | str | None:
        """After each evaluation. Return True, or a sentence saying why, to stop the run after
        this step (the state is saved first); call `trainer.request_save()` to checkpoint it."""

    def on_save(self, trainer: Trainer, step: int) -> None:
        """After a checkpoint of `step` was started (it completes in the background)."""

    def on_end(self, trainer: Trainer, records: list[dict]) -> None:
        """When the loop ends, however it ends; saved checkpoints are complete and readable."""

    def state_dict(self) -> dict | None:
        """JSON-able state stored in each checkpoint; None: nothing to keep."""
        return None

    def load_state_dict(self, state: dict) -> None:
        """The state of the checkpoint a run resumes from."""


def metric_mode(metric: str, mode: str) -> Literal["min", "max"]:
    """`mode`, or with `auto` the direction in which `metric` gets better: accuracies up,
    everything else (losses, bits per byte, aux losses) down."""
    if mode != "auto":
        return mode  # type: ignore[return-value]
    return "max" if "accuracy" in metric else "min"


@dataclasses.dataclass(frozen=True)
class EarlyStopConfig:
    metric: str = "eval_loss"
    """The evaluation watched: any eval_* key the run reports (eval_loss, eval_accuracy,
    eval_bits_per_byte, a layer's eval_<aux>)."""
    mode: Literal["auto", "min", "max"] = "auto"
    """auto: accuracies are maximized, everything else minimized."""
    patience: int = 0
    """Stop after this many evaluations in a row without improvement; 0 = never."""
    min_delta: float = 0.0
    """An evaluation improves only if it beats the best by more than this."""
    target: float | None = None
    """Stop as soon as the metric reaches this value."""
    restore_best: bool = False
    """When the run ends, its params (returned by the library, exported, read by --init_from
    and generation) are those of the best evaluation."""

    @property
    def enabled(self) -> bool:
        return self.patience > 0 or self.target is not None or self.restore_best


class EarlyStopping(Callback):
    """Watches `cfg.metric` at every evaluation; records the best in run_dir/best.json and keeps
    its checkpoint out of the rotation; stops on patience or target (Keras' EarlyStopping)."""

    def __init__(self, cfg: EarlyStopConfig):
        self.cfg = cfg
        self.mode = metric_mode(cfg.metric, cfg.mode)
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.stopped: str | None = None

    def state_dict(self) -> dict:
        keys = ("best", "best_step", "bad_evals", "stopped")
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def on_start(self, trainer: Trainer) -> None:
        from engine.config import ConfigError
        from engine.trainer import eval_keys

        reported = eval_keys(trainer.run)
        if self.cfg.metric not in reported:
            raise ConfigError(
                f"--early_stop.metric={self.cfg.metric} is not an evaluation this run reports; "
                f"use one of {', '.join(reported)}."
            )
        if self.best_step is not None and trainer.checkpoints:
            trainer.checkpoints.protect(self.best_step)
        if self.stopped:  # the same command again after an early stop: nothing more to do
            trainer.stop_reason = f"the run already stopped early: {self.stopped}"

    def _better(self, value: float, than: float) -> bool:
        return value < than if self.mode == "min" else value > than

    def on_eval(self, trainer: Trainer, record: dict) -> str | None:
        cfg, value, step = self.cfg, record[self.cfg.metric], record["step"]
        delta = cfg.min_delta if self.mode == "min" else -cfg.min_delta
        if math.isfinite(value) and (self.best is None or self._better(value + delta, self.best)):
            self._new_best(trainer, value, step)
        else:
            self.bad_evals += 1
        best = f"best {cfg.metric} {self.best:.4f} at step {self.best_step}"
        if cfg.target is not None and math.isfinite(value) and not self._better(cfg.target, value):
            self.stopped = f"{cfg.metric} {value:.4f} reached --early_stop.target={cfg.target}"
        elif cfg.patience and self.bad_evals >= cfg.patience:
            self.stopped = (
                f"{cfg.metric} did not improve by more than {cfg.min_delta:g} in "
                f"{self.bad_evals} evaluations (--early_stop.patience={cfg.patience}); {best}"
            )
        if self.stopped and record["step"] < trainer.cfg.steps:
            return f"early stop: {self.stopped}"
        self.stopped = None  # the last step: the run ends anyway, not early
        return None

    def _new_best(self, trainer: Trainer, value: float, step: int) -> None:
        self.best, self.best_step, self.bad_evals = value, step, 0
        checkpoints = trainer.checkpoints
        if checkpoints:
            checkpoints.protect(step, only=True)
            trainer.request_save()
        if trainer.primary:
            best = {
                "step": step,
                "metric": self.cfg.metric,
                "mode": self.mode,
                "value": value,
                "checkpoint": f"checkpoints/{step}" if checkpoints else None,
                "restore_best": self.cfg.restore_best,
            }
            _write_json(Path(trainer.cfg.run_dir) / "best.json", best)

    def on_end(self, trainer: Trainer, records: list[dict]) -> None:
        last = records[-1]["step"] if records else trainer.start
        if self.cfg.restore_best and self.best_step is not None and self.best_step != last:
            trainer.restore_params(self.best_step)
            trainer.log(
                f"restored the params of step {self.best_step} ({self.cfg.metric} "
                f"{self.best:.4f}; --early_stop.restore_best)"
            )


def _write_json(path: Path, data: dict) -> None:
    """Whole or not at all: a reader never sees half a file."""
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(data, indent=2) + "\n")
    part.replace(path)


class PlotCurves(Callback):
    """`--log.plot`: the run's curves (engine.plot.run_curves) in run_dir/curves.png at the end,
    written by the process that writes metrics.jsonl."""

    def on_end(self, trainer: Trainer, records: list[dict]) -> None:
        if not trainer.primary or not records:
            return
        from engine.plot import run_curves

        run_dir = Path(trainer.cfg.run_dir)
        run_curves([run_dir], out=run_dir / "curves.png")
