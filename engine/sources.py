"""Token sources: where training tokens come from, as one flat token stream per split.

A source is the embedded corpus, a pre-tokenized token file, or text shards (Parquet, JSONL) as
Spark/Hadoop jobs write them. Text is tokenized once, by the byte-level tokenizer or a Hugging
Face `tokenizer.json`, into a token file in a local cache, so training reads tokens by memmap,
each process touching only the pages of its own rows. Every path goes through fsspec:
`s3://`, `gs://`, `hdfs://` work when that fsspec backend is installed.

A token file is `NAME.bin` (raw little-endian uint8/uint16/uint32 tokens) with `NAME.json`
beside it: {"dtype": "uint16", "eos_id": 0, "vocab_size": 32000, "documents": N}. Documents
are concatenated, each followed by `eos_id`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import sysconfig
import zlib
from functools import cache
from pathlib import Path

import numpy as np

from engine.config import ConfigError, DataConfig

SEPARATOR = 0  # byte 0 (never in text) ends each document in byte-level streams
VAL_EVERY = 20  # embedded corpus: one file in 20 goes to validation


@dataclasses.dataclass(frozen=True)
class TokenStream:
    """Train and validation tokens, documents ending in `eos_id` (arrays may be memmaps)."""

    train: np.ndarray
    val: np.ndarray
    eos_id: int
    vocab_size: int
    name: str


# ---------------------------------------------------------------- tokenizers


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255; byte 0 ends a document."""

    vocab_size, eos_id = 256, SEPARATOR

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode(), np.uint8) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= i < 256).decode(errors="replace")

    def count_bytes(self, ids) -> int:
        """Bytes that `ids` spell: one each."""
        return len(ids)


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file (the `tokenizer.json` of a model directory)."""

    EOS_NAMES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|im_end|>")

    def __init__(self, path: str, eos_id: int | None = None):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigError(
                f"--data.tokenizer={path} needs the `tokenizers` package; pip install tokenizers."
            ) from None
        with _open(path, "rb") as f:
            self.tokenizer = Tokenizer.from_str(f.read().decode())
        self.vocab_size = self.tokenizer.get_vocab_size()
        found = [self.tokenizer.token_to_id(n) for n in self.EOS_NAMES]
        found = [i for i in found if i is not None]
        if eos_id is None and not found:
            raise ConfigError(
                f"--data.tokenizer={path} has none of the end-of-document tokens "
                f"{', '.join(self.EOS_NAMES)}; pass its id as --data.eos_id."
            )
        self.eos_id = found[0] if eos_id is None else eos_id

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, np.uint32) for e in encodings]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def count_bytes(self, ids) -> int:
        """UTF-8 bytes of the text that `ids` spell (special tokens spell none)."""
        return len(self.decode(ids).encode())


def make_tokenizer(cfg: DataConfig):
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    return HFTokenizer(cfg.tokenizer, cfg.eos_id)


# ---------------------------------------------------------------- reading text shards


def _open(path: str, mode: str = "rb"):
    import fsspec

    return fsspec.open(path, mode, compression="infer").open()


def expand(pattern: str) -> list[str]:
    """Sorted files matching a path, glob or directory (of part-* files), local or remote."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(pattern)
    paths = fs.glob(root) if any(c in root for c in "*?[") else [root] if fs.exists(root) else []
    if len(paths) == 1 and fs.isdir(paths[0]):
        paths = [p for p in fs.find(paths[0]) if not Path(p).name.startswith(("_", "."))]
    if not paths:
        raise ConfigError(f"--data.source={pattern} matches no files; check the path or glob.")
    return sorted(fs.unstrip_protocol(p) if "://" in pattern else p for p in paths)


def read_texts(path: str, field: str, batch: int = 1024):
    """Lists of document texts from one Parquet or JSONL(.gz/.zst) shard, in file order."""
    if ".parquet" in path or ".pq" in path:
        import pyarrow.parquet as pq

        with _open(path) as f:
            table = pq.ParquetFile(f)
            if field not in table.schema_arrow.names:
                raise ConfigError(
                    f"{path} has no column '{field}' (columns: {table.schema_arrow.names}); "
                    "pass the text column as --data.text_field."
                )
            for rb in table.iter_batches(batch_size=batch, columns=[field]):
                yield [t for t in rb.column(0).to_pylist() if t]
        return
    with _open(path) as f:
        texts = []
        for n, line in enumerate(io.TextIOWrapper(f, encoding="utf-8"), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)[field])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(
                    f"{path} line {n} is not a JSON object with a '{field}' string; fix the file "
                    "or pass the text key as --data.text_field."
                ) from None
            if len(texts) == batch:
                yield texts
                texts = []
        if texts:
            yield texts


def write_token_file(out: str | Path, docs, eos_id: int, vocab_size: int) -> Path:
    """Write documents (iterable of token arrays) as `out.bin` + `out.json`, atomically: a
    failure leaves no partial file."""
    out = Path(out)
    dtype = np.uint8 if vocab_size <= 2**8 else np.uint16 if vocab_size <= 2**16 else np.uint32
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    count = 0
    try:
        with open(tmp, "wb") as f:
            for doc in docs:
                f.write(np.append(doc, eos_id).astype(dtype).tobytes())
                count += 1
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    meta = {"dtype": np.dtype(dtype).name, "eos_id": eos_id, "vocab_size": vocab_size}
    out.with_suffix(".json").write_text(json.dumps({**meta, "documents": count}) + "\n")
    tmp.rename(out.with_suffix(".bin"))  # last: a .bin exists only when complete
    return out.with_suffix(".bin")


def fingerprint(fs, path: str) -> list:
    """What identifies a file's content without reading it all: name, size, the modification
    time and ETag/checksum its file system reports, and for local files a hash of 64 KiB at
    its start, middle and end (an edit that keeps size and time still shows)."""
    info = fs.info(path)
    stamps = ("size", "mtime", "LastModified", "last_modified", "ETag", "etag", "md5Hash", "crc32c")
    found = [path] + [str(info[k]) for k in stamps if info.get(k) is not None]
    if "file" in fs.protocol or "local" in fs.protocol:
        size, digest = info["size"], hashlib.sha256()
        with open(path, "rb") as f:
            for start in sorted({0, max(size // 2 - 32768, 0), max(size - 65536, 0)}):
                f.seek(start)
                digest.update(f.read(65536))
        found.append(digest.hexdigest())
    return found


def tokenize_to_cache(cfg: DataConfig, tokenizer) -> Path:
    """Tokenize the text shards of `cfg.source` once into a token file in the cache.

    Keyed by each shard's content (`fingerprint`) and the tokenizer, so a changed input is
    tokenized again;
    every process (or host) builds or finds its own copy, with no shared file system needed."""
    import fsspec

    files = expand(cfg.source)
    fs = fsspec.core.url_to_fs(files[0])[0]
    key = json.dumps([fingerprint(fs, f) for f in files] + [cfg.tokenizer, cfg.text_field])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    cache_dir = Path(cfg.cache_dir or Path.home() / ".cache" / "shardtrain" / "tokens")
    out = cache_dir / digest
    if out.with_suffix(".bin").exists():
        return out.with_suffix(".bin")

    def docs():
        for path in files:
            for texts in read_texts(path, cfg.text_field):
                yield from tokenizer.encode_batch(texts)

    print(f"tokenizing {len(files)} file(s) of {cfg.source} into {out}.bin (once)")
    return write_token_file(out, docs(), tokenizer.eos_id, tokenizer.vocab_size)


# ---------------------------------------------------------------- token streams


def load_token_file(path: str | Path, eval_tokens: int) -> TokenStream:
    """A token file by memmap; its last `eval_tokens` tokens are the validation split."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.exists():
        raise ConfigError(f"--data.source={path} does not exist; pass an existing token file.")
    if not meta_path.exists():
        raise ConfigError(
            f"{path} has no {meta_path.name} beside it (dtype, eos_id, vocab_size); write token "
            "files with engine.sources.write_token_file or pass text shards."
        )
    meta = json.loads(meta_path.read_text())
    tokens = np.memmap(path, dtype=meta["dtype"], mode="r")
    if len(tokens) < 4 * eval_tokens:
        raise ConfigError(
            f"{path} holds {len(tokens):,} tokens, too few to hold out {eval_tokens:,} for "
            "validation and train on 3x that; use more data or lower --data.eval_batches."
        )
    split = len(tokens) - eval_tokens
    return TokenStream(
        tokens[:split], tokens[split:], meta["eos_id"], meta["vocab_size"], str(path)
    )


@cache
def embedded_corpus() -> TokenStream:
    """Python's standard library source, byte-level; a file's split is fixed by its path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: dict[bool, list[bytes]] = {True: [], False: []}
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        is_val = zlib.crc32(str(path.relative_to(root)).encode()) % VAL_EVERY == 0
        parts[is_val] += [path.read_bytes(), bytes([SEPARATOR])]
    train, val = (np.frombuffer(b"".join(parts[v]), np.uint8) for v in (False, True))
    return TokenStream(train, val, SEPARATOR, 256, "embedded")


def local_copy(cfg: DataConfig) -> Path:
    """A remote token file (and its .json) copied once into the cache: memmap needs a file."""
    import fsspec

    digest = hashlib.sha256(cfg.source.encode()).hexdigest()[:16]
    out = Path(cfg.cache_dir or Path.home() / ".cache" / "shardtrain" / "tokens") / digest
    if not out.with_suffix(".bin").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"copying {cfg.source} to {out}.bin (once)")
        for suffix in (".json", ".bin"):  # the .bin last: it marks a complete copy
            remote = cfg.source[: -len(".bin")] + suffix
            tmp = out.with_name(f"{out.name}{suffix}.{os.getpid()}.tmp")
            with fsspec.open(remote, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(64 << 20):
                    dst.write(chunk)
            tmp.rename(out.with_suffix(suffix))
    return out.with_suffix(".bin")


def token_stream(cfg: DataConfig, eval_tokens: int) -> TokenStream:
    """The stream `cfg.source` names: 'embedded', a token file (.bin) or text shards."""
    if cfg.source == "embedded":
        return embedded_corpus()
    if cfg.source.endswith(".bin"):
        local = cfg.source if "://" not in cfg.source else local_copy(cfg)
        return load_token_file(local, eval_tokens)
    if not any(s in cfg.source for s in (".parquet", ".pq", ".jsonl", ".json")):
        if not Path(cfg.source).is_dir():
            raise ConfigError(
                f"--data.source={cfg.source} is not 'embedded', a token file (.bin), or "
                "Parquet/JSONL text shards (.parquet, .jsonl[.gz], or a directory of them)."
            )
    return load_token_file(tokenize_to_cache(cfg, make_tokenizer(cfg)), eval_tokens)
