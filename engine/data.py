"""Training batches: deterministic, per process, prefetched.

- `lm`: a token stream (engine.sources: the embedded corpus, a token file, text shards) packed
  into windows of `seq_len + 1` tokens, documents back to back. The loss mask is 0 where the
  input token ends a document, so no position is trained to guess the next document's first
  token from the previous one.
- `digits`: scikit-learn's bundled 8x8 handwritten digits, 20% held out.

Example `g` of the run is window `shuffle(seed)[g]` (grain's index shuffle, a fresh permutation
each epoch) and step `s` reads examples `s*B ... s*B + B - 1`. So the data position is a pure
function of (seed, step): a resume, on any number of processes, reads exactly the batches an
uninterrupted run would have, and each process builds only its own rows of them.
"""

from __future__ import annotations

from collections.abc import Iterator

import grain
import numpy as np

from engine.config import DataConfig
from engine.sources import TokenStream, make_tokenizer, token_stream

Batch = dict[str, np.ndarray]


def pack(
    tokens: np.ndarray, starts: np.ndarray, seq_len: int, eos_id: int, segments: bool = False
) -> Batch:
    """Windows of `seq_len + 1` tokens at `starts`: inputs, next-token targets, loss mask; with
    `segments`, each input's document number within its row (an end token closes its own)."""
    chunk = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
    inputs = chunk[:, :-1]
    ends = inputs == eos_id
    batch = {
        "inputs": inputs,
        "targets": chunk[:, 1:],
        "mask": (~ends).astype(np.float32),  # a target across a document boundary
    }
    if segments:
        batch["segments"] = (np.cumsum(ends, axis=1) - ends).astype(np.int32)
    return batch


class TextTask:
    """Shuffled, non-overlapping windows of a token stream (packed documents)."""

    # Logical names of each batch array's dimensions: the rule table shards them.
    batch_names = {k: ("batch", "length") for k in ("inputs", "targets", "mask", "segments",
                                                   "positions")}  # fmt: skip

    def __init__(self, data: DataConfig, batch_size: int, seed: int):
        self.seq_len, self.batch_size = data.seq_len, batch_size
        self.eval_batches, self.segments = data.eval_batches, data.document_mask
        eval_tokens = (batch_size * data.eval_batches + 1) * data.seq_len + 1
        self.stream: TokenStream = token_stream(data, eval_tokens)
        self.vocab_size, self.tokens_per_example = self.stream.vocab_size, data.seq_len
        self.windows = (len(self.stream.train) - 1) // data.seq_len
        # Window id of every example index (lazy, O(1) each): grain's per-epoch index shuffle.
        self.order = grain.MapDataset.range(self.windows).shuffle(seed=seed)
        # Bytes need a tokenizer: the byte-level one for byte streams, or the one named.
        byte_stream = data.tokenizer == "byte" and self.vocab_size <= 256
        self.tokenizer = make_tokenizer(data) if byte_stream or data.tokenizer != "byte" else None
        self._eval_bytes: int | None = None

    def eval_bytes(self) -> int | None:
        """UTF-8 bytes of the text that the counted eval targets spell (all rows), for bits per
        byte; None when the stream's tokenizer is unknown (a bare token file)."""
        if self.tokenizer is None:
            return None
        if self._eval_bytes is None:
            total = 0
            for batch in self.eval_iter():
                for targets, mask in zip(batch["targets"], batch["mask"], strict=True):
                    # Runs of counted targets decode together: a character may span tokens.
                    cuts = np.flatnonzero(mask == 0)
                    pieces = np.split(targets, cuts)
                    pieces = pieces[:1] + [p[1:] for p in pieces[1:]]  # the uncounted target
                    total += sum(self.tokenizer.count_bytes(p) for p in pieces if len(p))
            self._eval_bytes = total
        return self._eval_bytes

    def sample_ids(self, step: int, rows: range) -> np.ndarray:
        first = step * self.batch_size
        return np.array([self.order[first + r] for r in rows], np.int64)

    def train_batch(self, step: int, rows: range | None = None) -> Batch:
        rows = range(self.batch_size) if rows is None else rows
        starts = self.sample_ids(step, rows) * self.seq_len
        return pack(self.stream.train, starts, self.seq_len, self.stream.eos_id, self.segments)

    def eval_iter(self, rows: range | None = None) -> Iterator[Batch]:
        # Fixed windows, spread over the validation split: eval losses compare across runs.
        rows = range(self.batch_size) if rows is None else rows
        count = self.eval_batches * self.batch_size
        span = len(self.stream.val) - self.seq_len - 1
        starts = np.linspace(0, span, count).astype(np.int64).reshape(self.eval_batches, -1)
        for batch_starts in starts:
            yield pack(self.stream.val, batch_starts[rows.start : rows.stop], self.seq_len,
                       self.stream.eos_id, self.segments)  # fmt: skip


class DigitsTask:
    """8x8 digit images scaled to [0, 1]; train batches sampled per step, eval covers all of val."""

    batch_names = {"inputs": ("batch", None), "targets": ("batch",), "mask": ("batch",)}

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

    def sample_ids(self, step: int, rows: range) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        return rng.choice(len(self.y_train), self.batch_size, replace=False)[rows.start : rows.stop]

    def train_batch(self, step: int, rows: range | None = None) -> Batch:
        idx = self.sample_ids(step, range(self.batch_size) if rows is None else rows)
        mask = np.ones(len(idx), np.float32)
        return {"inputs": self.x_train[idx], "targets": self.y_train[idx], "mask": mask}

    def eval_iter(self, rows: range | None = None) -> Iterator[Batch]:
        # Every held-out image exactly once; the last batch is padded and masked out.
        b = self.batch_size
        rows = range(b) if rows is None else rows
        for start in range(0, len(self.y_val), b):
            x, y = self.x_val[start : start + b], self.y_val[start : start + b]
            pad = b - len(y)
            batch = {
                "inputs": np.pad(x, ((0, pad), (0, 0))),
                "targets": np.pad(y, (0, pad)),
                "mask": np.pad(np.ones(len(y), np.float32), (0, pad)),
            }
            yield {k: v[rows.start : rows.stop] for k, v in batch.items()}


TASKS = {"lm": TextTask, "digits": DigitsTask}


def batch_shapes(task: str, data: DataConfig, batch_size: int) -> dict[str, tuple]:
    """(shape, dtype) of each array of a global batch, from the config alone: what an abstract
    compile needs, without opening the data."""
    if task == "digits":
        return {"inputs": ((batch_size, 64), np.float32), "targets": ((batch_size,), np.int32),
                "mask": ((batch_size,), np.float32)}  # fmt: skip
    rows = (batch_size, data.seq_len)
    shapes = {"inputs": (rows, np.int32), "targets": (rows, np.int32), "mask": (rows, np.float32)}
    if data.document_mask:
        shapes["segments"] = (rows, np.int32)
    return shapes


def make_task(task: str, data: DataConfig, batch_size: int, seed: int):
    if task == "digits":
        return DigitsTask(batch_size, seed)
    return TextTask(data, batch_size, seed)


def prefetch(task, steps: range, rows: range, depth: int, threads: int = 2):
    """This process's rows of the batches of `steps`, built `depth` ahead by grain threads."""
    batches = grain.MapDataset.range(steps.start, steps.stop).map(
        lambda step: task.train_batch(step, rows)
    )
    if depth == 0:
        return iter(batches)
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=depth)
    return iter(batches.to_iter_dataset(options))
