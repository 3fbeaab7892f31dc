"""Training and study plots (matplotlib figures: saved as PNG, or shown inline in a notebook).

`run_curves`: training curves of one or more run directories, one panel per metric against
the step, runs overlaid (`python -m engine.plot RUN_DIR ...`; `--log.plot` writes a run's own
`curves.png` when it ends). `study_plots`: a hyper-parameter study's optimization history and
its metric against each searched value (engine.tune writes both into the study directory).

    python -m engine.plot runs/default runs/moe --metrics loss,eval_loss --out compare.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

# Figures, not pyplot: no display or GUI backend is needed (CI, clusters, tuning threads), and
# importing this module leaves the user's backend (a notebook's inline one) as it was.
from matplotlib.figure import Figure

from engine.config import ConfigError

DEFAULT_METRICS = ("loss", "eval_loss", "tokens_per_sec", "mfu", "peak_memory_gb")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of `run_dir/metrics.jsonl`; a half-written last line (a run still writing)
    is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(
            f"{run_dir} has no metrics.jsonl; pass a run directory that training wrote "
            "(--run_dir of engine.train)."
        )
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ConfigError(f"{path} line {i + 1} is not JSON: {line[:60]!r}.") from None
    return records


def _series(records: list[dict], metric: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[metric]) for r in records
              if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]  # fmt: skip
    return [s for s, _ in points], [v for _, v in points]


def _smooth(values: list[float], n: int) -> list[float]:
    """Trailing mean over up to `n` points (the first points average what there is)."""
    windows = (values[max(0, i - n + 1) : i + 1] for i in range(len(values)))
    return [sum(w) / len(w) for w in windows]


def _spans_decades(values: list[float]) -> bool:
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 100


def _labels(run_dirs: Sequence[Path]) -> list[str]:
    """Each run's directory name, or its last two parts where names repeat."""
    names = [p.name for p in run_dirs]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in run_dirs]


def run_curves(run_dirs, metrics: Sequence[str] | None = None, out=None, smooth: int = 1):
    """One panel per metric against step, each run a line (labelled by its directory); returns
    the matplotlib Figure (saved to `out` as a PNG when given). `metrics` default to those of
    DEFAULT_METRICS some run logged; a metric no run has is one error sentence. `smooth`
    averages per-step metrics over that many points; evaluations (eval_*) are drawn as logged."""
    run_dirs = [Path(d) for d in run_dirs]
    runs = {label: read_metrics(d) for label, d in zip(_labels(run_dirs), run_dirs, strict=True)}
    present = {m for records in runs.values() for r in records for m, v in r.items()
               if isinstance(v, (int, float)) and m != "step"}  # fmt: skip
    if metrics is None:
        metrics = [m for m in DEFAULT_METRICS if m in present]
    missing = [m for m in metrics if m not in present] or ([] if metrics else DEFAULT_METRICS)
    if missing:
        raise ConfigError(
            f"No run in {', '.join(map(str, run_dirs))} logged {', '.join(missing)}; they hold "
            f"{', '.join(sorted(present)) or 'no metrics yet'}."
        )
    if smooth < 1:
        raise ConfigError(f"--smooth={smooth} must be at least 1 (1 = no smoothing).")
    fig = Figure(figsize=(4.2 * len(metrics), 3.4))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        steps_seen, values_seen = [], []
        for label, records in runs.items():
            steps, values = _series(records, metric)
            if steps:
                window = 1 if metric.startswith("eval_") else smooth
                ax.plot(steps, _smooth(values, window), label=label,
                        marker="o" if len(steps) < 20 else None)  # fmt: skip
                steps_seen += steps
                values_seen += values
        # Log axes where the data span decades: the early steps are where things happen, and a
        # diverged run's loss would otherwise flatten every other curve.
        if _spans_decades(steps_seen):
            ax.set_xscale("log")
        if _spans_decades(values_seen):
            ax.set_yscale("log")
        ax.set(xlabel="step", title=metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    if out is not None:
        fig.savefig(out, dpi=110)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.plot", description="Training curves of run directories, overlaid."
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--metrics", help=f"comma-separated (default: {','.join(DEFAULT_METRICS)}"
                        " where logged)")  # fmt: skip
    parser.add_argument("--out", help="PNG path (default: RUN_DIR/curves.png for one run, "
                        "curves.png for several)")  # fmt: skip
    parser.add_argument(
        "--smooth",
        type=int,
        default=1,
        help="trailing mean over N points (per-step metrics; evaluations are drawn as logged)",
    )
    args = parser.parse_args(argv)
    out = args.out or (Path(args.run_dirs[0]) / "curves.png" if len(args.run_dirs) == 1
                       else Path("curves.png"))  # fmt: skip
    metrics = [m for m in args.metrics.split(",") if m] if args.metrics else None
    try:
        run_curves(args.run_dirs, metrics, out, args.smooth)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _points(study, state) -> list[tuple[int, dict, float]]:
    """(number, params, value) of the trials in `state`; a pruned trial's value is its last
    report."""
    from engine.tune import trial_value

    trials = study.get_trials(deepcopy=False, states=(state,))
    return [(t.number, t.params, trial_value(t)) for t in trials if trial_value(t) is not None]


def study_plots(study, dims, metric: str, out_dir: str | Path) -> list[Path]:
    """`history.png` (each trial's result and the best so far) and `params.png` (the metric
    against each searched value) in `out_dir`."""
    from optuna.trial import TrialState

    out_dir = Path(out_dir)
    complete = _points(study, TrialState.COMPLETE)
    pruned = _points(study, TrialState.PRUNED)
    if not complete and not pruned:
        return []
    better = min if study.direction.name == "MINIMIZE" else max
    paths = [out_dir / "history.png", out_dir / "params.png"]

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    if pruned:
        ax.scatter(*zip(*[(n, v) for n, _, v in pruned], strict=True), marker="x",
                   color="0.6", label="pruned (last report)")  # fmt: skip
    if complete:
        ax.scatter(*zip(*[(n, v) for n, _, v in complete], strict=True), label="complete")
        numbers, values = zip(*[(n, v) for n, _, v in complete], strict=True)
        best = [better(values[: i + 1]) for i in range(len(values))]
        last = max(n for n, _, _ in complete + pruned)  # the line runs to the last trial
        ax.step([*numbers, last], [*best, best[-1]], where="post", color="C3", label="best so far")
    ax.set(xlabel="trial", ylabel=metric, title=f"{study.study_name}: optimization history")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)

    fig = Figure(figsize=(4 * len(dims), 3.5))
    axes = fig.subplots(1, len(dims), squeeze=False)
    for ax, dim in zip(axes[0], dims, strict=True):
        # Choices sit at their index, in the order the space lists them.
        where = dim.values.index if dim.kind == "choice" else (lambda v: v)
        for points, style in ((pruned, dict(marker="x", color="0.6")), (complete, {})):
            xs = [(where(p[dim.key]), v) for _, p, v in points if dim.key in p]
            if xs:
                ax.scatter(*zip(*xs, strict=True), **style)
        if dim.kind == "choice":
            ax.set_xticks(range(len(dim.values)), [str(v) for v in dim.values])
        if dim.kind == "log":
            ax.set_xscale("log")
        ax.set(xlabel=dim.key, ylabel=metric)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    return paths


if __name__ == "__main__":
    sys.exit(main())
