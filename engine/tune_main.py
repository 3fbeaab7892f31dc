"""`python -m engine.tune`: a hyper-parameter study, every trial a training run (engine.tune).

    python -m engine.tune --config digits --study_dir runs/digits-study --trials 16 \\
        --space 'optim.lr=log:1e-4:3e-2' --space 'batch_size=choice:32,64,128' \\
        --space 'optim.warmup_steps=int:0:200' --metric eval_accuracy --pruner asha

prints a line per trial as it ends (complete, pruned or failed, and the best so far), then every
trial sorted by the metric, and writes `study_dir/best.json` (run it with
`python -m engine.train --config study_dir/best.json`), `history.png` and `params.png`. Run the
same command in more processes, or on more hosts sharing the file system, to share the study;
run it again to continue it.
"""

from __future__ import annotations

import dataclasses
import datetime
import sys
from pathlib import Path
from typing import Annotated, Literal

import tyro

from engine.config import ConfigError, parse_args, split_flags
from sharding import ShardingError


@dataclasses.dataclass(frozen=True)
class TuneArgs:
    study_dir: str
    """Where the study's journal, trials/<number>/, best.json and plots go."""
    trials: int = 20
    """Complete or pruned trials the study should hold (all processes sharing it together)."""
    space: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """A searched key, once per key: KEY=log:LOW:HIGH, KEY=float:LOW:HIGH, KEY=int:LOW:HIGH or
    KEY=choice:A,B,C; any config key."""
    metric: str = "eval_loss"
    """The evaluation optimized: any eval_* key the task reports."""
    mode: Literal["auto", "min", "max"] = "auto"
    """auto: accuracies are maximized, everything else minimized."""
    pruner: Literal["asha", "hyperband", "median", "none"] = "asha"
    """Stops unpromising trials at an evaluation: asynchronous successive halving, Hyperband,
    the median rule, or none."""
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    storage: str | None = None
    """A database URL (sqlite:///study.db, postgresql://...) instead of the journal file."""
    devices_per_trial: int | None = None
    """Run trials in parallel on disjoint groups of this many local devices; default: one trial
    at a time on all of them."""
    sampler_seed: int | None = None
    """Seed of the sampler: the same proposals on a rerun (one process)."""


_OWN = tuple(f"--{f.name}" for f in dataclasses.fields(TuneArgs)) + ("--help", "-h")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, rest = split_flags(argv, _OWN)
    args = tyro.cli(
        TuneArgs,
        args=own,
        prog="python -m engine.tune",
        description=__doc__.split("\n\n")[0]
        + "\n\nConfig keys (--config, --steps, --optim.*, ...) are engine.train's: they set the "
        "config every trial starts from.",
        use_underscores=True,
        config=(tyro.conf.FlagConversionOff,),
    )
    try:
        cfg = parse_args(rest)
        if args.trials <= 0:
            raise ConfigError(f"--trials={args.trials} must be positive.")
        if not args.space:
            raise ConfigError("No --space given; name at least one key to search, e.g. "
                              "--space 'optim.lr=log:1e-4:3e-2'.")  # fmt: skip
        import jax  # after parsing: --help should not wait for JAX

        if cache := cfg.compile_cache_dir():  # other processes and reruns load the compiled steps
            jax.config.update("jax_compilation_cache_dir", cache)
        import optuna

        from engine.tune import tune

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # our lines say what happened
        study = tune(
            cfg, list(args.space), args.study_dir, args.trials, metric=args.metric,
            mode=args.mode, pruner=args.pruner, sampler=args.sampler, storage=args.storage,
            devices_per_trial=args.devices_per_trial, sampler_seed=args.sampler_seed,
            log=lambda line: print(line, flush=True),
        )  # fmt: skip
    except (ConfigError, ShardingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the running trials were marked failed; run the same command to "
              "continue the study", file=sys.stderr)  # fmt: skip
        return 130
    print(table(study, [s.split("=", 1)[0] for s in args.space], args.metric))
    best = Path(args.study_dir) / "best.json"
    if best.is_file():
        print(f"\nbest config: {best} (python -m engine.train --config {best})")
        print(f"plots: {Path(args.study_dir) / 'history.png'}, "
              f"{Path(args.study_dir) / 'params.png'}")  # fmt: skip
    return 0


def table(study, keys: list[str], metric: str) -> str:
    """Every trial, best first: complete ones by their result, pruned ones by their last
    report, then the rest."""
    from optuna.trial import TrialState

    from engine.tune import trial_value

    sign = 1 if study.direction.name == "MINIMIZE" else -1
    order = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1}

    def rank(t):
        v = trial_value(t)
        return (order.get(t.state, 2), sign * v if v is not None else 0.0, t.number)

    widths = [max(len(k), 10) for k in keys]
    head = f"{'trial':>5}  {'state':<8} {metric:>14} {'step':>6}  " + "  ".join(
        f"{k:>{w}}" for k, w in zip(keys, widths, strict=True)
    )
    lines = [head + f"  {'time':>6}"]
    for t in sorted(study.get_trials(deepcopy=False), key=rank):
        v = trial_value(t)
        params = "  ".join(
            f"{_cell(t.params.get(k)):>{w}}" for k, w in zip(keys, widths, strict=True)
        )
        seconds = t.user_attrs.get("seconds")
        if seconds is None and t.datetime_start and t.datetime_complete:
            seconds = (t.datetime_complete - t.datetime_start) / datetime.timedelta(seconds=1)
        lines.append(
            f"{t.number:>5}  {t.state.name.lower():<8} {_cell(v):>14} "
            f"{_cell(t.user_attrs.get('step')):>6}  {params}  "
            f"{(f'{seconds:.0f}s' if seconds is not None else '-'):>6}"
        )
    return "\n".join(lines)


def _cell(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)
