"""The layer loop against unrolled layers (`--model.scan_unroll`): step time, compile time and
memory of the same model, mesh and batches.

    python benchmarks/layer_loop.py --config default                # CPU, fp32, about a minute
    python benchmarks/layer_loop.py --config small --precision bf16 --batch_size 4 \
        --data.seq_len 256 --rounds 3                               # CPU, `small`, a few minutes
    python benchmarks/layer_loop.py --config 1b --unrolls 1,0       # one GPU

Each setting gets its own compiled step in one process; rounds alternate between them after
warm-up steps, so a machine whose speed drifts slows all of them alike. Prints each round's
tokens/s, the medians, the ratio to the first setting, compile seconds and XLA's
`memory_analysis()` of each step, and how far the losses of the timed steps are apart: in fp32
they agree exactly (unrolling changes the program, not the arithmetic); in 16 bits XLA's excess
precision may keep an intermediate in fp32 in one program's fusion and round it in another's
(`small` in bf16, 2 layers an iteration: 7.7e-4 apart, 0 under
XLA_FLAGS=--xla_allow_excess_precision=false). Any `engine.train` flag applies to all.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from engine.config import parse_args  # noqa: E402
from engine.setup import setup  # noqa: E402
from sharding import describe_mesh  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--unrolls", default="1,0", help="--model.scan_unroll settings to compare")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps_per_round", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per setting")
    args, rest = parser.parse_known_args(argv)
    unrolls = [int(u) for u in args.unrolls.split(",")]
    base = parse_args(rest)

    runs = {}
    for unroll in unrolls:
        run = setup(base.replace(model={"scan_unroll": unroll}))
        batches = [run.put_batch(run.task.train_batch(i)) for i in range(args.steps_per_round)]
        state = run.state
        for i in range(args.warmup):
            state, metrics = run.train_step(state, batches[i % len(batches)])
        jax.block_until_ready(metrics["loss"])
        m = run.train_step.memory_analysis()
        runs[unroll] = {"run": run, "batches": batches, "state": state, "rates": [],
                        "losses": [], "compile_s": run.compile_s,
                        "temp_mb": m.temp_size_in_bytes / 1e6 if m else float("nan")}  # fmt: skip
    print(f"{base.model.n_layers} layers | batch {base.batch_size} x {base.data.seq_len} | "
          f"{base.precision} | mesh {describe_mesh(run.mesh)} on {jax.devices()[0].platform} "
          f"| jax {jax.__version__}")  # fmt: skip

    tokens = base.batch_size * base.data.seq_len * args.steps_per_round
    for r in range(args.rounds):
        for v in runs.values():
            state, start = v["state"], time.perf_counter()
            for batch in v["batches"]:
                state, metrics = v["run"].train_step(state, batch)
                v["losses"].append(metrics["loss"])
            jax.block_until_ready(metrics["loss"])
            v["rates"].append(tokens / (time.perf_counter() - start))
            v["state"] = state
        rates = " | ".join(f"unroll {u} {v['rates'][-1]:,.0f}" for u, v in runs.items())
        print(f"round {r + 1}: {rates} tokens/s")

    first = statistics.median(runs[unrolls[0]]["rates"])
    reference = np.array(runs[unrolls[0]]["losses"], np.float64)
    for unroll, v in runs.items():
        rate = statistics.median(v["rates"])
        gap = float(np.max(np.abs(np.array(v["losses"], np.float64) - reference)))
        print(f"--model.scan_unroll={unroll}: median {rate:,.0f} tokens/s ({rate / first:.2f}x) "
              f"| compiled in {v['compile_s']:.1f}s | temporaries {v['temp_mb']:,.1f} MB "
              f"| max loss difference {gap:.1e}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
