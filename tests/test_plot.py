"""engine.plot: training curves of run directories, from metrics.jsonl to the panels' lines."""

import dataclasses
import json

import numpy as np
import pytest
from conftest import cli, tiny_config

from engine.config import ConfigError
from engine.optim import OptimConfig
from engine.plot import read_metrics, run_curves
from engine.trainer import train


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two short `tiny` runs with different learning rates, evaluated every 2 steps; the
    first with --log.plot."""
    root = tmp_path_factory.mktemp("runs")
    dirs = []
    for name, lr, plot in (("fast", 3e-3, True), ("slow", 1e-3, False)):
        cfg = tiny_config(root / name, steps=6, eval_every=2, optim=OptimConfig(lr=lr))
        cfg = dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, plot=plot))
        train(cfg)
        dirs.append(root / name)
    return dirs


def test_panels_hold_each_runs_metrics_against_step(two_runs):
    fig = run_curves(two_runs, ["loss", "eval_loss"])
    loss_ax, eval_ax = fig.axes[:2]
    assert [ax.get_title() for ax in (loss_ax, eval_ax)] == ["loss", "eval_loss"]
    for ax, metric in ((loss_ax, "loss"), (eval_ax, "eval_loss")):
        assert [line.get_label() for line in ax.lines] == ["fast", "slow"]
        for line, run_dir in zip(ax.lines, two_runs, strict=True):
            records = [r for r in read_metrics(run_dir) if metric in r]
            np.testing.assert_array_equal(line.get_xdata(), [r["step"] for r in records])
            np.testing.assert_allclose(line.get_ydata(), [r[metric] for r in records])
    assert len(eval_ax.lines[0].get_xdata()) == 3  # steps 2, 4, 6


def test_smoothing_is_a_trailing_mean_of_per_step_metrics_only(two_runs):
    fig = run_curves(two_runs[:1], ["loss", "eval_loss"], smooth=3)
    records = read_metrics(two_runs[0])
    losses = [r["loss"] for r in records]
    want = [np.mean(losses[max(0, i - 2) : i + 1]) for i in range(len(losses))]
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), want)
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    np.testing.assert_allclose(fig.axes[1].lines[0].get_ydata(), evals)  # as evaluated


def test_log_plot_writes_the_runs_curves_at_the_end(two_runs):
    fast, slow = two_runs
    assert (fast / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (slow / "curves.png").exists()


def test_a_half_written_last_line_is_skipped(two_runs, tmp_path):
    lines = (two_runs[0] / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 7, "lo')
    assert read_metrics(tmp_path) == [json.loads(line) for line in lines]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lo\n' + "\n".join(lines))
    with pytest.raises(ConfigError, match="line 1 is not JSON"):
        read_metrics(tmp_path)


def test_bad_run_directories_and_metrics_are_one_sentence(two_runs, tmp_path):
    with pytest.raises(ConfigError, match=f"^{tmp_path} has no metrics.jsonl; pass a run"):
        run_curves([tmp_path])
    with pytest.raises(ConfigError, match="logged mfu_typo; they hold .*eval_loss.*loss"):
        run_curves(two_runs, ["loss", "mfu_typo"])


def test_command_line_writes_a_png_and_refuses_bad_input(two_runs, tmp_path):
    out = tmp_path / "both.png"
    done = cli(*map(str, two_runs), "--metrics", "loss,eval_loss", "--out", str(out),
               module="engine.plot")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:4] == b"\x89PNG"
    bad = cli(str(tmp_path), module="engine.plot")
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        f"error: {tmp_path} has no metrics.jsonl; pass a run directory that training wrote "
        "(--run_dir of engine.train)."
    )


def test_axes_turn_logarithmic_only_where_the_data_span_decades(tmp_path):
    steps = range(1, 201)
    records = [{"step": s, "loss": 5000.0 / s, "eval_accuracy": 0.5 + s / 1000} for s in steps]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    fig = run_curves([tmp_path], ["loss", "eval_accuracy"])
    loss, accuracy = fig.axes
    assert (loss.get_xscale(), loss.get_yscale()) == ("log", "log")  # a diverged run's scale
    assert (accuracy.get_xscale(), accuracy.get_yscale()) == ("log", "linear")
    short = [{"step": s, "loss": 2.0 + 1 / s} for s in range(10, 60)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in short))
    (axis,) = run_curves([tmp_path], ["loss"]).axes
    assert (axis.get_xscale(), axis.get_yscale()) == ("linear", "linear")
