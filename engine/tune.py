"""Hyper-parameter search on Optuna; every trial is a real training run.

    python -m engine.tune --config digits --study_dir runs/digits-study --trials 16 \\
        --space 'optim.lr=log:1e-4:3e-2' --space 'batch_size=choice:32,64,128' \\
        --metric eval_accuracy --pruner asha

Each trial trains in `study_dir/trials/<number>/` (metrics.jsonl, config.json, checkpoints) and
reports every evaluation to the pruner, which may stop it there. The study lives in Optuna's
journal file `study_dir/study.journal` (or `--storage URL`): processes on one machine, or on
hosts that share the file system, run the same command and share it, and running it again
continues it. Trials that differ only in runtime values (learning rate, warmup, weight decay,
seed, ...) reuse one compiled step (engine.setup.StepCache).

Library: `tune(cfg, ["optim.lr=log:1e-4:3e-2"], "runs/study", trials=16)` returns the
optuna.Study and writes `study_dir/best.json`, a config `engine.train --config` runs as it is.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import os
import socket
import threading
import time
import types
import typing
from pathlib import Path

import jax
import optuna
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import TrialState

from engine.callbacks import Callback, EarlyStopping, metric_mode
from engine.config import (
    Config,
    ConfigError,
    TrainingHalted,
    key_type,
    replace_key,
    unknown_key_hint,
)
from engine.data import make_task
from engine.setup import StepCache, setup
from engine.trainer import Trainer, eval_keys
from sharding import ShardingError

KINDS = ("log", "float", "int", "choice")
PRUNERS = ("asha", "hyperband", "median", "none")
SAMPLERS = ("tpe", "random", "grid")
HOST = socket.gethostname()
HEARTBEAT_S = 20  # a running trial's heartbeat file is touched this often ...
STALE_AFTER_S = 300  # ... and a trial on another host whose file is older than this is dead
DONE = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One searched config key: `KEY=log:LOW:HIGH`, `float:LOW:HIGH`, `int:LOW:HIGH` or
    `choice:A,B,C` (values typed as the key is)."""

    key: str
    kind: str
    values: tuple  # (low, high), or the choices

    @classmethod
    def parse(cls, text: str) -> Dimension:
        key, sep, spec = text.partition("=")
        kind, _, rest = spec.partition(":")

        def bad(why: str) -> ConfigError:
            return ConfigError(f"--space '{text}' {why}")

        if not sep or kind not in KINDS:
            raise bad(
                "is not KEY=KIND:VALUES; write KEY=log:LOW:HIGH, KEY=float:LOW:HIGH, "
                "KEY=int:LOW:HIGH or KEY=choice:A,B,C."
            )
        try:
            field = key_type(key)
        except KeyError:
            raise bad(f"names no config key{unknown_key_hint(key)}") from None
        if kind == "choice":
            if not rest:
                raise bad("lists no choices; write KEY=choice:A,B,C.")
            return cls(key, kind, tuple(_typed(text, field, v) for v in rest.split(",")))
        bounds = rest.split(":")
        number = int if kind == "int" or (kind == "log" and field is int) else float
        if field not in (int, float):
            raise bad(f"gives a range to a key that takes {_name(field)}; use choice:A,B,C.")
        if field is int and number is float:
            raise bad(f"searches the integer key {key} as floats; use int:LOW:HIGH.")
        try:
            low, high = (number(b) for b in bounds)
        except ValueError:
            raise bad(f"needs two {number.__name__} bounds: {key}={kind}:LOW:HIGH.") from None
        if low > high:
            raise bad(f"has LOW {low} above HIGH {high}; swap them.")
        if kind == "log" and low <= 0:
            raise bad(f"takes the log of {low}; use a LOW above 0, or float:LOW:HIGH.")
        return cls(key, kind, (low, high))

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.kind == "choice":
            return optuna.distributions.CategoricalDistribution(self.values)
        low, high = self.values
        if isinstance(low, int):
            return optuna.distributions.IntDistribution(low, high, log=self.kind == "log")
        return optuna.distributions.FloatDistribution(low, high, log=self.kind == "log")

    def grid(self) -> list:
        if self.kind == "choice":
            return list(self.values)
        if self.kind == "int":
            return list(range(self.values[0], self.values[1] + 1))
        raise ConfigError(
            f"--sampler grid needs listed values, but --space '{self}' is a continuous range; "
            f"use {self.key}=choice:A,B,C."
        )

    def __str__(self) -> str:
        sep = "," if self.kind == "choice" else ":"
        return f"{self.key}={self.kind}:{sep.join(map(str, self.values))}"


def _name(field) -> str:
    if typing.get_origin(field) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(field)))
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return names.get(field, str(field))


def _typed(text: str, field, raw: str):
    """`raw` as a value of a config key of type `field`."""
    origin, args = typing.get_origin(field), typing.get_args(field)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if raw == "None":
            return None
        field = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(field), typing.get_args(field)
    try:
        if origin is typing.Literal:
            if raw not in args:
                raise ValueError
            return raw
        if field is bool:
            return {"true": True, "false": False}[raw.lower()]
        if field in (int, float, str):
            return field(raw)
    except (ValueError, KeyError):
        raise ConfigError(f"--space '{text}': '{raw}' is not {_name(field)}.") from None
    raise ConfigError(f"--space '{text}': a key of type {field} cannot be searched.")


def trial_config(cfg: Config, params: dict, run_dir: str | Path) -> Config:
    """`cfg` with a trial's values, training in `run_dir`."""
    for key, value in params.items():
        value = float(value) if key_type(key) is float else value  # int:LOW:HIGH on a float
        cfg = replace_key(cfg, key, value)
    return dataclasses.replace(cfg, run_dir=str(run_dir))


def _storage(study_dir: Path, url: str | None) -> optuna.storages.BaseStorage:
    if url is None:
        study_dir.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(study_dir / "study.journal")))
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as e:  # sqlalchemy raises many types for a bad URL or an unreachable server
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(
            f"--storage={url} could not be opened ({first}); pass a database URL such as "
            "sqlite:///study.db, or leave --storage out for a journal file in --study_dir."
        ) from None


def _sampler(name: str, dims: list[Dimension], trials: int, seed: int | None):
    if name == "grid":
        return optuna.samplers.GridSampler({d.key: d.grid() for d in dims}, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # The liar keeps parallel workers from proposing what a running trial already tries.
    return optuna.samplers.TPESampler(
        n_startup_trials=min(10, max(trials // 3, 2)),
        multivariate=True,
        constant_liar=True,
        seed=seed,
    )


def _pruner(name: str, cfg: Config) -> optuna.pruners.BasePruner:
    first = cfg.eval_every or cfg.steps  # the step of a trial's first report
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=3)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=first, max_resource=cfg.steps, reduction_factor=3
        )
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3)
    return optuna.pruners.NopPruner()


def _identity(cfg: Config, dims: list[Dimension], metric: str, mode: str) -> dict:
    """What a study is of: a rerun must search the same space of the same config."""
    config = dataclasses.asdict(cfg)
    for key in ("run_dir", "log", "compile_cache"):
        config.pop(key)
    identity = {"metric": metric, "mode": mode, "space": [str(d) for d in dims], "config": config}
    return json.loads(json.dumps(identity))  # as the storage gives it back (tuples as lists)


def _first_difference(a, b, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return f"{prefix[:-1]}: {a} there, {b} here"


@dataclasses.dataclass
class _Search:
    """The shared state of this process's workers: one per group of devices."""

    study: optuna.Study
    cfg: Config
    dims: list[Dimension]
    study_dir: Path
    trials: int
    metric: str
    cache: StepCache
    log: typing.Callable[[str], None]
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    running: dict[int, Path] = dataclasses.field(default_factory=dict)
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    errors: list[Exception] = dataclasses.field(default_factory=list)

    interrupted: bool = False

    def next_trial(self) -> optuna.Trial | None:
        """A new trial, or None once the study holds `trials` finished or running ones. Under
        the study's lock, so that workers everywhere never start more than that together."""
        with self.lock, _study_lock(self.study_dir):
            self._fail_stale()
            states = collections.Counter(t.state for t in self.study.get_trials(deepcopy=False))
            started = sum(states[s] for s in (*DONE, TrialState.RUNNING))
            if self.stop.is_set() or started >= self.trials:
                return None
            trial = self.study.ask({d.key: d.distribution() for d in self.dims})
            trial.set_user_attr("host", HOST)
            trial.set_user_attr("pid", os.getpid())
            run_dir = self.study_dir / "trials" / str(trial.number)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "heartbeat").touch()
            self.running[trial.number] = run_dir
            return trial

    def _fail_stale(self) -> None:
        """Mark failed the running trials whose worker is gone (killed mid-trial)."""
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number in self.running:
                continue
            host, pid = t.user_attrs.get("host"), t.user_attrs.get("pid")
            beat = self.study_dir / "trials" / str(t.number) / "heartbeat"
            if host == HOST:
                dead = pid == os.getpid() or not _alive(pid)
            else:
                dead = not beat.exists() or time.time() - beat.stat().st_mtime > STALE_AFTER_S
            if dead:
                self.study.tell(t.number, state=TrialState.FAIL)
                self.log(f"trial {t.number} marked failed: its worker (pid {pid} on {host}) "
                         "stopped mid-trial")  # fmt: skip

    def heartbeat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            for run_dir in list(self.running.values()):
                (run_dir / "heartbeat").touch()

    def work(self, devices: list[jax.Device]) -> None:
        """Run trials on `devices` until the study is full or the search stops."""
        failures = 0
        while (trial := self.next_trial()) is not None:
            try:
                state = self.run_trial(trial, devices)
            except BaseException as e:  # Ctrl-C outside a trial's loop, a bug: fail it, stop
                self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                self.stop.set()
                self.interrupted = isinstance(e, KeyboardInterrupt)
                self.errors.append(e)
                return
            finally:
                self.running.pop(trial.number, None)
            failures = failures + 1 if state == TrialState.FAIL else 0
            if failures >= 3:
                self.errors.append(RuntimeError(f"{failures} trials in a row failed; stopping"))
                self.stop.set()

    def run_trial(self, trial: optuna.Trial, devices: list[jax.Device]) -> TrialState:
        n, params = trial.number, trial.params
        cfg = trial_config(self.cfg, params, self.running[n])
        report = _Report(trial, self.metric, self.stop)
        began = time.perf_counter()
        self.log(f"trial {n} started: {_params_text(params)}")
        try:
            run = setup(cfg, devices, cache=self.cache)
            trial.set_user_attr("compiled", not run.reused)  # False: an earlier trial's steps
            trial.set_user_attr("devices", [d.id for d in devices])
            trainer = Trainer(cfg, run=run, callbacks=[report], quiet=True)
            records = trainer.fit()
        except (ConfigError, ShardingError) as e:
            self.study.tell(trial, state=TrialState.FAIL)
            self.stop.set()
            self.errors.append(ConfigError(
                f"trial {n} ({_params_text(params)}): {e} Narrow the --space so that every "
                "value it allows is valid."
            ))  # fmt: skip
            return TrialState.FAIL
        except TrainingHalted as e:  # diverged: as bad as a trial gets, so pruned
            why = f"(diverged: {str(e).split(';')[0]})"
            trial.set_user_attr("stopped", why)
            return self._tell(trial, TrialState.PRUNED, None, began, why)
        except Exception as e:
            trial.set_user_attr("error", f"{type(e).__name__}: {str(e)[:300]}")
            return self._tell(trial, TrialState.FAIL, None, began, f"({type(e).__name__}: {e})")
        trial.set_user_attr("step", records[-1]["step"] if records else trainer.start)
        if trainer.stop_reason in ("SIGINT", "SIGTERM", "preemption", "interrupted"):
            self.stop.set()
            self.interrupted = True
            return self._tell(trial, TrialState.FAIL, None, began, "(interrupted)")
        if report.pruned:
            return self._tell(trial, TrialState.PRUNED, None, began, report.pruned)
        value = _value(trainer, records, self.metric)
        return self._tell(trial, TrialState.COMPLETE, value, began, "")

    def _tell(self, trial, state: TrialState, value, began: float, how: str) -> TrialState:
        trial.set_user_attr("seconds", round(time.perf_counter() - began, 1))
        self.study.tell(trial, value, state=None if value is not None else state)
        state = self.study.get_trials(deepcopy=False)[trial.number].state
        counts = collections.Counter(t.state for t in self.study.get_trials(deepcopy=False))
        what = f": {self.metric} {value:.4f}" if value is not None else f" {how}"
        best = _best(self.study)
        best = f" | best {best.value:.4f} (trial {best.number})" if best else ""
        seconds = time.perf_counter() - began
        self.log(
            f"trial {trial.number} {state.name.lower()}{what} in {seconds:.0f}s"
            f" | {counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, "
            f"{counts[TrialState.FAIL]} failed, {counts[TrialState.RUNNING]} running{best}"
        )
        return state


class _Report(Callback):
    """Reports each evaluation to the study's pruner and stops the trial when it prunes."""

    def __init__(self, trial: optuna.Trial, metric: str, stop: threading.Event):
        self.trial, self.metric, self.stop = trial, metric, stop
        self.pruned: str | None = None

    def on_step(self, trainer: Trainer, record: dict) -> None:
        if self.stop.is_set() and not trainer.stop_reason:
            trainer.stop_reason = "interrupted"  # another worker was stopped: stop here too

    def on_eval(self, trainer: Trainer, record: dict) -> str | None:
        value, step = record[self.metric], record["step"]
        if not math.isfinite(value):
            self.pruned = f"at step {step} ({self.metric} {value}: diverged)"
        else:
            self.trial.report(value, step)
            if step < trainer.cfg.steps and self.trial.should_prune():
                self.pruned = f"at step {step} ({self.metric} {value:.4f})"
        return self.pruned


def _value(trainer: Trainer, records: list[dict], metric: str) -> float:
    """The trial's result: its last evaluation, or its best with --early_stop.restore_best."""
    for callback in trainer.callbacks:
        stop = callback.cfg if isinstance(callback, EarlyStopping) else None
        if stop and stop.restore_best and stop.metric == metric and callback.best is not None:
            return callback.best
    return [r for r in records if metric in r][-1][metric]


def trial_value(t: optuna.trial.FrozenTrial) -> float | None:
    """A trial's result: its value, or for a pruned trial its last report (None: neither)."""
    if t.value is not None or not t.intermediate_values:
        return t.value
    return t.intermediate_values[max(t.intermediate_values)]


@contextlib.contextmanager
def _study_lock(study_dir: Path):
    """Held while a worker creates the study or starts a trial: a lock file in study_dir,
    which every worker shares (Optuna's own NFS-safe lock; a holder that died is broken
    after 30 s)."""
    lock = JournalFileSymlinkLock(str(study_dir / "study.lock"))
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return pid is not None  # someone else's process, alive
    return True


def _params_text(params: dict) -> str:
    texts = (f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    return " ".join(texts)


def _best(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """optuna's best complete trial, or None where its `best_trial` raises (none yet)."""
    try:
        return study.best_trial
    except ValueError:
        return None


def device_groups(devices: list[jax.Device], per_trial: int | None) -> list[list[jax.Device]]:
    """Disjoint groups of `per_trial` devices, one trial running on each at a time."""
    n = len(devices)
    per_trial = per_trial or n
    if per_trial <= 0 or n % per_trial:
        divisors = ", ".join(str(k) for k in range(1, n + 1) if n % k == 0)
        raise ConfigError(
            f"--devices_per_trial={per_trial} does not divide the {n} local devices; use one "
            f"of {divisors}."
        )
    return [devices[i : i + per_trial] for i in range(0, n, per_trial)]


def check_metric(cfg: Config, devices: list[jax.Device], cache: StepCache, metric: str) -> None:
    """Compile the base config (its steps serve every trial of the same shapes) and check
    that its evaluations report `metric`."""
    task = make_task(cfg.task, cfg.data, cfg.batch_size, cfg.seed)
    reported = eval_keys(setup(cfg, devices, init=False, task=task, cache=cache))
    if metric not in reported:
        raise ConfigError(
            f"--metric {metric} is never reported by this task's evaluations; use one of "
            f"{', '.join(reported)}."
        )


def tune(
    cfg: Config,
    space: list[str] | list[Dimension],
    study_dir: str | Path,
    trials: int,
    *,
    metric: str = "eval_loss",
    mode: str = "auto",
    pruner: str = "asha",
    sampler: str = "tpe",
    storage: str | None = None,
    devices_per_trial: int | None = None,
    devices: list[jax.Device] | None = None,
    sampler_seed: int | None = None,
    enqueue: typing.Sequence[dict] = (),
    log: typing.Callable[[str], None] = print,
) -> optuna.Study:
    """Run the study in `study_dir` until it holds `trials` complete or pruned trials (with
    those of any other process sharing it); `enqueue` lists values tried first when the study
    is new. Writes `study_dir/best.json` and the plots; returns the optuna.Study."""
    from engine import plot

    dims = [d if isinstance(d, Dimension) else Dimension.parse(d) for d in space]
    if pruner not in PRUNERS or sampler not in SAMPLERS:
        raise ConfigError(
            f"--pruner {pruner} / --sampler {sampler}: use a pruner of {', '.join(PRUNERS)} "
            f"and a sampler of {', '.join(SAMPLERS)}."
        )
    if not metric.startswith("eval_"):
        raise ConfigError(f"--metric {metric} is not an evaluation; use an eval_* key.")
    study_dir = Path(study_dir)
    groups = device_groups(list(devices or jax.local_devices()), devices_per_trial)
    direction = "minimize" if metric_mode(metric, mode) == "min" else "maximize"
    identity = _identity(cfg, dims, metric, direction)
    cache = StepCache()
    # A new study's metric is checked before anything is written: a bad one leaves no trace.
    checked = storage is None and not (study_dir / "study.journal").is_file()
    if checked:
        check_metric(cfg, groups[0], cache, metric)
    store = _storage(study_dir, storage)
    study_dir.mkdir(parents=True, exist_ok=True)
    if not checked and study_dir.name not in optuna.get_all_study_names(storage=store):
        check_metric(cfg, groups[0], cache, metric)
    if sampler == "grid":
        size = math.prod(len(d.grid()) for d in dims)
        if trials > size:
            log(f"--trials={trials} is more than the grid's {size} points: running {size}")
            trials = size
    with _study_lock(study_dir):  # the first worker creates it; the others find it made
        study = optuna.create_study(
            storage=store,
            study_name=study_dir.name,
            direction=direction,
            sampler=_sampler(sampler, dims, trials, sampler_seed),
            pruner=_pruner(pruner, cfg),
            load_if_exists=True,
        )
        known = study.user_attrs.get("shardtrain")
        if known is None:
            study.set_user_attr("shardtrain", identity)
            for params in enqueue:
                study.enqueue_trial(params)
    if known is not None and known != identity:
        raise ConfigError(
            f"The study in {study_dir} searched another space or config "
            f"({_first_difference(known, identity)}); run it with the same flags, or pass a new "
            "--study_dir."
        )
    search = _Search(study, cfg, dims, study_dir, trials, metric, cache, log)
    beat = threading.Thread(target=search.heartbeat, daemon=True)
    beat.start()
    workers = [threading.Thread(target=search.work, args=(g,), daemon=True) for g in groups[1:]]
    for worker in workers:
        worker.start()
    try:
        search.work(groups[0])  # the main thread: Ctrl-C reaches its trial's loop
    finally:
        for worker in workers:
            worker.join()
        search.stop.set()
    if search.errors:
        raise search.errors[0]
    if search.interrupted:
        log("interrupted: the running trials were marked failed; run the same command to "
            "continue the study")  # fmt: skip
    write_best(study, study_dir)
    plot.study_plots(study, dims, metric, study_dir)
    return study


def write_best(study: optuna.Study, study_dir: Path) -> Path | None:
    """`study_dir/best.json`: the best trial's config, training in `study_dir/best_run`."""
    best = _best(study)
    if best is None:
        return None
    config = json.loads((study_dir / "trials" / str(best.number) / "config.json").read_text())
    config["run_dir"] = str(study_dir / "best_run")
    path = study_dir / "best.json"
    part = path.with_name("best.json.part")
    part.write_text(json.dumps(config, indent=2) + "\n")
    part.replace(path)
    return path


if __name__ == "__main__":  # python -m engine.tune
    import sys

    from engine.tune_main import main

    sys.exit(main())
