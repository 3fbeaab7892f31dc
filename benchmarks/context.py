"""Context parallelism: memory against the context degree, the causal load balance, and the two
attention strategies side by side.

    python benchmarks/context.py --part memory     # 1b shapes, 8k-64k tokens, context 1-8
    python benchmarks/context.py --part balance    # step time, balanced vs contiguous split
    XLA_FLAGS=--xla_force_host_platform_device_count=2 \
        python benchmarks/context.py --part balance --devices 2   # one device per core
    python benchmarks/context.py --part strategies # all_gather vs ring: time and memory

memory: XLA's plan for the `1b_32k` preset's step (bf16, remat full, 16 loss chunks, one
sequence per step), compiled ahead of time on 1, 2, 4 and 8 devices that split the sequence
(`--mesh.context=N`, which also ZeRO-splits the weights). Goal: the temporaries (activations,
attention) fall as ~1/N: the ratio to one device is printed.
balance: median train-step time of a small model on one long sequence split over --devices
(context=N), the dual-chunk reorder on and off, for both strategies. Goal: balanced measurably
faster. Both orders compute the same unmasked blocks in total; balancing evens them out per
device (contiguous: the last device's 4N-1 half-blocks; balanced: 2N+1 each), so it shows
where devices run in parallel: on a CPU, as many virtual devices as cores (8 virtual devices
on 2 cores share them, and the total is what counts).
strategies: at a length where they differ, the two strategies' step time (8 CPU devices) and
their compiled memory for 1b shapes (all_gather holds every device's keys and values).
Steps alternate between variants in rounds, so machine noise hits all alike.
"""

from __future__ import annotations

import os

if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from engine.config import PRESETS  # noqa: E402
from engine.estimate import compile_abstract, memory  # noqa: E402
from engine.trainer import setup  # noqa: E402
from models import LlamaConfig  # noqa: E402
from sharding import DEFAULT_RULES, MeshConfig, axis_rules, make_mesh  # noqa: E402
from sharding.context import context_attention  # noqa: E402


def with_keys(cfg, seq_len=None, batch_size=None, mesh=None, **model):
    data = dataclasses.replace(cfg.data, seq_len=seq_len or cfg.data.seq_len)
    return dataclasses.replace(
        cfg, data=data, batch_size=batch_size or cfg.batch_size, mesh=mesh or cfg.mesh,
        model=dataclasses.replace(cfg.model, **model),
    )  # fmt: skip


SHORT = 1024  # tokens: the memory that does not grow with the length


def part_memory(args):
    base = PRESETS["1b_32k"]
    print(f"1b shapes ({args.layers} layers), bf16, remat full, 16 loss chunks, ring, one "
          f"sequence per step; XLA's plan per device ({jax.devices()[0].platform}). act: temp "
          f"less the same mesh's temp at {SHORT} tokens (vocabulary tables, gathered weights);"
          " context=1 runs the dense kernel, N>1 the blockwise one")  # fmt: skip
    print(f"{'tokens':>7} {'context':>7} {'state GB':>9} {'temp GB':>8} {'act GB':>7} "
          f"{'act x N / N=1':>14} {'act x N / N=2':>14}")  # fmt: skip
    short = {}
    for seq in args.lengths:
        act = {}
        for n in (1, 2, 4, 8):
            devices = jax.devices()[:n]
            if n not in short:
                cfg = with_keys(base, SHORT, 1, MeshConfig(data=1, context=n), n_layers=args.layers)
                short[n] = memory(compile_abstract(cfg, devices=devices)).temp_gb
            cfg = with_keys(base, seq, 1, MeshConfig(data=1, context=n), n_layers=args.layers)
            est = memory(compile_abstract(cfg, devices=devices))
            act[n] = est.temp_gb - short[n]
            vs2 = f"{act[n] * n / (2 * act[2]):14.2f}" if n > 1 else f"{'':>14}"
            print(f"{seq:7d} {n:7d} {est.state_gb:9.2f} {est.temp_gb:8.2f} {act[n]:7.2f} "
                  f"{act[n] * n / act[1]:14.2f} {vs2}", flush=True)  # fmt: skip


def small_long(seq: int, devices: int, **model):
    """A small model whose step is mostly attention: 4 layers of width 128 on `seq` tokens,
    the sequence split over `devices`."""
    arch = LlamaConfig(d_model=128, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=16, d_ff=256)
    cfg = PRESETS["tiny"]
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **vars(arch)))
    log = dataclasses.replace(cfg.log, progress=False, tensorboard=False, summary_every=10**6)
    checkpoint = dataclasses.replace(cfg.checkpoint, every=0, final=False)
    cfg = dataclasses.replace(cfg, log=log, checkpoint=checkpoint)
    return with_keys(cfg, seq, 1, MeshConfig(data=1, context=devices), **model)


def time_side_by_side(variants: dict, rounds: int, steps: int) -> dict[str, float]:
    """Median step time of each config, run in alternating rounds of `steps` steps."""
    runs = {}
    with tempfile.TemporaryDirectory() as root:
        for label, cfg in variants.items():
            devices = jax.devices()[: cfg.mesh.context]
            run = setup(dataclasses.replace(cfg, run_dir=f"{root}/{len(runs)}"), devices)
            batch = run.put_batch(run.task.train_batch(0))
            state, metrics = run.train_step(run.state, batch)  # warm-up
            jax.block_until_ready(metrics)
            runs[label] = [run, state, batch, []]
        for _ in range(rounds):
            for entry in runs.values():
                run, state, batch, times = entry
                for _ in range(steps):
                    start = time.perf_counter()
                    state, metrics = run.train_step(state, batch)
                    jax.block_until_ready(metrics)
                    times.append(time.perf_counter() - start)
                entry[1] = state
    return {label: statistics.median(entry[3]) for label, entry in runs.items()}


def part_balance(args):
    variants = {
        f"{strategy} {'balanced' if balance else 'contiguous'}": small_long(
            args.seq, args.devices, context_strategy=strategy, context_load_balance=balance
        )
        for strategy in ("all_gather", "ring")
        for balance in (True, False)
    }
    times = time_side_by_side(variants, args.rounds, args.steps)
    print(f"context={args.devices} on {args.devices} {jax.devices()[0].platform} devices "
          f"({os.cpu_count()} cores), 1 x {args.seq} tokens, median of {args.rounds} x "
          f"{args.steps} steps")  # fmt: skip
    for strategy in ("all_gather", "ring"):
        on, off = times[f"{strategy} balanced"], times[f"{strategy} contiguous"]
        print(f"{strategy:>10}: balanced {on * 1e3:8.1f} ms  contiguous {off * 1e3:8.1f} ms  "
              f"contiguous / balanced {off / on:5.2f}")  # fmt: skip


def attention_temp_gb(seq: int, strategy: str) -> float:
    """Per-device temporaries of context attention's forward and backward, compiled alone."""
    mesh = make_mesh({"context": 8}, jax.devices()[:8])
    split = NamedSharding(mesh, P(None, "context"))
    shape = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype, sharding=split)  # noqa: E731
    args = (shape(1, seq, 32, 64), shape(1, seq, 8, 64), shape(1, seq, 8, 64),
            shape(1, seq, dtype=jnp.int32))  # fmt: skip

    def loss(q, k, v, positions):
        return jnp.sum(context_attention(q, k, v, positions, strategy=strategy))

    with jax.set_mesh(mesh), axis_rules(DEFAULT_RULES):
        compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 1e9


def part_strategies(args):
    variants = {
        s: small_long(args.seq, args.devices, context_strategy=s) for s in ("all_gather", "ring")
    }
    times = time_side_by_side(variants, args.rounds, args.steps)
    print(
        f"step time: context={args.devices} on {args.devices} {jax.devices()[0].platform} "
        f"devices, 1 x {args.seq} tokens, median of {args.rounds} x {args.steps} steps"
    )
    for label, t in times.items():
        print(f"{label:>10} {t * 1e3:8.1f} ms   x all_gather {t / times['all_gather']:5.2f}")
    print(
        "attention alone (forward and backward), 1b's heads (32 query, 8 key/value, 64 wide), "
        "one sequence, context=8, bf16: XLA's temporaries per device"
    )
    for seq in args.lengths:
        row = {s: attention_temp_gb(seq, s) for s in ("all_gather", "ring")}
        print(
            f"{seq:7d} tokens: all_gather {row['all_gather']:6.3f} GB  ring {row['ring']:6.3f}"
            f" GB  ring / all_gather {row['ring'] / row['all_gather']:5.2f}",
            flush=True,
        )
    base = PRESETS["1b_32k"]
    print(f"memory: 1b shapes ({args.layers} layers), context=8, XLA's plan per device")
    for seq in args.lengths:
        row = {}
        for strategy in ("all_gather", "ring"):
            cfg = with_keys(base, seq, 1, n_layers=args.layers, context_strategy=strategy)
            row[strategy] = memory(compile_abstract(cfg)).temp_gb
        print(
            f"{seq:7d} tokens: temp all_gather {row['all_gather']:6.2f} GB  ring "
            f"{row['ring']:6.2f} GB  ring / all_gather {row['ring'] / row['all_gather']:5.2f}"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("memory", "balance", "strategies"), required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--layers", type=int, default=16, help="1b layers (memory, strategies)")
    parser.add_argument("--seq", type=int, default=8192, help="tokens (balance, strategies)")
    parser.add_argument(
        "--devices",
        type=int,
        default=8,
        help="context degree (balance, "
        "strategies): 2 on a 2-core CPU gives each device its own core",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    args = parser.parse_args()
    {"memory": part_memory, "balance": part_balance, "strategies": part_strategies}[args.part](args)


if __name__ == "__main__":
    main()
