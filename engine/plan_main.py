"""`python -m engine.plan`: rank every plan for a model on a target cluster.

    python -m engine.plan --config 8b --target.devices 64 --target.kind h100 --target.hosts 8

prints a table of the plans that fit, fastest first (memory per device against the budget,
predicted step time, tokens/s, MFU and what bounds it), why the nearest other plans were
rejected, and XLA's own memory figure for the top plans compiled ahead of time on virtual CPU
devices (`--confirm K`; never executed). `--json` prints the same as data.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time

import tyro

from engine.config import ConfigError, parse_args, split_flags
from engine.metrics import format_bytes
from sharding import ShardingError
from sharding.devices import DeviceSpec


@dataclasses.dataclass(frozen=True)
class TargetArgs:
    devices: int = 8
    """Devices in the cluster."""
    kind: str = "h100"
    """Device kind: a row of sharding.devices (h100, h200, a100, l4, tpu-v6e, tpu-v5p, tpu-v5e,
    tpu-v4) or cpu (measured here)."""
    hosts: int = 1
    """Hosts the devices are spread over (collectives between them use the network)."""
    memory_gb: float | None = None
    """Memory budget per device; default the kind's memory x 0.9."""
    bf16_flops: float | None = None
    fp32_flops: float | None = None
    hbm_gbps: float | None = None
    intra_gbps: float | None = None
    inter_gbps: float | None = None
    latency_us: float | None = None


@dataclasses.dataclass(frozen=True)
class PlanArgs:
    target: TargetArgs = TargetArgs()
    top: int = 10
    """Plans to list."""
    confirm: int = 3
    """Top plans to compile ahead of time on virtual CPU devices to compare XLA's memory figure
    (0 = none)."""
    json: bool = False
    """Print the result as JSON."""


_OWN = ("--target.", "--top", "--confirm", "--json", "--help", "-h")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, rest = split_flags(argv, _OWN, switches=("--json",))
    args = tyro.cli(
        PlanArgs,
        args=own,
        prog="python -m engine.plan",
        description=__doc__.split("\n\n")[0]
        + "\n\nConfig keys (--config, --batch_size, --model.*, ...) are engine.train's.",
        use_underscores=True,
        config=(tyro.conf.FlagConversionOff,),
    )
    try:
        cfg = parse_args(rest)
        _virtual_cpu_devices(args.target.devices if args.confirm else 1)
        from engine.autoplan import no_plan_error, plan_search, target_for

        spec_fields = {f.name for f in dataclasses.fields(DeviceSpec)} - {"kind"}
        overrides = {k: v for k, v in vars(args.target).items() if k in spec_fields}
        target = target_for(
            args.target.kind, args.target.devices, args.target.hosts, args.target.memory_gb,
            **overrides,
        )  # fmt: skip
        start = time.perf_counter()
        fits, rejected = plan_search(cfg, target, platform="gpu")
        planned_s = time.perf_counter() - start
        if not fits:
            raise no_plan_error(cfg, target, rejected, {})
        confirmed = _confirm(cfg, fits[: args.confirm], target)
    except (ConfigError, ShardingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = _report(cfg, target, fits, rejected, confirmed, args.top, planned_s)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_table(report))
    return 0


def _virtual_cpu_devices(n: int) -> None:
    """Ask XLA for n virtual CPU devices unless the caller chose a count (must run before JAX
    starts its CPU backend)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def _confirm(cfg, top, target) -> list[dict]:
    """XLA's memory plan of each top plan, compiled (never run) on as many CPU devices, next to
    the planner's prediction for that same CPU program."""
    if not top:
        return []
    import jax

    from engine.autoplan import workload as make_workload
    from engine.estimate import compile_abstract, memory
    from engine.plan import apply_plan
    from sharding.devices import cpu_widening
    from sharding.planner import estimate

    devices = target.devices
    cpus = jax.devices("cpu")
    if len(cpus) < devices:
        return [{"skipped": f"{devices} CPU devices needed, {len(cpus)} present; set "
                 f"XLA_FLAGS=--xla_force_host_platform_device_count={devices}"}]  # fmt: skip
    # Like with like. cuDNN's kernel compiles only on a GPU, so the CPU compiles the einsums,
    # which keep other residuals (the [T, T] scores under remat=none): the prediction is for
    # the einsums too. And XLA's CPU plan keeps part of the 16-bit activations in fp32.
    workload = make_workload(cfg, dataclasses.replace(top[0][0], attention="xla"))
    as_cpu = dataclasses.replace(target, device=dataclasses.replace(
        target.device, widening=cpu_widening()))  # fmt: skip
    out = []
    for rank, (plan, est) in enumerate(top, 1):
        on_cpus = dataclasses.replace(plan, attention="xla")
        run = compile_abstract(apply_plan(cfg, on_cpus), on_cpus, cpus[:devices])
        xla = memory(run).total_gb
        on_cpu = estimate(workload, est.candidate, as_cpu, plan.rules, plan.precision)
        predicted = on_cpu.memory_gb["total"]
        out.append({"rank": rank, "predicted_gb": est.memory_gb["total"],
                    "predicted_cpu_gb": predicted, "xla_gb": xla, "error": predicted / xla - 1,
                    "attention": plan.attention, "compile_s": run.compile_s})  # fmt: skip
    return out


def _report(cfg, target, fits, rejected, confirmed, top: int, planned_s: float) -> dict:
    def row(plan, est, rank=None):
        return {
            "rank": rank,
            "plan": est.candidate.describe(),
            "flags": plan.flags(),
            "memory_gb": est.memory_gb,
            "step_s": est.times_s["step"],
            "tokens_per_s": est.tokens_per_s,
            "mfu": est.mfu,
            "bound_by": est.dominant,
            "times_s": est.times_s,
        }

    nearest, seen = [], set()  # the nearest plan for each distinct reason
    for _, e in rejected:
        reason = " ".join(re.sub(r"[\d.]+", "N", e.problems[0]).split()[:4])  # its kind
        if reason not in seen and len(nearest) < 5:
            seen.add(reason)
            nearest.append(e)
    return {
        "config": {
            "batch_size": cfg.batch_size,
            "seq_len": cfg.data.seq_len,
            "precision": cfg.precision,
            "task": cfg.task,
        },  # fmt: skip
        "target": {
            **dataclasses.asdict(target.device),
            "devices": target.devices,
            "hosts": target.hosts,
            "budget_gb": target.budget_gb,
        },  # fmt: skip
        "valid_plans": len(fits),
        "rejected_plans": len(rejected),
        "planning_s": planned_s,
        "plans": [row(p, e, i) for i, (p, e) in _distinct(fits, top)],
        "rejected": [
            {"plan": e.candidate.describe(), "reasons": list(e.problems)} for e in nearest
        ],  # fmt: skip
        "confirmed": confirmed,
    }


def _distinct(fits, top: int):
    """(rank, plan) of the first `top` plans, leaving out loss-chunk variants of a plan listed
    above (the same speed, a little less memory: noise in a ranking)."""
    shown, seen = [], set()
    for rank, (plan, est) in enumerate(fits, 1):
        c = est.candidate
        key = (tuple(c.mesh.items()), c.remat, c.microbatches, c.pipeline_microbatches, c.repeats)
        if key not in seen and len(shown) < top:
            seen.add(key)
            shown.append((rank, (plan, est)))
    return shown


def _table(r: dict) -> str:
    t = r["target"]
    lines = [
        f"{r['valid_plans']} plans fit, {r['rejected_plans']} rejected, for batch "
        f"{r['config']['batch_size']} x {r['config']['seq_len']} ({r['config']['precision']}) on "
        f"{t['devices']} x {t['kind']} ({t['hosts']} host{'s' * (t['hosts'] > 1)}), "
        f"{t['budget_gb']:.1f} GB per device; planned in {r['planning_s']:.1f} s",
        "",
        f"{'#':>3}  {'plan':<52} {'memory/device':>20} {'step':>9} {'tokens/s':>11} "
        f"{'MFU':>6}  bound by",
    ]
    for p in r["plans"]:
        mem = f"{format_bytes(p['memory_gb']['total'] * 1e9)} / {t['budget_gb']:.0f} GB"
        lines.append(
            f"{p['rank']:>3}  {p['plan']:<52} {mem:>20} {_seconds(p['step_s']):>9} "
            f"{p['tokens_per_s']:>11,.0f} {p['mfu']:>6.1%}  {p['bound_by']}"
        )
    if r["plans"]:
        lines += ["", "flags of #1: " + " ".join(r["plans"][0]["flags"])]
    if r["rejected"]:
        lines += ["", "nearest rejected:"]
        lines += [f"  {x['plan']}: {_short(x['reasons'][0])}" for x in r["rejected"]]
    if r["confirmed"]:
        einsums = any(c.get("attention") == "cudnn" for c in r["confirmed"])
        lines += ["", f"compiled ahead of time on {t['devices']} virtual CPU devices"
                  + (" (cuDNN attention as its einsums: the kernel compiles on GPUs only):"
                     if einsums else ":")]  # fmt: skip
        for c in r["confirmed"]:
            if "skipped" in c:
                lines.append(f"  skipped: {c['skipped']}")
                continue
            lines.append(
                f"  #{c['rank']}: predicted {format_bytes(c['predicted_cpu_gb'] * 1e9)} as XLA's "
                f"CPU plan ({format_bytes(c['predicted_gb'] * 1e9)} on {t['kind']}), XLA "
                f"{format_bytes(c['xla_gb'] * 1e9)} "
                f"({c['error']:+.0%}), compiled in {c['compile_s']:.1f} s"
            )
    return "\n".join(lines)


def _seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _short(reason: str) -> str:
    return re.sub(r"\s+", " ", reason)[:160]
