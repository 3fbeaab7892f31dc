"""Plots as PNG files (matplotlib, no display needed).

`study_plots`: a hyper-parameter study's optimization history and its metric against each
searched value (engine.tune writes both into the study directory).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works without a display, in CI and on clusters
import matplotlib.pyplot as plt  # noqa: E402
from optuna.trial import TrialState  # noqa: E402


def _points(study, state: TrialState) -> list[tuple[int, dict, float]]:
    """(number, params, value) of the trials in `state`; a pruned trial's value is its last
    report."""
    from engine.tune import trial_value

    trials = study.get_trials(deepcopy=False, states=(state,))
    return [(t.number, t.params, trial_value(t)) for t in trials if trial_value(t) is not None]


def study_plots(study, dims, metric: str, out_dir: str | Path) -> list[Path]:
    """`history.png` (each trial's result and the best so far) and `params.png` (the metric
    against each searched value) in `out_dir`."""
    out_dir = Path(out_dir)
    complete = _points(study, TrialState.COMPLETE)
    pruned = _points(study, TrialState.PRUNED)
    if not complete and not pruned:
        return []
    better = min if study.direction.name == "MINIMIZE" else max
    paths = [out_dir / "history.png", out_dir / "params.png"]

    fig, ax = plt.subplots(figsize=(7, 4))
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
    plt.close(fig)

    fig, axes = plt.subplots(1, len(dims), figsize=(4 * len(dims), 3.5), squeeze=False)
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
    plt.close(fig)
    return paths
