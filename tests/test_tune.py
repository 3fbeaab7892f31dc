"""Automatic tuning: early stopping as a loop callback, and hyper-parameter studies on Optuna
whose trials are real training runs."""

import dataclasses
import json
import subprocess

import jax
import numpy as np
import optuna
import pytest
from conftest import cli

from engine.callbacks import Callback, EarlyStopConfig
from engine.checkpoint import restore_params
from engine.config import PRESETS, CheckpointConfig, parse_args
from engine.trainer import Trainer, train
from engine.tune import HOST, tune
from engine.tune_main import main as tune_main

STATES = optuna.trial.TrialState
ONE = jax.devices()[:1]  # digits trains in ~1 ms a step on one device


def digits(run_dir, **overrides):
    base = PRESETS["digits"]
    log = dataclasses.replace(base.log, progress=False, tensorboard=False, summary_every=10**6)
    return dataclasses.replace(base, log=log, run_dir=str(run_dir), **overrides)


def plateau(run_dir, **overrides):
    """digits, evaluated every 20 steps, stopping once eval_loss gains under 0.01 twice."""
    stop = EarlyStopConfig(patience=2, min_delta=0.01, restore_best=True)
    ckpt = CheckpointConfig(every=20, keep=1)
    return digits(run_dir, eval_every=20, early_stop=stop, checkpoint=ckpt, **overrides)


def test_early_stopping_ends_a_plateaued_run_and_keeps_the_best_checkpoint(tmp_path, capsys):
    trainer = Trainer(plateau(tmp_path), ONE)
    records = trainer.fit()
    stopped = records[-1]["step"]
    assert stopped < 500  # --steps
    best = json.loads((tmp_path / "best.json").read_text())
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert best["step"] == min(evals, key=evals.get) and best["value"] == min(evals.values())
    assert best["step"] == stopped - 40  # two evaluations without a gain of 0.01 followed
    # keep=1 rotated every other checkpoint away; the best one stays.
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [
        best["step"], stopped
    ]  # fmt: skip
    out = capsys.readouterr().out
    assert (
        f"early stop: eval_loss did not improve by more than 0.01 in 2 evaluations "
        f"(--early_stop.patience=2); best eval_loss {best['value']:.4f} at step {best['step']}: "
        f"stopped after step {stopped}" in out
    )
    # restore_best: the run's params and what --init_from/export read are the best step's.
    best_params = restore_params(tmp_path, trainer.run)
    kept = trainer.run.state.params
    for a, b in zip(jax.tree.leaves(best_params), jax.tree.leaves(kept), strict=True):
        np.testing.assert_array_equal(a, b)
    # The same command again does not train on past the early stop.
    assert Trainer(plateau(tmp_path), ONE).fit() == []


class StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_eval(self, trainer, record):
        return record["step"] == self.step


def test_a_resumed_run_keeps_its_patience_count(tmp_path):
    whole = train(plateau(tmp_path / "whole"), ONE)
    stopped = whole[-1]["step"]
    # Killed one evaluation before the early stop (one evaluation without a gain counted),
    # then resumed: it must stop where the whole run did, not two evaluations later.
    cut = plateau(tmp_path / "cut")
    train(cut, ONE, callbacks=[StopAt(stopped - 20)])
    resumed = train(cut, ONE)
    assert resumed[0]["step"] == stopped - 20 + 1 and resumed[-1]["step"] == stopped
    best = [json.loads((tmp_path / d / "best.json").read_text()) for d in ("whole", "cut")]
    assert best[0] == {**best[1], "value": pytest.approx(best[1]["value"], rel=1e-6)}


def test_a_digits_study_prunes_a_bad_trial_reuses_compiled_steps_and_its_best_trains(tmp_path):
    study_dir = tmp_path / "study"
    cfg = digits(tmp_path / "unused", steps=60, eval_every=20)
    space = ["optim.lr=log:1e-4:10", "batch_size=choice:32,64"]
    first = [
        {"optim.lr": 3e-3, "batch_size": 64},
        {"optim.lr": 1e-2, "batch_size": 64},
        {"optim.lr": 1e-2, "batch_size": 32},
        {"optim.lr": 10.0, "batch_size": 64},  # hopeless
    ]
    study = tune(cfg, space, study_dir, 4, metric="eval_accuracy", enqueue=first,
                 devices=ONE, sampler_seed=0, log=lambda line: None)  # fmt: skip
    trials = study.get_trials()
    assert [t.params for t in trials] == first
    bad = trials[3]
    assert bad.state == STATES.PRUNED and "stopped" not in bad.user_attrs  # the pruner's doing
    steps = [json.loads(line)["step"] for line in open(study_dir / "trials/3/metrics.jsonl")]
    assert steps[-1] == 20  # stopped at its first evaluation, not at step 60
    # Only a change of batch size compiles: the base config (64) compiled the others' steps.
    assert [t.user_attrs["compiled"] for t in trials] == [False, False, True, False]
    assert (study_dir / "history.png").stat().st_size > 0
    assert (study_dir / "params.png").stat().st_size > 0

    # best.json trains as it is, and gives the best trial's result again.
    best = max((t for t in trials if t.state == STATES.COMPLETE), key=lambda t: t.value)
    records = train(parse_args(["--config", str(study_dir / "best.json")]), ONE)
    assert records[-1]["eval_accuracy"] == pytest.approx(best.value, abs=1e-6)

    # A finished study runs nothing more; a larger one adds just the missing trials.
    again = tune(cfg, space, study_dir, 4, metric="eval_accuracy", devices=ONE,
                 log=lambda line: None)  # fmt: skip
    assert len(again.get_trials()) == 4
    more = tune(cfg, space, study_dir, 5, metric="eval_accuracy", devices=ONE,
                log=lambda line: None)  # fmt: skip
    assert [t.number for t in more.get_trials()] == [0, 1, 2, 3, 4]
    assert len(list((study_dir / "trials").iterdir())) == 5


def test_a_trial_whose_worker_died_is_marked_failed_and_replaced(tmp_path):
    study_dir = tmp_path / "study"
    cfg = digits(tmp_path / "unused", steps=20, eval_every=0)
    args = (cfg, ["optim.lr=log:1e-3:1e-2"], study_dir)
    tune(*args, 1, pruner="none", devices=ONE, log=lambda line: None)
    # A worker that asked for a trial and was killed: its trial stays RUNNING in the journal.
    dead = subprocess.Popen(["true"])
    dead.wait()
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(study_dir / "study.journal"))
    )
    orphan = optuna.load_study(study_name="study", storage=storage).ask()
    orphan.set_user_attr("host", HOST)
    orphan.set_user_attr("pid", dead.pid)
    lines = []
    study = tune(*args, 2, pruner="none", devices=ONE, log=lines.append)
    assert f"trial 1 marked failed: its worker (pid {dead.pid} on {HOST}) stopped mid-trial" in (
        lines
    )
    assert [t.state for t in study.get_trials()] == [STATES.COMPLETE, STATES.FAIL, STATES.COMPLETE]


def test_two_processes_share_one_study(tmp_path):
    study_dir = tmp_path / "study"
    args = ("--config", "digits", "--steps=500", "--eval_every=100", "--log.tensorboard=False",
            f"--study_dir={study_dir}", "--trials=6", "--space", "optim.lr=log:1e-4:1e-1",
            "--pruner=none", f"--compile_cache={tmp_path / 'xla'}")  # fmt: skip
    workers = [cli(*args, devices=2, background=True, module="engine.tune") for _ in range(2)]
    for w in workers:
        out, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(study_dir / "study.journal"))
    )
    trials = optuna.load_study(study_name="study", storage=storage).get_trials()
    assert [t.number for t in trials] == list(range(6))  # six in all, none twice
    assert all(t.state == STATES.COMPLETE for t in trials)
    assert {t.user_attrs["pid"] for t in trials} == {w.pid for w in workers}  # both worked
    assert sorted(int(p.name) for p in (study_dir / "trials").iterdir()) == list(range(6))


@pytest.mark.parametrize(
    "flags, sentence",
    [
        (["--space", "optim.lr=lg:1:2"], "--space 'optim.lr=lg:1:2' is not KEY=KIND:VALUES"),
        (["--space", "optim.lr=log:0:1"], "takes the log of 0.0; use a LOW above 0"),
        (["--space", "optim.lr=float:2:1"], "has LOW 2.0 above HIGH 1.0; swap them."),
        (["--space", "optim.lrr=log:1e-3:1"], "names no config key; did you mean 'optim.lr'?"),
        (["--space", "batch_size=choice:32,x"], "'x' is not an integer."),
        (["--space", "optim.lr=log:1e-3:1", "--metric", "eval_bleu"],
         "--metric eval_bleu is never reported by this task's evaluations; use one of eval_loss"),
        (["--space", "optim.lr=log:1e-3:1", "--storage", "sqlite:////no/such/dir/x.db"],
         "--storage=sqlite:////no/such/dir/x.db could not be opened"),
        (["--space", "optim.lr=log:1e-3:1", "--devices_per_trial", "3"],
         "--devices_per_trial=3 does not divide the 8 local devices; use one of 1, 2, 4, 8."),
    ],
    ids=["kind", "log", "order", "key", "type", "metric", "storage", "devices"],
)  # fmt: skip
def test_bad_tuning_input_gets_one_sentence_and_writes_no_study(tmp_path, capsys, flags, sentence):
    study_dir = tmp_path / "study"
    code = tune_main(["--config", "digits", f"--study_dir={study_dir}", *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and sentence in err
    assert len(err.strip().splitlines()) == 1
    assert not study_dir.exists()


def test_trials_in_parallel_on_disjoint_device_groups(tmp_path):
    """8 devices, 2 per trial: four trials at once, each on its own devices, each saving a
    checkpoint every 4 steps (orbax's saves in one process must not overlap: they share one
    operation id)."""
    cfg = digits(tmp_path / "unused", steps=40, eval_every=0,
                 checkpoint=CheckpointConfig(every=4, keep=2))  # fmt: skip
    study = tune(cfg, ["optim.lr=log:1e-3:1e-2"], tmp_path / "study", 4, pruner="none",
                 devices_per_trial=2, log=lambda line: None)  # fmt: skip
    trials = study.get_trials()
    assert [t.state for t in trials] == [STATES.COMPLETE] * 4
    starts = sorted(t.datetime_start for t in trials)
    ends = sorted(t.datetime_complete for t in trials)
    assert starts[1] < ends[0]  # at least two overlapped
    groups = {tuple(t.user_attrs["devices"]) for t in trials}
    assert all(len(g) == 2 for g in groups) and len(set().union(*groups)) == 2 * len(groups)
