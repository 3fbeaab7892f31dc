"""Pipeline parallelism: measured step time against the bubble formula, and pipeline vs FSDP.

    python benchmarks/pipeline.py                   # CPU, 8 virtual devices: both tables, ~5 min
    python benchmarks/pipeline.py --memory 1b       # + per-device memory at real size (AOT)

1. Bubble sweep. S stages on S devices, a fixed microbatch size, M microbatches and R repeats
   varied. Every pipeline iteration does the same work (idle stages compute on padding, as any
   SPMD pipeline does), so time per token should scale as 1 / (1 - bubble) with
   bubble = (S - 1) / (R*M + S - 1). Printed: both, relative to the config with the smallest
   bubble.
2. Pipeline vs FSDP at equal device count, same preset and global batch: step time, and
   per-device memory from the compiled step.

On virtual CPU devices all stages share the host's cores, so (1) shows the extra iterations the
schedule runs, not overlap of communication and compute, and (2) compares total work, not what
an interconnect would cost; only real accelerators can show that.
"""

from __future__ import annotations

import os
import sys

if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

from engine.config import PRESETS, Config, DataConfig  # noqa: E402
from engine.estimate import memory_sweep  # noqa: E402
from engine.trainer import setup  # noqa: E402
from sharding import MeshConfig, PipelineConfig, bubble, describe_mesh  # noqa: E402


def quiet(cfg: Config, **overrides) -> Config:
    log = dataclasses.replace(cfg.log, progress=False, tensorboard=False)
    return dataclasses.replace(cfg, log=log, run_dir="/tmp/shardtrain-bench", **overrides)


def step_time(cfg: Config, devices, steps: int) -> tuple[float, object]:
    """Median seconds per train step (after one warm-up step), and the run."""
    run = setup(cfg, devices)
    batch = run.put_batch(run.task.train_batch(0))
    state, times = run.state, []
    for _ in range(steps + 1):
        start = time.perf_counter()
        state, metrics = run.train_step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), run


def bubble_sweep(args) -> None:
    S, rows = args.stages, args.rows
    base = PRESETS[args.config]
    base = quiet(base, model=dataclasses.replace(base.model, n_layers=args.layers))
    devices = jax.devices()[:S]
    print(
        f"\n1. bubble sweep: '{args.config}' with {args.layers} layers, {S} stages on {S} x "
        f"{devices[0].device_kind}, {rows} sequences x {base.data.seq_len} tokens per "
        f"microbatch, {base.precision}"
    )
    print(
        "predicted / measured: time per token relative to the config with the smallest bubble; "
        "ms/iter: step time over the R*M+S-1 iterations the schedule runs"
    )
    print(f"{'R':>2} {'M':>3} | {'bubble':>6} | {'iters':>5} | {'ms/step':>8} | {'ms/iter':>7} | "
          f"{'us/token':>8} | {'predicted':>9} | {'measured':>8}")  # fmt: skip
    results = []
    for repeats in (1, 2):
        for micro in (S, 2 * S, 4 * S):
            if args.layers % (S * repeats):
                continue
            cfg = dataclasses.replace(
                base,
                batch_size=rows * micro,
                mesh=MeshConfig(data=1, pipeline=S),
                pipeline=PipelineConfig(microbatches=micro, repeats=repeats),
            )
            t, _ = step_time(cfg, devices, args.steps)
            per_token = t / (cfg.batch_size * cfg.data.seq_len)
            results.append((repeats, micro, bubble(S, repeats, micro), t, per_token))
    *_, (_, _, b_ref, _, y_ref) = sorted(results, key=lambda r: -r[2])
    for repeats, micro, b, t, y in results:
        iters = repeats * micro + S - 1
        print(
            f"{repeats:>2} {micro:>3} | {100 * b:5.1f}% | {iters:>5} | {t * 1e3:8.1f} | "
            f"{t * 1e3 / iters:7.1f} | {y * 1e6:8.2f} | {(1 - b_ref) / (1 - b):9.2f} | "
            f"{y / y_ref:8.2f}"
        )


def pipeline_vs_fsdp(args) -> None:
    n = jax.device_count()
    base = PRESETS[args.compare]
    base = quiet(
        base,
        batch_size=args.compare_batch,
        data=DataConfig(seq_len=args.compare_seq, eval_batches=1),
    )
    stages = args.compare_stages
    print(
        f"\n2. pipeline vs FSDP: '{args.compare}' ({base.model.num_params() / 1e6:.0f}M params, "
        f"{base.model.n_layers} layers), batch {base.batch_size} x {base.data.seq_len}, "
        f"{base.precision}, remat={base.model.remat}, {n} x {jax.devices()[0].device_kind}"
    )
    print(f"{'mesh':>26} | {'ms/step':>8} | {'args GB':>8} | {'temp GB':>8}")
    micro = 2 * stages
    candidates = [
        (MeshConfig(data=1, fsdp=n), PipelineConfig()),
        (MeshConfig(data=1, fsdp=n // stages, pipeline=stages), PipelineConfig(micro)),
        (MeshConfig(data=n // stages, pipeline=stages), PipelineConfig(micro)),
    ]
    for mesh, pipe in candidates:
        cfg = dataclasses.replace(base, mesh=mesh, pipeline=pipe)
        t, run = step_time(cfg, None, args.steps)
        mem = run.train_step.memory_analysis()
        name = describe_mesh(run.mesh) + (f", M={pipe.microbatches}" if mesh.pipeline > 1 else "")
        print(
            f"{name:>26} | {t * 1e3:8.0f} | {mem.argument_size_in_bytes / 1e9:8.3f} | "
            f"{mem.temp_size_in_bytes / 1e9:8.3f}"
        )


def memory_report(preset: str) -> None:
    """Per-device memory of the real-size `preset` step, compiled ahead of time, no run."""
    n = jax.device_count()
    cfg = PRESETS[preset]
    print(
        f"\n3. per-device memory, '{preset}' ({cfg.model.num_params() / 1e9:.2f}B params, "
        f"{cfg.model.n_layers} layers), batch {cfg.batch_size} x {cfg.data.seq_len}, "
        f"{cfg.precision}, remat={cfg.model.remat}, {n} x {jax.devices()[0].device_kind}"
    )
    print(f"{'mesh':>32} | {'args GB':>8} | {'temp GB':>8} | {'compile s':>9}")
    candidates = [(MeshConfig(data=1, fsdp=n), PipelineConfig())]
    for stages in (2, 4, 8):
        # As many microbatches as the batch allows: each must still split over fsdp.
        micro = cfg.batch_size // (n // stages)
        if n % stages == 0 and cfg.model.n_layers % stages == 0 and micro % stages == 0:
            mesh = MeshConfig(data=1, fsdp=n // stages, pipeline=stages)
            candidates.append((mesh, PipelineConfig(microbatches=micro)))
    variants = [
        (f", M={pipe.microbatches}" if mesh.pipeline > 1 else "",
         dataclasses.replace(cfg, mesh=mesh, pipeline=pipe), None)
        for mesh, pipe in candidates
    ]  # fmt: skip
    for suffix, run, mem in memory_sweep(variants):
        name = describe_mesh(run.mesh) + suffix
        print(f"{name:>32} | {mem.args_gb:8.3f} | {mem.temp_gb:8.3f} | {mem.compile_s:9.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="default", help="preset for the bubble sweep")
    parser.add_argument("--layers", type=int, default=8, help="layers in the sweep's model")
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--rows", type=int, default=4, help="sequences per microbatch")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per config")
    parser.add_argument("--compare", default="small", help="preset for pipeline vs FSDP")
    parser.add_argument("--compare_seq", type=int, default=256)
    parser.add_argument("--compare_batch", type=int, default=16)
    parser.add_argument("--compare_stages", type=int, default=4)
    parser.add_argument("--memory", default=None, help="preset for the AOT memory table")
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} | jax {jax.__version__}")
    print(" ".join(["python", *sys.argv]))
    bubble_sweep(args)
    if args.compare:
        pipeline_vs_fsdp(args)
    if args.memory:
        memory_report(args.memory)


if __name__ == "__main__":
    main()
