"""Engine train step vs a minimal hand-written `jax.jit` step: same model, optimizer and mesh.

    python benchmarks/step_overhead.py --config tiny                 # CPU, seconds
    python benchmarks/step_overhead.py --config 1b --rounds 5        # GPU: bf16, real size
    python benchmarks/step_overhead.py --config tiny --memory small  # + memory for fsdp=1..8

Prints the median step time of each, timed in alternating rounds in one process, and
`ratio: X.XX` (engine / hand-written; goal <= 1.02). Any `engine.train` flag applies to both.
Then the whole training loop's median step time (`--loop_steps`, as metrics.jsonl records it)
against the engine step: what host work between steps costs.
With `--memory PRESET`, compiles that preset's train step ahead of time on fsdp=1,2,4,8 (x data
to fill 8 devices; virtual CPU devices if no accelerator) and prints `memory_analysis()`.
"""

from __future__ import annotations

import os
import sys

if "--memory" in sys.argv and "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from engine.config import PRESETS, parse_args  # noqa: E402
from engine.estimate import memory_sweep  # noqa: E402
from engine.optim import make_optimizer  # noqa: E402
from engine.precision import POLICIES  # noqa: E402
from engine.trainer import setup, train  # noqa: E402
from sharding import RULE_PRESETS, MeshConfig, axis_rules, describe_mesh  # noqa: E402


def handwritten_step(graphdef, tx, compute_dtype, clip_norm):
    """What a user would write by hand: cast, forward, cross-entropy, grad, clip, AdamW."""

    clip = optax.clip_by_global_norm(clip_norm)

    def step(params, opt_state, batch):
        def loss_fn(params):
            p = jax.tree.map(lambda x: x.astype(compute_dtype), params)
            logits = nnx.merge(graphdef, p)(batch["inputs"]).astype("float32")
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        grads, _ = clip.update(grads, clip.init(grads))
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def bench(cfg, rounds: int, steps_per_round: int) -> float:
    run = setup(cfg)
    tx, _ = make_optimizer(cfg.optim, cfg.steps)
    compute = POLICIES[cfg.precision].compute_dtype
    shardings = run.state_shardings
    with jax.set_mesh(run.mesh), axis_rules(RULE_PRESETS[cfg.rules]):
        hand = jax.jit(
            handwritten_step(run.graphdef, tx, compute, cfg.optim.clip_norm),
            in_shardings=(shardings.params, shardings.opt_state, run.batch_shardings),
            out_shardings=(shardings.params, shardings.opt_state, None),
            donate_argnums=(0, 1),
        )
        batch = run.put_batch(run.task.train_batch(0))
        hand = hand.lower(run.state.params, run.state.opt_state, batch).compile()
    params = jax.tree.map(lambda x: x.copy(), run.state.params)
    opt_state = jax.tree.map(lambda x: x.copy(), run.state.opt_state)
    state = run.state

    def engine_round():
        nonlocal state
        start = time.perf_counter()
        for _ in range(steps_per_round):
            state, metrics = run.train_step(state, batch)
            jax.block_until_ready(metrics)
        return (time.perf_counter() - start) / steps_per_round

    def hand_round():
        nonlocal params, opt_state
        start = time.perf_counter()
        for _ in range(steps_per_round):
            params, opt_state, loss = hand(params, opt_state, batch)
            jax.block_until_ready(loss)
        return (time.perf_counter() - start) / steps_per_round

    engine_round(), hand_round()  # warm-up
    engine_times, hand_times = [], []
    for _ in range(rounds):  # alternate, so drift in clocks or load hits both alike
        engine_times.append(engine_round())
        hand_times.append(hand_round())
    e, h = statistics.median(engine_times), statistics.median(hand_times)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} | jax {jax.__version__}")
    print(
        f"config: {cfg.task} d_model={cfg.model.d_model} layers={cfg.model.n_layers} "
        f"batch={cfg.batch_size}x{cfg.data.seq_len} {cfg.precision} mesh {describe_mesh(run.mesh)}"
    )
    print(f"engine step:       {e * 1e3:9.3f} ms (median of {rounds} x {steps_per_round})")
    print(f"hand-written step: {h * 1e3:9.3f} ms")
    print(f"ratio: {e / h:.2f}")
    return e


def loop_overhead(cfg, steps: int, engine_step_s: float) -> None:
    """The whole training loop (batches, step, metrics back to the host every step, logging):
    its median `step_time_s` against the bare compiled step. The gap is host time the device
    waits through."""
    run_dir = tempfile.mkdtemp(prefix="step_overhead_")
    cfg = dataclasses.replace(
        cfg, steps=steps, eval_every=0, run_dir=run_dir,
        checkpoint=dataclasses.replace(cfg.checkpoint, every=0),
        log=dataclasses.replace(cfg.log, progress=False, tensorboard=False, summary_every=10**9),
    )  # fmt: skip
    records = train(cfg)[5:]  # the first steps settle caches and threads
    loop = statistics.median(r["step_time_s"] for r in records)
    wait = statistics.median(r["data_wait_s"] for r in records)
    shutil.rmtree(run_dir)
    print(
        f"training loop:     {loop * 1e3:9.3f} ms (median of {len(records)}; data wait "
        f"{wait * 1e3:.3f} ms) | loop / engine step: {loop / engine_step_s:.2f}"
    )


def memory_report(preset: str) -> None:
    """Compile the `preset` run ahead of time on fsdp = 1, 2, 4, 8 and print per-device memory."""
    cfg = PRESETS[preset]
    n = jax.device_count()
    print(
        f"\nper-device memory, preset '{preset}' ({cfg.model.num_params() / 1e6:.0f}M params), "
        f"{cfg.precision}, remat={cfg.model.remat}, batch {cfg.batch_size}x{cfg.data.seq_len}, "
        f"{n} x {jax.devices()[0].device_kind}"
    )
    print(f"{'mesh':>16} | {'state GB':>8} | {'args GB':>8} | {'temp GB':>8} | state vs fsdp=1")
    variants = [
        (
            f"data={n // fsdp} fsdp={fsdp}",
            dataclasses.replace(cfg, mesh=MeshConfig(data=n // fsdp, fsdp=fsdp)),
            None,
        )
        for fsdp in (1, 2, 4, 8)
        if n % fsdp == 0
    ]
    base = None
    for label, _, mem in memory_sweep(variants):
        base = base or mem.state_gb
        print(
            f"{label:>16} | {mem.state_gb:8.3f} | {mem.args_gb:8.3f} | {mem.temp_gb:8.3f} | "
            f"1/{base / mem.state_gb:.2f}"
        )


def main():
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--memory", default=None, help="preset for the memory table")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps_per_round", type=int, default=20)
    parser.add_argument("--loop_steps", type=int, default=100, help="0: skip the loop timing")
    args, rest = parser.parse_known_args()
    cfg = parse_args(rest)
    cfg = dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, progress=False))
    engine_step_s = bench(cfg, args.rounds, args.steps_per_round)
    if args.loop_steps:
        loop_overhead(cfg, args.loop_steps, engine_step_s)
    if args.memory:
        memory_report(args.memory)


if __name__ == "__main__":
    main()
