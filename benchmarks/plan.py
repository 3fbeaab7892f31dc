"""How good is the planner? Memory predictions against XLA, its ranking against measured step
times, and how long planning takes.

    python benchmarks/plan.py                 # all three parts, ~10 min on 2 CPU cores
    python benchmarks/plan.py --part memory   # or ranking, or speed
    python benchmarks/plan.py --part fit      # refit the memory model's coefficients

- memory: predicted per-device memory against `memory_analysis()` of the compiled step, over
  presets x meshes x remat on 8 virtual CPU devices (goal: within 10 % on every row).
- ranking: the valid plans of the `tiny` preset on 8 virtual CPU devices (remat none or full,
  at most 2 accumulation steps, no loss chunks, one pipeline repeat),
  predicted (with the measured cpu profile) against measured step time; Spearman's rank
  correlation (goal >= 0.8).
- speed: the analytical search for `8b` on 64 H100s (goal < 10 s), then confirming its top 3
  by compiling them on 64 virtual CPU devices (goal < 5 min), in a child process.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from engine.autoplan import plan_search, target_for, workload  # noqa: E402
from engine.config import PRESETS  # noqa: E402
from engine.estimate import compile_abstract, memory  # noqa: E402
from engine.plan import Plan, apply_plan, violations  # noqa: E402
from engine.setup import setup  # noqa: E402
from sharding.planner import Candidate, estimate  # noqa: E402

MESHES = [
    {"data": 8},
    {"fsdp": 8},
    {"data": 2, "tensor": 4},
    {"fsdp": 4, "tensor": 2},
    {"fsdp": 4, "pipeline": 2},
]


def preset(name: str, **changes):
    cfg = PRESETS[name]
    if name == "small":  # shorter rows so the grid compiles in minutes on 2 cores
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=256))
    return dataclasses.replace(cfg, **changes)


def grid():
    """(preset, mesh, remat, config changes) rows: presets x meshes x remat, and a few
    variants (bf16, accumulation, loss chunks, more microbatches through a pipeline)."""
    rows = [(name, mesh, remat, {})
            for name in ("tiny", "default", "small") for mesh in MESHES
            for remat in ("none", "dots_no_batch", "full")]  # fmt: skip
    rows += [
        ("tiny", {"data": 8}, "dots", {}),
        ("default", {"fsdp": 8}, "none", {"precision": "bf16"}),
        ("default", {"data": 2, "fsdp": 4}, "full", {"precision": "bf16"}),
        ("default", {"data": 8}, "none", {"batch_size": 64, "optim.microbatches": 2}),
        ("default", {"fsdp": 8}, "none", {"model.loss_chunks": 4}),
        ("small", {"data": 8}, "none", {"precision": "fp32"}),
        ("small", {"fsdp": 4, "pipeline": 2}, "full", {"pipeline.microbatches": 4}),
    ]
    return rows


def configure(name, mesh, remat, changes):
    cfg = preset(name)
    # The layer loop, which the estimate models (`default` unrolls its layers; the planner runs
    # remat plans as the loop, and unrolled no-remat plans need less: engine.autoplan.to_plan).
    sections = {"model": {"remat": remat, "scan_unroll": 1}}
    for key, value in changes.items():
        section, _, field = key.rpartition(".")
        if section:
            sections.setdefault(section, {})[field] = value
        else:
            cfg = dataclasses.replace(cfg, **{field: value})
    for section, values in sections.items():
        cfg = dataclasses.replace(
            cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)}
        )
    plan = Plan.from_config(cfg, mesh=mesh)
    return apply_plan(cfg, plan), plan


def compiled_rows():
    """Each valid grid row with the planner's estimate and XLA's figure (GB per device)."""
    target = target_for("cpu", 8)
    for name, mesh, remat, changes in grid():
        cfg, plan = configure(name, mesh, remat, changes)
        if violations(cfg, plan, 8, "cpu"):  # e.g. 2 kv heads over tensor=4
            continue
        xla = memory(compile_abstract(cfg, plan)).total_gb
        full = {a.name: mesh.get(a.name, 1) for a in plan.axes}
        c = Candidate(full, remat, plan.microbatches, plan.pipeline.microbatches,
                      plan.pipeline.repeats, plan.loss_chunks)  # fmt: skip
        est = estimate(workload(cfg, plan), c, target, plan.rules, cfg.precision)
        label = " x ".join(f"{a}={s}" for a, s in mesh.items())
        extra = " ".join(f"{k}={v}" for k, v in changes.items())
        yield f"{name:8s} {label:22s} {remat:14s} {extra:30s}", est, xla


def memory_grid() -> float:
    print(f"{'row':77s} {'predicted':>10s} {'XLA':>10s}  error")
    worst = {True: 0.0, False: 0.0}
    for label, est, xla in compiled_rows():
        predicted = est.memory_gb["total"]
        error = predicted / xla - 1
        pipelined = "pipeline" in label
        worst[pipelined] = max(worst[pipelined], abs(error))
        print(f"{label} {predicted * 1e3:7.1f} MB {xla * 1e3:7.1f} MB  {error:+6.1%}", flush=True)
    print(f"worst row without a pipeline: {worst[False]:.1%} off; with one: {worst[True]:.1%}")
    return worst[False]


def fit() -> None:
    """Refit sharding.planner.FIT: non-negative least squares of XLA's temporaries (beyond
    the exact state and batch) on the model's terms, relative errors weighted equally."""
    from scipy.optimize import nnls

    from sharding.planner import FIT

    rows = list(compiled_rows())
    # Pipelined rows are only reported: one pipeline shape per preset is too few to fit the
    # stage terms, which keep their values (stage_inputs is counted, not fitted).
    fitted = np.array(["pipeline" not in label for label, _, _ in rows])
    names = [
        k
        for k in FIT
        if any(e.memory_terms[k] for (_, e, _), f in zip(rows, fitted, strict=True) if f)
    ]
    kept = [k for k in FIT if k not in names]
    terms = np.array([[est.memory_terms[k] for k in names] for _, est, _ in rows])
    exact = np.array([est.memory_gb["state"] + est.memory_gb["batch"] for _, est, _ in rows])
    exact += np.array([sum(FIT[k] * est.memory_terms[k] for k in kept) for _, est, _ in rows])
    xla = np.array([x for _, _, x in rows])
    weight = 1 / xla
    coef, _ = nnls((terms * weight[:, None])[fitted], ((xla - exact) * weight)[fitted])
    coef = dict(zip(names, coef, strict=True))
    names = list(FIT)
    coef = [coef.get(k, FIT[k]) for k in names]
    predicted = np.array([[est.memory_terms[k] for k in names] for _, est, _ in rows]) @ coef
    predicted += np.array([est.memory_gb["state"] + est.memory_gb["batch"] for _, est, _ in rows])
    for (label, _, _), p, x in zip(rows, predicted, xla, strict=True):
        print(f"{label} {p * 1e3:7.1f} MB {x * 1e3:7.1f} MB  {p / x - 1:+6.1%}")
    error = np.abs(predicted / xla - 1)
    print(f"worst row without a pipeline: {error[fitted].max():.1%} off; with one: "
          f"{error[~fitted].max():.1%}")  # fmt: skip
    print(
        "FIT = {\n"
        + "".join(f'    "{k}": {c:.2f},\n' for k, c in zip(names, coef, strict=True))
        + "}"
    )


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def ranking() -> float:
    cfg = PRESETS["tiny"]
    target = target_for("cpu", 8)
    fits, _ = plan_search(cfg, target, {"loss_chunks": 1}, platform="cpu")
    # A few minutes' worth: two remat policies, up to 2 accumulation steps, one repeat.
    fits = [(p, e) for p, e in fits if p.remat in ("none", "full") and p.microbatches <= 2
            and p.pipeline.repeats == 1]  # fmt: skip
    print(f"{len(fits)} valid plans; measuring each (median of 5 steps after 2 warm-up steps)")
    predicted, measured = [], []
    for plan, est in fits:
        run = setup(apply_plan(cfg, plan), plan=plan)
        times = []
        for i in range(7):
            batch = run.put_batch(run.task.train_batch(i))
            start = time.perf_counter()
            run.state, metrics = run.train_step(run.state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        predicted.append(est.times_s["step"])
        measured.append(float(np.median(times[2:])))
        print(f"  {est.candidate.describe():52s} predicted {predicted[-1] * 1e3:7.2f} ms  "
              f"measured {measured[-1] * 1e3:7.2f} ms", flush=True)  # fmt: skip
    rho = spearman(predicted, measured)
    best = int(np.argmin(measured))
    print(f"Spearman rank correlation: {rho:.3f} over {len(fits)} plans; the planner's pick "
          f"measured {measured[0] * 1e3:.2f} ms, the fastest measured "
          f"{measured[best] * 1e3:.2f} ms ({fits[best][1].candidate.describe()})")  # fmt: skip
    return rho


def speed() -> None:
    cfg = PRESETS["8b"]
    start = time.perf_counter()
    fits, rejected = plan_search(cfg, target_for("h100", 64, hosts=8))
    analytic = time.perf_counter() - start
    print(f"8b on 64 H100s, analytical stage: {analytic:.1f} s ({len(fits)} plans fit, "
          f"{len(rejected)} rejected); #1 {fits[0][1].candidate.describe()}")  # fmt: skip
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=64")
    command = [sys.executable, "-m", "engine.plan", "--config", "8b", "--target.devices",
               "64", "--target.kind", "h100", "--target.hosts", "8", "--confirm", "3",
               "--json"]  # fmt: skip
    start = time.perf_counter()
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    total = time.perf_counter() - start
    for c in json.loads(out.stdout)["confirmed"]:
        print(f"  #{c['rank']}: predicted {c['predicted_gb']:.2f} GB on H100, "
              f"{c['predicted_cpu_gb']:.2f} GB as XLA's CPU plan; XLA (CPU) {c['xla_gb']:.2f} GB "
              f"({c['error']:+.0%}), compiled in {c['compile_s']:.0f} s")  # fmt: skip
    print(f"planning and confirming the top 3 on 64 virtual CPU devices: {total:.0f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parts = ("memory", "ranking", "speed", "fit", "all")
    parser.add_argument("--part", choices=parts, default="all")
    part = parser.parse_args().part
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {len(jax.devices())} devices")
    if part in ("memory", "all"):
        memory_grid()
    if part in ("ranking", "all"):
        ranking()
    if part in ("speed", "all"):
        speed()
    if part == "fit":
        fit()
