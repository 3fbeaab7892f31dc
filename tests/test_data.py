"""The data pipeline: packing masks, sources (token files, Parquet, JSONL, HF tokenizers), and a
data position that is a pure function of (seed, step) whatever the process split."""

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.config import ConfigError, DataConfig
from engine.data import TextTask, pack, prefetch
from engine.sources import HFTokenizer, write_token_file

DOCS = [f"document {i}: " + "abcdefghij"[: 1 + i % 10] * (3 + i % 7) for i in range(400)]


def byte_stream(docs):
    return b"".join(d.encode() + b"\0" for d in docs)


def test_packing_masks_every_target_across_a_document_boundary():
    eos = 9
    tokens = np.array([1, 2, 3, eos, 4, 5, eos, 6, 7, 8, eos, 1], np.int32)
    batch = pack(tokens, np.array([0, 4]), seq_len=6, eos_id=eos)
    np.testing.assert_array_equal(batch["inputs"][0], [1, 2, 3, eos, 4, 5])
    np.testing.assert_array_equal(batch["targets"][0], [2, 3, eos, 4, 5, eos])
    # Predicting eos (end of this document) is trained; predicting 4 after eos is not.
    np.testing.assert_array_equal(batch["mask"][0], [1, 1, 1, 0, 1, 1])
    np.testing.assert_array_equal(batch["mask"][1], [1, 1, 0, 1, 1, 1])


@pytest.fixture
def token_file(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 1000, rng.integers(5, 60)) for _ in range(3000)]
    return write_token_file(tmp_path / "tokens", docs, eos_id=0, vocab_size=1000), docs


def task_on(source, batch_size=8, seed=0, **data):
    return TextTask(DataConfig(source=str(source), seq_len=16, eval_batches=2, **data),
                    batch_size, seed)  # fmt: skip


def test_token_file_holds_out_its_tail_and_packs_documents(token_file):
    path, docs = token_file
    task = task_on(path)
    stream = np.concatenate([np.append(d, 0) for d in docs])
    assert task.stream.train.dtype == np.uint16 and task.vocab_size == 1000
    np.testing.assert_array_equal(np.concatenate([task.stream.train, task.stream.val]), stream)
    assert len(task.stream.val) == (8 * 2 + 1) * 16 + 1
    batch = task.train_batch(3)
    assert batch["inputs"].shape == (8, 16) and batch["mask"].sum() < batch["mask"].size


def test_data_position_is_a_pure_function_of_seed_and_step_for_any_process_split(token_file):
    task = task_on(token_file[0])
    whole = [task.sample_ids(s, range(8)) for s in range(task.windows // 8 * 2)]
    for processes in (2, 4):  # each process's rows, put together, are the one-process batch
        rows = [range(p * 8 // processes, (p + 1) * 8 // processes) for p in range(processes)]
        for step in (0, 5, 77):
            np.testing.assert_array_equal(
                np.concatenate([task.sample_ids(step, r) for r in rows]), whole[step]
            )
    # One epoch: every window exactly once; the next epoch is a different order.
    per_epoch = task.windows // 8
    epoch = np.concatenate(whole[:per_epoch])
    assert len(set(epoch)) == len(epoch) == per_epoch * 8
    assert not np.array_equal(whole[0], whole[per_epoch])
    # A resumed loader (a new task, started at step 5) reads exactly what the first one would.
    first = list(prefetch(task, range(0, 10), range(2, 6), depth=4))
    resumed = list(prefetch(task_on(token_file[0]), range(5, 10), range(2, 6), depth=2))
    for a, b in zip(first[5:], resumed, strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    np.testing.assert_array_equal(first[3]["inputs"], task.train_batch(3)["inputs"][2:6])
    assert not np.array_equal(task_on(token_file[0], seed=1).sample_ids(0, range(8)), whole[0])


def test_parquet_and_jsonl_shards_tokenize_once_into_the_cache(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    half = len(DOCS) // 2
    for i, docs in enumerate((DOCS[:half], DOCS[half:])):  # a Spark-style output directory
        table = pa.table({"id": range(len(docs)), "text": docs})
        pq.write_table(table, shards / f"part-{i:05d}.snappy.parquet")
    (shards / "_SUCCESS").write_text("")
    cache = tmp_path / "cache"
    task = task_on(shards, cache_dir=str(cache))
    got = np.concatenate([task.stream.train, task.stream.val]).tobytes()
    assert got == byte_stream(DOCS)
    [cached] = cache.glob("*.bin")
    mtime = cached.stat().st_mtime_ns
    task_on(shards, cache_dir=str(cache))
    assert cached.stat().st_mtime_ns == mtime  # found, not rebuilt

    jsonl = tmp_path / "docs.jsonl.gz"
    with gzip.open(jsonl, "wt") as f:
        f.writelines(json.dumps({"body": d}) + "\n" for d in DOCS)
    task = task_on(jsonl, cache_dir=str(cache), text_field="body")
    assert np.concatenate([task.stream.train, task.stream.val]).tobytes() == byte_stream(DOCS)

    with pytest.raises(ConfigError, match="has no column 'body'"):
        task_on(shards, cache_dir=str(tmp_path / "c2"), text_field="body")
    with pytest.raises(ConfigError, match="matches no files"):
        task_on(tmp_path / "nothing-*.parquet", cache_dir=str(cache))


def test_hugging_face_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for d in DOCS for w in d.split()})
    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))

    task = task_on(tmp_path / "docs.jsonl", tokenizer=str(tmp_path / "tokenizer.json"),
                   cache_dir=str(tmp_path / "cache"))  # fmt: skip
    want = np.concatenate([[vocab[w] for w in d.split()] + [1] for d in DOCS])
    np.testing.assert_array_equal(np.concatenate([task.stream.train, task.stream.val]), want)
    assert task.stream.eos_id == 1 and task.vocab_size == len(vocab)

    bare = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    bare.save(str(tmp_path / "bare.json"))
    with pytest.raises(ConfigError, match="pass its id as --data.eos_id"):
        HFTokenizer(str(tmp_path / "bare.json"))
    assert HFTokenizer(str(tmp_path / "bare.json"), eos_id=1).eos_id == 1


def test_remote_sources_through_fsspec(tmp_path, token_file):
    """fsspec's in-memory file system stands in for s3:// or gs://: same code path."""
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    path, docs = token_file
    fs.pipe("/bucket/tokens.bin", path.read_bytes())
    fs.pipe("/bucket/tokens.json", path.with_suffix(".json").read_bytes())
    remote = task_on("memory://bucket/tokens.bin", cache_dir=str(tmp_path / "cache"))
    np.testing.assert_array_equal(
        remote.train_batch(4)["inputs"], task_on(path).train_batch(4)["inputs"]
    )

    for i, part in enumerate((DOCS[:100], DOCS[100:])):
        with fs.open(f"/corpus/part-{i}.parquet", "wb") as f:
            pq.write_table(pa.table({"text": part}), f)
    task = task_on("memory://corpus/part-*.parquet", cache_dir=str(tmp_path / "cache"))
    assert np.concatenate([task.stream.train, task.stream.val]).tobytes() == byte_stream(DOCS)


def test_segment_ids_cut_after_each_end_of_document_token():
    tokens = np.array([5, 6, 0, 7, 0, 0, 8, 9, 3], np.int32)  # 0 ends a document
    batch = pack(tokens, np.array([0]), 8, eos_id=0, segments=True)
    # An end token belongs to the document it closes; an empty document is a segment too.
    assert batch["segments"].tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]
    assert "segments" not in pack(tokens, np.array([0]), 8, eos_id=0)
