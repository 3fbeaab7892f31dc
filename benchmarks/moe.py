"""Mixture-of-Experts: memory against the expert-parallel degree, step time of the routings, and
expert load balance with and without the auxiliary loss.

    python benchmarks/moe.py --part memory    # Mixtral 8x7B shapes, ep = 1, 2, 4, 8 (8 devices)
    python benchmarks/moe.py --part step      # `moe` preset: dropless, capacity, dense
    python benchmarks/moe.py --part balance --steps 60  # expert load, aux weight 0 / 0.01
    python benchmarks/moe.py --part kernel    # ragged_dot against dense matmuls, same FLOPs

memory: per-device bytes of the expert weights and their AdamW moments, from the shardings the
rules give (nothing allocated); goal: they fall as 1/ep within 5 %. With --compile, also XLA's
plan for the whole step, compiled ahead of time (5-7 s each on a CPU; --layers N changes the
depth).
step: median train-step time on one device of the `moe` preset (8 experts, top-2, the same
active parameters per token as `default`) dropless and with capacity factor 1.25, against the
dense `default` preset; ratios printed side by side.
balance: the busiest expert's share of the load relative to the mean (moe_load_max; 1.0 =
balanced) over a short training run, with the auxiliary loss off and at its default weight.
"""

from __future__ import annotations

import os
import sys

if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from engine.config import PRESETS  # noqa: E402
from engine.estimate import compile_abstract, memory  # noqa: E402
from engine.family import build_model  # noqa: E402
from engine.plan import Plan  # noqa: E402
from engine.trainer import setup, train  # noqa: E402
from sharding import MeshConfig, make_mesh, tree_shardings  # noqa: E402


def quiet(cfg, run_dir):
    log = dataclasses.replace(cfg.log, progress=False, tensorboard=False, summary_every=10**6)
    checkpoint = dataclasses.replace(cfg.checkpoint, every=0, final=False)
    return dataclasses.replace(cfg, log=log, checkpoint=checkpoint, run_dir=run_dir)


def expert_bytes(cfg) -> float:
    """Per-device bytes of the routed experts' weights and their two AdamW moments (fp32, the
    params' shardings), from the config's shapes and rules alone."""
    plan = Plan.from_config(cfg)
    mesh = make_mesh(plan.mesh)
    state = nnx.state(nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0), plan)), nnx.Param)
    total = 0
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    leaves = jax.tree.leaves(state, is_leaf=is_var)
    shardings = jax.tree.leaves(tree_shardings(state, mesh, plan.rules), is_leaf=is_var)
    for leaf, sharding in zip(leaves, shardings, strict=True):
        if "expert" in (leaf.get_metadata().get("out_sharding") or ()):
            shape = sharding.get_value().shard_shape(leaf.shape)
            total += math.prod(shape) * 4 * 3  # the fp32 param and its two moments
    return total


def part_memory(args):
    base = PRESETS["mixtral_8x7b"]
    model = dataclasses.replace(base.model, n_layers=args.layers)
    print(f"mixtral_8x7b shapes, {args.layers} layers, {jax.device_count()} devices "
          f"({jax.devices()[0].platform}), bf16, remat full, batch {base.batch_size} x "
          f"{base.data.seq_len}")  # fmt: skip
    print(f"{'mesh':>22} {'experts+Adam GB/device':>23} {'x ep / ep=1':>12} {'step GB':>8} "
          f"{'compile s':>9}")  # fmt: skip
    first = None
    for ep in (1, 2, 4, 8):
        mesh = MeshConfig(expert=ep, data=jax.device_count() // ep, fsdp=1)
        cfg = dataclasses.replace(base, model=model, mesh=mesh)
        gb = expert_bytes(cfg) / 1e9
        first = first or gb
        step = f"{'-':>8} {'-':>9}"
        if args.compile:
            est = memory(compile_abstract(cfg))
            step = f"{est.total_gb:8.2f} {est.compile_s:9.1f}"
        label = f"expert={ep} x data={jax.device_count() // ep}"
        print(f"{label:>22} {gb:23.3f} {gb * ep / first:12.3f} {step}")


def step_times(cfg, steps: int) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        run = setup(quiet(cfg, run_dir), devices=jax.devices()[:1])
        batch = run.put_batch(run.task.train_batch(0))
        state = run.state
        times = []
        for _ in range(steps + 2):
            start = time.perf_counter()
            state, metrics = run.train_step(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        return statistics.median(times[2:])


def part_step(args):
    moe = PRESETS["moe"]
    capacity = dataclasses.replace(
        moe.model, moe=dataclasses.replace(moe.model.moe, capacity_factor=1.25)
    )
    variants = {
        "dense (default preset)": PRESETS["default"],
        "moe dropless (ragged_dot)": moe,
        "moe capacity 1.25": dataclasses.replace(moe, model=capacity),
    }
    mesh = MeshConfig(data=1)
    times = {}
    for label, cfg in variants.items():
        cfg = dataclasses.replace(cfg, mesh=mesh, batch_size=args.batch_size)
        times[label] = step_times(cfg, args.steps)
    dense = times["dense (default preset)"]
    print(f"{jax.devices()[0].device_kind}, one device, batch {args.batch_size} x "
          f"{moe.data.seq_len}, median of {args.steps} steps")  # fmt: skip
    for label, t in times.items():
        print(f"{label:>28} {t * 1e3:9.1f} ms/step  x dense {t / dense:5.2f}")


def part_balance(args):
    print(f"`moe` preset, {args.steps} steps, one device: moe_load_max (1.0 = balanced)")
    for weight in (0.0, 0.01):
        cfg = PRESETS["moe"]
        model = dataclasses.replace(
            cfg.model, moe=dataclasses.replace(cfg.model.moe, aux_loss_weight=weight)
        )
        with tempfile.TemporaryDirectory() as run_dir:
            cfg = quiet(dataclasses.replace(cfg, model=model, steps=args.steps), run_dir)
            records = train(dataclasses.replace(cfg, mesh=MeshConfig(data=1)), jax.devices()[:1])
        load = np.array([r["moe_load_max"] for r in records])
        aux = np.array([r["moe_aux_loss"] for r in records])
        marks = [0, len(load) // 4, len(load) // 2, len(load) - 1]
        curve = "  ".join(f"step {m + 1}: {load[m]:.2f}" for m in marks)
        print(f"aux weight {weight:<5} load_max {curve} | last 20 mean {load[-20:].mean():.2f} "
              f"| aux loss last {aux[-1]:.3f} | final loss {records[-1]['loss']:.4f}")  # fmt: skip


def part_kernel(args):
    """One grouped matmul against the same FLOPs as one dense matmul and as batched
    per-expert matmuls: what routing's expert compute costs on this backend."""
    m, d, f, e = 4096, 128, 192, 8
    x = jax.random.normal(jax.random.key(0), (m, d))
    w = jax.random.normal(jax.random.key(1), (e, d, f))
    sizes = jnp.full((e,), m // e)
    kernels = {
        "ragged_dot (grouped)": jax.jit(lambda x, w: jax.lax.ragged_dot(x, w, sizes)),
        "one dense dot": jax.jit(lambda x, w: x @ w[0]),
        "batched per expert": jax.jit(
            lambda x, w: jnp.einsum("ecd,edf->ecf", x.reshape(e, m // e, d), w)
        ),
    }
    print(f"{jax.devices()[0].device_kind}: [{m}, {d}] rows in {e} equal groups x [{d}, {f}]")
    for name, fn in kernels.items():
        fn(x, w).block_until_ready()
        start = time.perf_counter()
        for _ in range(args.steps):
            fn(x, w).block_until_ready()
        print(f"{name:>22} {(time.perf_counter() - start) / args.steps * 1e3:8.3f} ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("memory", "step", "balance", "kernel"), required=True)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()
    parts = {
        "memory": part_memory,
        "step": part_step,
        "balance": part_balance,
        "kernel": part_kernel,
    }
    parts[args.part](args)


if __name__ == "__main__":
    sys.exit(main())
