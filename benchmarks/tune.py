"""How well does the tuner search? Each study against its baseline, measured in one run.

    python benchmarks/tune.py --part digits   # ~3 min on 2 CPU cores
    python benchmarks/tune.py --part lm       # ~8 min on 2 CPU cores (--lm_pruner none: 30)

- digits: 24 trials over learning rate, batch size, warmup and weight decay with TPE + ASHA,
  against random search without pruning over the same space and the same 24 trials: the best
  validation accuracy (goal >= 97 %), trials pruned, wall time, and the time each study took
  to first reach 97 % and the accuracy both reached.
- lm: the `default` preset against a 12-trial TPE + ASHA study of learning rate, warmup,
  weight decay and final learning-rate ratio whose trial 0 is the preset itself, so the
  preset's eval loss is measured by the same code in the same run (goal: the study beats it).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path

import jax
import optuna

from engine.config import PRESETS
from engine.tune import tune
from engine.tune_main import table

OUT = Path("runs/bench-tune")


def quiet(name: str, **changes):
    cfg = PRESETS[name]
    log = dataclasses.replace(cfg.log, progress=False, tensorboard=False)
    return dataclasses.replace(cfg, log=log, **changes)


def study(name: str, cfg, space, trials, **kwargs):
    """Run a fresh study; (the study, its wall time, the start time)."""
    study_dir = OUT / name
    shutil.rmtree(study_dir, ignore_errors=True)
    began_at = time.time()
    start = time.perf_counter()
    result = tune(cfg, space, study_dir, trials, devices=jax.devices()[:1], **kwargs)
    return result, time.perf_counter() - start, began_at


def time_to(result: optuna.Study, began_at: float, target: float, sign: int) -> float | None:
    """Seconds from the study's start to the end of its first trial at least as good as
    `target` (sign +1: higher is better)."""
    done = [t for t in result.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    good = [t.datetime_complete.timestamp() for t in done if sign * t.value >= sign * target]
    return min(good) - began_at if good else None


def counts(result: optuna.Study) -> str:
    states = [t.state.name.lower() for t in result.get_trials()]
    kinds = [s for s in ("complete", "pruned", "fail") if s in states]
    return ", ".join(f"{states.count(s)} {s}" for s in kinds)


def digits(trials: int = 24) -> None:
    space = [
        "optim.lr=log:1e-4:1e-1",
        "batch_size=choice:16,32,64,128",
        "optim.warmup_steps=int:0:100",
        "optim.weight_decay=log:1e-5:1e-1",
    ]
    cfg = quiet("digits")
    metric = dict(metric="eval_accuracy", sampler_seed=0, log=print)
    study("digits-warmup", cfg, space, 1, **metric)  # JAX and Optuna start-up, timed by neither
    asha, asha_s, asha_t0 = study("digits-asha", cfg, space, trials, **metric)
    rand, rand_s, rand_t0 = study(
        "digits-random", cfg, space, trials, pruner="none", sampler="random", **metric
    )
    both = min(asha.best_value, rand.best_value)
    print(f"\n## digits, {trials} trials each, {len(space)} keys searched")
    for name, s, seconds, t0 in (("TPE + ASHA", asha, asha_s, asha_t0),
                                 ("random, no pruning", rand, rand_s, rand_t0)):  # fmt: skip
        reach, same = time_to(s, t0, 0.97, +1), time_to(s, t0, both, +1)
        print(
            f"{name:<20} best {s.best_value:.4f} (trial {s.best_trial.number}) | {counts(s)} | "
            f"{seconds:.0f} s | to 97 %: {_s(reach)} | to {both:.4f}: {_s(same)}"
        )
    print("\nTPE + ASHA trials:\n" + table(asha, [s.split("=")[0] for s in space], "eval_accuracy"))


def lm(pruner: str, trials: int = 12) -> None:
    space = [
        "optim.lr=log:1e-3:2e-2",
        "optim.warmup_steps=int:0:100",
        "optim.weight_decay=float:0:0.3",
        "optim.min_lr_ratio=float:0:0.5",
    ]
    cfg = quiet("default")
    preset = {s.split("=")[0]: getattr(cfg.optim, s.split("=")[0][6:]) for s in space}
    result, seconds, _ = study(
        f"lm-{pruner}",
        cfg,
        space,
        trials,
        enqueue=[preset],
        pruner=pruner,
        sampler_seed=0,
        log=print,
    )
    base = result.get_trials()[0]
    best = result.best_trial
    print(f"\n## default LM, {trials} trials, {len(space)} keys, pruner {pruner}: {seconds:.0f} s")
    print(
        f"preset (trial 0): eval_loss {base.value:.4f} | best: {best.value:.4f} (trial "
        f"{best.number}, {best.params}) | better by {base.value - best.value:.4f} "
        f"({(base.value - best.value) / base.value:.1%}) | {counts(result)}"
    )
    print("\n" + table(result, [s.split("=")[0] for s in space], "eval_loss"))


def _s(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.0f} s"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("digits", "lm", "all"), default="all")
    parser.add_argument("--lm_pruner", choices=("asha", "hyperband", "median", "none"),
                        default="asha")  # fmt: skip
    args = parser.parse_args()
    part = args.part
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"jax {jax.__version__}, optuna {optuna.__version__}, {jax.devices()[0].device_kind}")
    if part in ("digits", "all"):
        digits()
    if part in ("lm", "all"):
        lm(args.lm_pruner)
