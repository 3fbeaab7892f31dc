"""Variants of one training configuration side by side: which knob buys how much MFU.

    python benchmarks/mfu_sweep.py --config 1b --mesh.data=1 --out $OUT     # one GPU
    python benchmarks/mfu_sweep.py --config default --attention xla         # CPU: the mechanics

Each variant (attention kernel, remat policy, batch, XLA flags: see `variants`) runs
benchmarks/mfu.py in a fresh process, so XLA flags apply and no memory is left over from the
last; one that fails (out of memory, a kernel this device lacks) is reported and the sweep goes
on. The table comes last; --out DIR also keeps every variant's output (sweep.log) and figures
(sweep.jsonl). --only picks variants by number, so a sweep can be split across calls.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from engine.config import parse_args  # noqa: E402

# The line that says why a variant failed: an exception, XLA's out-of-memory status, our errors.
ERROR = re.compile(r"^[\w.]*(Error|Exception)\b|RESOURCE_EXHAUSTED|^error:|timed out")
CUBLAS = {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=false"}  # XLA picks Triton for some gemms


def variants(
    batch_size: int, attention: str, unrolled: bool
) -> list[tuple[str, list[str], dict[str, str]]]:
    """(name, flags added to the base configuration's, environment) of each variant; the last
    switches between the layer loop and unrolled layers, whichever the base does not run."""
    attn = f"--model.attention={attention}"
    double = f"--batch_size={2 * batch_size}"
    chunks = "--model.loss_chunks=8"  # 1/8 of the logits alive at a time
    none, full = "--model.remat=none", "--model.remat=full"
    return [
        ("as configured", [], {}),
        (attention, [attn], {}),
        (f"{attention}, remat=none", [attn, none], {}),
        (f"{attention}, remat=none, loss chunks", [attn, none, chunks], {}),
        (f"{attention}, batch x2, loss chunks", [attn, double, chunks], {}),
        (f"{attention}, remat=full, batch x2", [attn, full, double], {}),
        (f"{attention}, cuBLAS for all gemms", [attn], CUBLAS),
        ("xla attention", ["--model.attention=xla"], {}),  # what `auto` chose against
        # Unrolled: 1.35x for `small` on an H100 (benchmarks/RESULTS.md); more compile time.
        (f"{attention}, layer loop", [attn, "--model.scan_unroll=1"], {})
        if unrolled
        else (f"{attention}, layers unrolled", [attn, "--model.scan_unroll=0"], {}),
    ]


def run_variant(name, flags, env, base, args, log) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "figures.json")
        timing = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
        command = [sys.executable, str(HERE / "mfu.py"), "--json", str(out), *timing, *base, *flags]
        environment = {**os.environ, **env}
        if "XLA_FLAGS" in env and "XLA_FLAGS" in os.environ:
            environment["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} {env['XLA_FLAGS']}"
        try:
            done = subprocess.run(command, env=environment, capture_output=True, text=True,
                                  timeout=args.variant_timeout)  # fmt: skip
            output, rc = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as e:  # its output is bytes, whatever `text` says
            partial = b"".join(x for x in (e.stdout, e.stderr) if x).decode(errors="replace")
            output, rc = f"{partial}\ntimed out", "timeout"
        log.write(f"=== {name}: {' '.join(command)} {env or ''}\n{output}\n")
        log.flush()
        if rc == 0 and out.exists():
            return {"variant": name, **json.loads(out.read_text())}
        lines = [line for line in output.splitlines() if line.strip()] or ["no output"]
        errors = [line for line in lines if ERROR.search(line)] or lines
        return {"variant": name, "error": f"rc {rc}: {errors[-1].strip()}"}


def table(results: list[dict]) -> list[str]:
    def pct(x):
        return f"{x:6.1%}" if x is not None else "     -"

    rows = [
        f"{'#':>2} {'variant':<30} {'step ms':>8} {'tok/s':>9} {'MFU':>6} {'of mm':>6} "
        f"{'HFU':>6} {'mem GB':>6} {'compile':>7}"
    ]
    for r in results:
        i = r["index"]
        if "error" in r:
            rows.append(f"{i:>2} {r['variant']:<30} failed: {r['error'][:120]}")
            continue
        memory = f"{r['peak_memory_gb']:6.1f}" if r["peak_memory_gb"] else "     -"
        rows.append(
            f"{i:>2} {r['variant']:<30} {r['step_ms']:8.1f} {r['tokens_per_s']:9,.0f} "
            f"{pct(r['mfu'])} {pct(r['mfu_of_matmul_ceiling'])} {pct(r['hfu'])} {memory} "
            f"{r['compile_s']:6.1f}s"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--only", default=None, help="comma-separated variant numbers")
    parser.add_argument("--out", default=None, help="directory for sweep.log and sweep.jsonl")
    parser.add_argument("--variant_timeout", type=float, default=300)
    parser.add_argument("--attention", default="cudnn", choices=["cudnn", "xla"])
    args, base = parser.parse_known_args()
    base = base or ["--config", "1b", "--mesh.data=1"]
    # Configuration only: a device touched here would hold GPU memory the variants need.
    cfg = parse_args(base)
    chosen = list(enumerate(variants(cfg.batch_size, args.attention, cfg.model.scan_unroll == 0)))
    if args.only:
        keep = {int(i) for i in args.only.split(",")}
        chosen = [(i, v) for i, v in chosen if i in keep]
    out = Path(args.out or tempfile.mkdtemp(prefix="mfu_sweep_"))
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with open(out / "sweep.log", "a") as log, open(out / "sweep.jsonl", "a") as jsonl:
        for i, (name, flags, env) in chosen:
            result = {"index": i, **run_variant(name, flags, env, base, args, log)}
            status = result.get("error") or f"{result['step_ms']:.1f} ms/step"
            print(f"[{i}] {name}: {status}", flush=True)
            jsonl.write(json.dumps({"base": base, "flags": flags, "env": env, **result}) + "\n")
            results.append(result)
    print(f"base: {' '.join(base)} | {args.steps} steps after {args.warmup} | log: {out}")
    print("\n".join(table(results)))


if __name__ == "__main__":
    main()
