"""Checkpoint save/restore throughput against the raw speed of the same disk, and how long an
async save blocks the training loop.

    python benchmarks/checkpoint_io.py                           # CPU: `small` at 32 layers, 3.2 GB
    python benchmarks/checkpoint_io.py --config 1b --mesh.data=1 --mesh.fsdp=-1   # GPU

Builds the real train state of a preset (fp32 params + AdamW moments, sharded over the mesh;
default `small` over fsdp=8, 8 virtual CPU devices when there is no accelerator), then in one
process, in alternating rounds:
  save      `Checkpoints.save` as the loop calls it, right after a train step: `blocked` is how
            long the call held the loop, `committed` is when orbax finished the step, `durable`
            adds an fsync of its files. On a CPU, XLA returns a step's outputs and then frees its
            temporaries (GBs at this size): until that is done, anything that maps memory or
            starts a thread waits (0.4 s here, with or without a save). `release` times that tail
            with a thread start just before the save, so `blocked` is the save's own;
            then the same state saved with the other `--checkpoint.compress` setting (zstd or
            not) into a second directory, with its size on disk;
  raw       write the same number of bytes as 8 files in parallel (write + fsync), read back;
  steps     train steps with no save in flight, then while a second save runs behind them;
  restore   the newest checkpoint read back into the mesh's sharding (`Checkpoints.restore_latest`).
Reads are after `posix_fadvise(DONTNEED)` on every file, so they come from the disk (or the
host's cache underneath a VM disk: compare raw and restore, not either with a datasheet).
Prints GB/s for each and `blocked share` = blocked / committed (goal <= 5 %). Any
`engine.train` flag applies; the run directory is a temporary one under --dir.
"""

from __future__ import annotations

import os
import sys

if "XLA_FLAGS" not in os.environ:  # ignored when there is an accelerator
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from engine.checkpoint import Checkpoints  # noqa: E402
from engine.config import parse_args  # noqa: E402
from engine.trainer import setup  # noqa: E402
from sharding import describe_mesh  # noqa: E402

# `small` widened to 32 layers: a 3.2 GB state; small batches keep CPU train steps short.
DEFAULT_ARGS = (
    "--config small --model.n_layers=32 --model.scan_unroll=1 --mesh.data=1 --mesh.fsdp=-1 "
    "--batch_size=8"
)
DEFAULT_ARGS = [*DEFAULT_ARGS.split(), "--data.seq_len=128"]


def _files(path: Path) -> list[Path]:
    return [f for f in path.rglob("*") if f.is_file()]


def sync_and_evict(path: Path) -> float:
    """fsync every file under `path` (seconds it took), then drop them from the page cache."""
    start = time.perf_counter()
    for f in _files(path) if path.is_dir() else [path]:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return time.perf_counter() - start


def raw_io(root: Path, data: np.ndarray, streams: int = 8) -> tuple[float, float]:
    """Seconds to write `data` durably as `streams` files in parallel (as checkpoint writers
    do), and to read them back from disk."""
    chunks = np.array_split(data, streams)
    paths = [root / f"raw.{i}" for i in range(streams)]

    def write(i):
        fd = os.open(paths[i], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            os.write(fd, memoryview(chunks[i]))
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(i):
        back = np.empty_like(chunks[i])
        with open(paths[i], "rb", buffering=0) as f:
            assert f.readinto(memoryview(back)) == back.nbytes
        paths[i].unlink()

    with ThreadPoolExecutor(streams) as pool:
        start = time.perf_counter()
        list(pool.map(write, range(streams)))
        write_s = time.perf_counter() - start
        for path in paths:
            sync_and_evict(path)
        start = time.perf_counter()
        list(pool.map(read, range(streams)))
        read_s = time.perf_counter() - start
    return write_s, read_s


def memory_release() -> float:
    """Seconds until this process can start a thread: after a CPU train step, the tail of XLA
    freeing the step's temporaries (it holds the process's memory map, which a new thread's
    stack needs), which whatever allocates next would wait for, a save or the next step."""
    start = time.perf_counter()
    thread = threading.Thread(target=lambda: None)
    thread.start()
    thread.join()
    return time.perf_counter() - start


def time_steps(run, n: int) -> list[float]:
    times = []
    for step in range(n):
        start = time.perf_counter()
        run.state, metrics = run.train_step(run.state, run.put_batch(run.task.train_batch(step)))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="train steps timed per round")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args, rest = parser.parse_known_args()
    root = Path(tempfile.mkdtemp(prefix="ckpt_io_", dir=args.dir))
    cfg = parse_args(rest or DEFAULT_ARGS)
    cfg = dataclasses.replace(
        cfg,
        run_dir=str(root / "run"),
        checkpoint=dataclasses.replace(cfg.checkpoint, keep=2, async_save=True),
    )
    run = setup(cfg)
    ckpt = Checkpoints(run)
    # The other setting of --checkpoint.compress, saved in the same rounds into its own
    # directory: zstd's cost and gain measured side by side.
    other_cfg = cfg.replace(
        run_dir=str(root / "other"), checkpoint={"compress": not cfg.checkpoint.compress}
    )
    other = Checkpoints(dataclasses.replace(run, cfg=other_cfg))
    names = {True: "zstd", False: "uncompressed"}
    this_name, other_name = names[cfg.checkpoint.compress], names[not cfg.checkpoint.compress]
    leaves = jax.tree.leaves(run.state)
    gb = sum(x.nbytes for x in leaves) / 1e9
    # The raw comparison writes as many bytes as the state, as random data (nothing compresses).
    data = np.random.default_rng(0).integers(0, 256, int(gb * 1e9), dtype=np.uint8)
    print(
        f"checkpoint_io: {' '.join(rest or DEFAULT_ARGS)} | state {gb:.2f} GB in {len(leaves)} "
        f"arrays | mesh {describe_mesh(run.mesh)} on {jax.devices()[0].platform} | dir {root}"
    )
    time_steps(run, 2)  # warm up: the first steps pay one-time costs the rounds should not
    rows = []
    for i in range(args.rounds):
        step = 2 * i + 1  # a save on its own: what the loop pays, and the throughput
        time_steps(run, 1)  # as in the loop, the save comes right after a step
        release = memory_release()
        start = time.perf_counter()
        ckpt.save(step, run.state)
        blocked = time.perf_counter() - start
        ckpt.wait()
        committed = time.perf_counter() - start
        durable = committed + sync_and_evict(ckpt.directory / str(step))

        start = time.perf_counter()
        other.save(step, run.state)
        other.wait()
        other_durable = time.perf_counter() - start + sync_and_evict(other.directory / str(step))
        sizes = [sum(f.stat().st_size for f in _files(c.directory / str(step))) / 1e9
                 for c in (ckpt, other)]  # fmt: skip

        # The raw baseline after the saves: 3 GB of dirty pages just before a save would
        # slow the save call in a way no training loop sees.
        raw_w, raw_r = raw_io(root, data)

        quiet = statistics.median(time_steps(run, args.steps))
        ckpt.save(step + 1, run.state)  # and one behind train steps: what the steps pay
        busy = statistics.median(time_steps(run, args.steps))
        ckpt.wait()
        sync_and_evict(ckpt.directory / str(step + 1))
        step += 1

        start = time.perf_counter()
        restored = ckpt.restore_latest()
        jax.block_until_ready(restored.state)
        restore = time.perf_counter() - start
        assert restored.step == step
        run.state = restored.state  # as a resume does; the old copy is freed
        del restored
        rows.append(
            dict(raw_w=raw_w, raw_r=raw_r, blocked=blocked, release=release, committed=committed,
                 durable=durable, restore=restore, quiet=quiet, busy=busy, other=other_durable)
        )  # fmt: skip
        print(
            f"round {i + 1}: raw write {gb / raw_w:.2f} GB/s, read {gb / raw_r:.2f} GB/s | save "
            f"blocked {blocked:.2f}s (after the step's release {release:.2f}s), "
            f"committed {committed:.2f}s ({gb / committed:.2f} GB/s), "
            f"durable {durable:.2f}s ({gb / durable:.2f} GB/s, {sizes[0]:.2f} GB on disk) | "
            f"{other_name} save durable {other_durable:.2f}s ({gb / other_durable:.2f} GB/s, "
            f"{sizes[1]:.2f} GB) | restore {restore:.2f}s "
            f"({gb / restore:.2f} GB/s) | step {quiet * 1e3:.0f} ms, during save "
            f"{busy * 1e3:.0f} ms"
        )
    ckpt.close()
    other.close()

    def med(key):
        return statistics.median(r[key] for r in rows)

    def paired(key, raw="raw_w"):
        """Median over rounds of raw time / `key` time: each save against the raw write of its
        own round, so the disk's drift between rounds (1.0-2.8 GB/s here) cancels."""
        return statistics.median(r[raw] / r[key] for r in rows)

    print(
        f"median of {args.rounds}: save {gb / med('durable'):.2f} GB/s durable "
        f"({gb / med('committed'):.2f} committed) vs raw write {gb / med('raw_w'):.2f} GB/s "
        f"-> {paired('durable'):.2f}x raw (paired by round; {med('raw_w') / med('durable'):.2f}x "
        f"of the medians) | restore {gb / med('restore'):.2f} GB/s vs raw read "
        f"{gb / med('raw_r'):.2f} GB/s -> {paired('restore', 'raw_r'):.2f}x raw"
    )
    print(
        f"{other_name} save: {gb / med('other'):.2f} GB/s durable -> "
        f"{paired('other'):.2f}x raw ({this_name}: {paired('durable'):.2f}x)"
    )
    blocked_share = [r["blocked"] / r["committed"] for r in rows]
    print(
        f"blocked share: first save {blocked_share[0]:.1%}, later saves "
        f"{statistics.median(blocked_share[1:] or blocked_share):.1%} (goal <= 5%); the step's "
        f"memory release before it {med('release'):.2f}s | "
        f"step time during a save {med('busy') / med('quiet'):.2f}x"
    )
    shutil.rmtree(root)


if __name__ == "__main__":
    sys.exit(main())
