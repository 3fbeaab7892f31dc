"""Data loader throughput against what the train step consumes, and packing efficiency.

    python benchmarks/data_pipeline.py                 # CPU: ~1 minute
    python benchmarks/data_pipeline.py --tokens 200e6  # a bigger token file

In one process:
  default   the `default` preset (embedded corpus): batches/s of the loader (grain threads,
            this process's rows = all of them) against the measured train step on this machine;
  token     a pre-tokenized uint32 token file (memmap) read at `1b` shapes (8 x 2048): the
            loader's tokens/s against the tokens/s the `1b` step would consume on one H100 at
            the MFU in --mfu (an estimate from model FLOPs: the loader has to beat it);
  parquet   tokenizing Parquet text shards into the token cache (once per data set): MB/s;
  packing   share of target positions the loss keeps (not across a document boundary).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from engine.config import PRESETS, DataConfig
from engine.data import TextTask, prefetch
from engine.sources import ByteTokenizer, HFTokenizer, tokenize_to_cache, write_token_file

H100_BF16 = 989e12


def loader_rate(task, steps: int, depth: int, threads: int) -> float:
    """Batches per second from the prefetching loader, after its first batch."""
    batches = prefetch(task, range(steps + 1), range(task.batch_size), depth, threads)
    next(batches)
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    return steps / (time.perf_counter() - start)


def packing(task) -> float:
    masks = [task.train_batch(s)["mask"] for s in range(20)]
    return float(np.mean(masks))


def default_preset(args) -> None:
    from engine.trainer import setup

    cfg = PRESETS["default"]
    cfg = dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, tensorboard=False))
    run = setup(cfg)
    times = []
    for step in range(12):
        start = time.perf_counter()
        run.state, metrics = run.train_step(run.state, run.put_batch(run.task.train_batch(step)))
        float(metrics["loss"])
        times.append(time.perf_counter() - start)
    step_rate = 1 / statistics.median(times[2:])
    rate = loader_rate(run.task, 200, args.depth, args.threads)
    tokens = cfg.batch_size * cfg.data.seq_len
    print(
        f"default: loader {rate:,.0f} batches/s ({rate * tokens:,.0f} tok/s) vs train step "
        f"{step_rate:.1f} steps/s ({step_rate * tokens:,.0f} tok/s) -> loader/step "
        f"{rate / step_rate:,.0f}x | packing {packing(run.task):.2%} of targets trained"
    )


def token_file(args, root: Path) -> None:
    from engine.trainer import flops_per_token

    rng = np.random.default_rng(0)
    lengths = rng.lognormal(6.5, 1.0, int(args.tokens / 900)).astype(np.int64) + 1
    total, docs = 0, []
    for n in lengths:  # documents with a realistic spread of lengths (median ~650 tokens)
        docs.append(rng.integers(1, 128_000, n, dtype=np.uint32))
        total += n + 1
        if total >= args.tokens:
            break
    path = write_token_file(root / "tokens", docs, eos_id=0, vocab_size=128_256)
    cfg = PRESETS["1b"]
    data = dataclasses.replace(cfg.data, source=str(path))
    task = TextTask(data, cfg.batch_size, seed=0)
    rate = loader_rate(task, 100, args.depth, args.threads) * cfg.batch_size * cfg.data.seq_len
    need = args.mfu * H100_BF16 / flops_per_token(cfg)
    print(
        f"token file ({total / 1e6:.0f}M uint32 tokens, memmap), 1b shapes "
        f"{cfg.batch_size}x{cfg.data.seq_len}: loader {rate:,.0f} tok/s vs the 1b step on one "
        f"H100 at {args.mfu:.0%} MFU ~{need:,.0f} tok/s -> {rate / need:.1f}x | packing "
        f"{packing(task):.2%} of targets trained"
    )


def parquet(args, root: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    words = np.array(["shard", "train", "token", "mesh", "data", "the", "of", "a", "model"])
    docs = [" ".join(rng.choice(words, rng.integers(20, 400))) for _ in range(args.documents)]
    shards = root / "parquet"
    shards.mkdir()
    for i in range(4):
        pq.write_table(pa.table({"text": docs[i::4]}), shards / f"part-{i:05d}.parquet")
    size = sum(len(d) for d in docs)
    # A byte-level BPE trained on the same text stands in for a model's tokenizer.json.
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator(docs[:2000], trainers.BpeTrainer(vocab_size=4000,
                            special_tokens=["</s>"]))  # fmt: skip
    bpe.save(str(root / "tokenizer.json"))
    for name, tokenizer in (("byte", ByteTokenizer()), ("BPE tokenizer.json", None)):
        cache = root / f"cache-{tokenizer is None}"
        data = DataConfig(source=str(shards), cache_dir=str(cache))
        tokenizer = tokenizer or HFTokenizer(str(root / "tokenizer.json"))
        start = time.perf_counter()
        path = tokenize_to_cache(data, tokenizer)
        seconds = time.perf_counter() - start
        tokens = (
            path.stat().st_size
            / np.dtype(json.loads(path.with_suffix(".json").read_text())["dtype"]).itemsize
        )
        print(
            f"parquet ({len(docs):,} documents, {size / 1e6:.0f} MB text, {name}): tokenized "
            f"into the cache at {size / 1e6 / seconds:.1f} MB/s, {tokens / seconds:,.0f} tok/s "
            f"({seconds:.1f} s, once per data set)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=float, default=50e6, help="token file size")
    parser.add_argument("--documents", type=int, default=50_000, help="parquet documents")
    parser.add_argument("--mfu", type=float, default=0.6, help="for the H100 estimate")
    parser.add_argument("--depth", type=int, default=4, help="prefetch depth (--data.prefetch)")
    parser.add_argument("--threads", type=int, default=2, help="loader threads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        default_preset(args)
        token_file(args, Path(root))
        parquet(args, Path(root))


if __name__ == "__main__":
    main()
