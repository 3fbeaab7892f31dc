"""Embedded data sets that every machine already has: no download.

- `lm`: byte-level language modelling on the Python standard library's own source files, split
  into train and validation by file.
- `digits`: scikit-learn's bundled 8x8 handwritten digits, 20% held out.

The training batch of step `s` is a pure function of `(seed, s)`, so a run can restart at any step
and read exactly the batches it would have read.
"""

from __future__ import annotations

import sysconfig
import zlib
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import numpy as np

Batch = dict[str, np.ndarray]

VAL_EVERY = 20  # one file in 20 goes to validation
SEPARATOR = 0  # byte 0 (never in source text) marks a file boundary


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in sorted(root.rglob("*.py")) if "site-packages" not in p.parts]


@cache
def stdlib_corpus() -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) byte arrays; a file's split is fixed by a hash of its path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: dict[bool, list[bytes]] = {True: [], False: []}
    for path in stdlib_files():
        is_val = zlib.crc32(str(path.relative_to(root)).encode()) % VAL_EVERY == 0
        parts[is_val] += [path.read_bytes(), bytes([SEPARATOR])]
    train, val = (np.frombuffer(b"".join(parts[v]), np.uint8) for v in (False, True))
    return train, val


def _windows(data: np.ndarray, starts: np.ndarray, seq_len: int) -> Batch:
    idx = starts[:, None] + np.arange(seq_len + 1)
    chunk = data[idx].astype(np.int32)
    return {
        "inputs": chunk[:, :-1],
        "targets": chunk[:, 1:],
        "mask": np.ones((len(starts), seq_len), np.float32),
    }


class TextTask:
    """Random windows of `seq_len + 1` bytes from the stdlib corpus."""

    def __init__(self, batch_size: int, seq_len: int, seed: int, eval_batches: int):
        self.train, self.val = stdlib_corpus()
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.eval_batches = eval_batches
        self.tokens_per_example = seq_len

    def train_batch(self, step: int) -> Batch:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.train) - self.seq_len - 1, self.batch_size)
        return _windows(self.train, starts, self.seq_len)

    def eval_iter(self) -> Iterator[Batch]:
        # The same windows every evaluation and every seed, so eval losses compare across runs.
        rng = np.random.default_rng(1234)
        for _ in range(self.eval_batches):
            starts = rng.integers(0, len(self.val) - self.seq_len - 1, self.batch_size)
            yield _windows(self.val, starts, self.seq_len)


class DigitsTask:
    """8x8 digit images scaled to [0, 1]; train batches sampled per step, eval covers all of val."""

    def __init__(self, batch_size: int, seed: int):
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        order = np.random.default_rng(0).permutation(len(labels))
        n_val = len(labels) // 5
        x, y = (images / 16.0).astype(np.float32)[order], labels.astype(np.int32)[order]
        self.x_val, self.y_val = x[:n_val], y[:n_val]
        self.x_train, self.y_train = x[n_val:], y[n_val:]
        self.batch_size, self.seed = batch_size, seed
        self.tokens_per_example = 1

    def train_batch(self, step: int) -> Batch:
        rng = np.random.default_rng([self.seed, step])
        idx = rng.choice(len(self.y_train), self.batch_size, replace=False)
        mask = np.ones(self.batch_size, np.float32)
        return {"inputs": self.x_train[idx], "targets": self.y_train[idx], "mask": mask}

    def eval_iter(self) -> Iterator[Batch]:
        # Every held-out image exactly once; the last batch is padded and masked out.
        b = self.batch_size
        for start in range(0, len(self.y_val), b):
            x, y = self.x_val[start : start + b], self.y_val[start : start + b]
            pad = b - len(y)
            yield {
                "inputs": np.pad(x, ((0, pad), (0, 0))),
                "targets": np.pad(y, (0, pad)),
                "mask": np.pad(np.ones(len(y), np.float32), (0, pad)),
            }


def make_task(task: str, batch_size: int, seq_len: int, seed: int, eval_batches: int):
    if task == "digits":
        return DigitsTask(batch_size, seed)
    return TextTask(batch_size, seq_len, seed, eval_batches)
