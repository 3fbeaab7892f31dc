"""Throughput and MFU of a real training run, next to the device's measured ceilings.

    python benchmarks/mfu.py --config 1b --mesh.data=1              # one GPU: bf16, 8 x 2048
    python benchmarks/mfu.py --config default --steps 10            # CPU: same code, small
    python benchmarks/mfu.py --compile_time                         # scan: 4 vs 32 layers
    python benchmarks/mfu.py --memory --config 1b                   # AOT, 1 and 8 CPU devices
    python benchmarks/mfu.py --config 1b --mesh.data=1 --profile /tmp/p  # + where the time goes

Trains `--steps` steps after `--warmup` and reports the median step time, tokens/s, model
TFLOP/s per device, MFU (model FLOPs incl. causal attention / datasheet bf16 peak), HFU (plus
what the remat policy recomputes, counted from the shapes) and the device's peak memory. In the
same process it measures what this device can actually do — a large matmul's TFLOP/s in the
run's compute dtype and a large copy's memory bandwidth — and shows MFU against that matmul
ceiling too.

--compile_time compiles the `1b` train step (abstract state, no memory) at 4 and 32 layers:
layers run under `lax.scan`, so the ratio should stay <= 1.5. --memory compiles the
configuration for several meshes x remat policies x accumulation steps and prints
`memory_analysis()` per device: what fits, before renting the hardware. --profile traces
three more steps with jax.profiler (TensorBoard's profile tab opens the directory) and prints
the device's busy share and top ops. benchmarks/mfu_sweep.py runs variants of one
configuration side by side.
"""

from __future__ import annotations

import os
import sys

if ("--memory" in sys.argv or "--compile_time" in sys.argv) and "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from engine.config import PRESETS, ConfigError, parse_args  # noqa: E402
from engine.estimate import memory_sweep  # noqa: E402
from engine.metrics import peak_flops, peak_memory_gb  # noqa: E402
from engine.precision import POLICIES  # noqa: E402
from engine.profile import StepTrace  # noqa: E402
from engine.trainer import flops_per_token, setup  # noqa: E402
from sharding import MeshConfig, ShardingError, describe_mesh  # noqa: E402


def timed(fn, *args, repeats: int = 10) -> float:
    jax.block_until_ready(fn(*args))  # compile, warm
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def matmul_ceiling(n: int, dtype) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` (the run's compute dtype) on the first device."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    return 2 * n**3 / timed(jax.jit(lambda a: a @ a), a)


def bandwidth_ceiling(bytes_: int) -> float:
    """Bytes/s of reading and writing a large fp32 array once (x * 2)."""
    x = jnp.ones((bytes_ // 4,), jnp.float32)
    return 2 * bytes_ / timed(jax.jit(lambda x: x * 2), x)


def recompute_flops_per_token(cfg) -> float:
    """FLOPs the remat policy adds per token (HFU - MFU): the layers' forward again for
    `full`; the attention score/value matmuls (they have batch dims) for `dots_no_batch`; the
    output layer's forward with loss chunks.
    Counted from the shapes: XLA's cost analysis counts a scanned layer once, not per layer."""
    m = cfg.model
    layer_matmuls = m.n_layers * (
        m.d_model * m.head_dim * (2 * m.n_heads + 2 * m.n_kv_heads) + 3 * m.d_model * m.d_ff
    )
    attention_forward = 2 * m.n_layers * cfg.data.seq_len * m.n_heads * m.head_dim
    output_layer = 2 * m.d_model * m.vocab_size if m.loss_chunks > 1 else 0.0
    policy = {
        "none": 0.0,
        "dots": 0.0,
        "dots_no_batch": attention_forward,
        "full": 2 * layer_matmuls + attention_forward,
    }
    return policy[m.remat] + output_layer


def throughput(cfg, steps: int, warmup: int, profile_dir: str | None = None) -> dict:
    run = setup(cfg)
    batch = run.put_batch(run.task.train_batch(0))
    times = []
    state = run.state
    for i in range(warmup + steps):
        start = time.perf_counter()
        state, metrics = run.train_step(state, batch)
        jax.block_until_ready(metrics)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    # The step's, before the ceilings allocate their own arrays.
    memory = peak_memory_gb(run.mesh.devices.flat)
    devices = run.mesh.size
    tokens = cfg.batch_size * cfg.data.seq_len
    model_flops = flops_per_token(cfg) * tokens / step / devices  # per device
    hw_flops = model_flops * (1 + recompute_flops_per_token(cfg) / flops_per_token(cfg))
    accelerator = jax.devices()[0].platform != "cpu"
    n = 8192 if accelerator else 1024
    compute = POLICIES[cfg.precision].compute_dtype
    ceiling = matmul_ceiling(n, compute)
    bandwidth = bandwidth_ceiling(2**30 if accelerator else 2**28)
    peak = cfg.peak_flops or peak_flops()
    device = jax.devices()[0].device_kind
    print(f"device: {device} x{devices} | jax {jax.__version__} | mesh {describe_mesh(run.mesh)}")
    print(
        f"model: {cfg.model.num_params() / 1e6:,.1f}M params, {cfg.precision}, remat="
        f"{cfg.model.remat}, attention={run.plan.attention}, batch {cfg.batch_size}x"
        f"{cfg.data.seq_len} | compile {run.compile_s:.1f}s"
        + (f" | peak memory {memory:.1f} GB" if memory else "")
    )
    print(
        f"step {step * 1e3:.1f} ms (median of {steps} after {warmup} warm-up) | "
        f"{tokens / step:,.0f} tok/s | {model_flops / 1e12:.2f} model TFLOP/s per device"
    )
    print(
        f"ceilings measured here: {jnp.dtype(compute).name} matmul {n}^3 "
        f"{ceiling / 1e12:.2f} TFLOP/s | memory "
        f"bandwidth {bandwidth / 1e9:.0f} GB/s"
    )
    parts = ["MFU: no datasheet peak for this device"]
    if peak:
        parts = [f"MFU {model_flops / peak:.1%} of the {peak / 1e12:.0f} TFLOP/s datasheet peak"]
    parts.append(f"{model_flops / ceiling:.1%} of the measured matmul ceiling")
    parts.append(f"with remat recompute {hw_flops / 1e12:.2f} TFLOP/s")
    if peak:
        parts.append(f"HFU {hw_flops / peak:.1%}")
    print(" | ".join(parts))
    if profile_dir:
        trace = StepTrace(profile_dir, first=1, count=3)
        for i in range(1, 4):
            start = time.perf_counter()
            with trace.annotate(i):
                state, metrics = run.train_step(state, batch)
                jax.block_until_ready(metrics)
            lines = trace.finish(i, time.perf_counter() - start)
        print("\n".join(lines))
    return {
        "device": device,
        "step_ms": step * 1e3,
        "tokens_per_s": tokens / step,
        "model_tflops": model_flops / 1e12,
        "mfu": model_flops / peak if peak else None,
        "mfu_of_matmul_ceiling": model_flops / ceiling,
        "hfu": hw_flops / peak if peak else None,
        "matmul_ceiling_tflops": ceiling / 1e12,
        "compile_s": run.compile_s,
        "peak_memory_gb": memory,
    }


def compile_time() -> None:
    base = PRESETS["1b"]
    seconds = {}
    for layers in (4, 32):
        cfg = dataclasses.replace(
            base,
            model=dataclasses.replace(base.model, n_layers=layers, scan_unroll=1),  # the loop
            mesh=MeshConfig(data=1, fsdp=-1),
        )
        start = time.perf_counter()
        run = setup(cfg, init=False)
        seconds[layers] = run.compile_s
        print(
            f"1b shapes, {layers} layers, fsdp={jax.device_count()}: train+eval step compiled in "
            f"{run.compile_s:.1f}s (setup {time.perf_counter() - start:.1f}s)"
        )
    print(f"compile time 32 / 4 layers: {seconds[32] / seconds[4]:.2f} (goal <= 1.5)")


def memory(base) -> None:
    n = jax.device_count()
    # (mesh, devices it takes): one device first, the single-GPU MFU run's budget.
    meshes = [
        (MeshConfig(data=1, fsdp=1), 1),
        (MeshConfig(data=1, fsdp=n), n),
        (MeshConfig(data=2, fsdp=n // 2), n),
        (MeshConfig(data=1, fsdp=n // 2, tensor=2), n),
    ]
    print(
        f"per-device memory ({base.model.num_params() / 1e9:.2f}B params, {base.precision}, "
        f"batch {base.batch_size}x{base.data.seq_len}, loss_chunks {base.model.loss_chunks}), "
        f"on 1 and {n} {jax.devices()[0].device_kind} devices, compiled ahead of time"
    )
    print(f"{'mesh':>22} | {'remat':>13} | accum x batch | {'args GB':>7} | {'temp GB':>7} | total")
    variants = []
    for mesh, devices in meshes:
        for remat in ("none", "dots_no_batch", "full"):
            for accum in (1, 4):
                if accum > 1 and remat != "full":
                    continue  # accumulation's use: a bigger batch in the same memory
                cfg = dataclasses.replace(
                    base,
                    batch_size=base.batch_size * accum,
                    mesh=mesh,
                    model=dataclasses.replace(base.model, remat=remat),
                    optim=dataclasses.replace(base.optim, microbatches=accum),
                )
                label = f"{remat:>13} | {f'{accum} x {base.batch_size}':>13}"
                variants.append((label, cfg, jax.devices()[:devices]))
    for label, run, mem in memory_sweep(variants):
        print(
            f"{describe_mesh(run.mesh):>22} | {label} | "
            f"{mem.args_gb:7.2f} | {mem.temp_gb:7.2f} | {mem.total_gb:8.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile_time", action="store_true")
    parser.add_argument("--memory", action="store_true", help="the AOT memory table")
    parser.add_argument("--profile", default=None, help="trace 3 more steps into this directory")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args, rest = parser.parse_known_args()
    if args.compile_time:
        return compile_time()
    try:
        cfg = parse_args(rest or ["--config", "1b", "--mesh.data=1"])
        if args.memory:
            return memory(cfg)
        record = throughput(cfg, args.steps, args.warmup, args.profile)
    except (ConfigError, ShardingError) as e:
        sys.exit(f"error: {e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f)


if __name__ == "__main__":
    main()
