"""The command line as a user runs it: files it writes, and one clear sentence per bad input."""

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import cli

from engine.sources import write_token_file

CONTRACT_KEYS = {"step", "loss", "grad_norm", "lr", "step_time_s", "tokens_per_sec", "mfu"}
CONTRACT_KEYS |= {"data_wait_s"}


def tensorboard_scalars(run_dir: Path, tag: str) -> list[float]:
    """Values of `tag` in the run's TensorBoard event file (TFRecord framing, Event protos)."""
    from tensorboardX.proto import event_pb2

    (path,) = run_dir.glob("events.out.tfevents.*")
    data, values, offset = path.read_bytes(), [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
        offset += 12 + length + 4  # length, its crc, the record, its crc
        values += [v.simple_value for v in event.summary.value if v.tag == tag]
    return values


def test_contract_run_writes_metrics_config_and_tensorboard(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "--config",
        "tiny",
        "--mesh.data=2",
        "--mesh.fsdp=2",
        "--mesh.tensor=2",
        "--steps=6",
        "--seed=0",
        "--precision=fp32",
        "--batch_size=16",
        f"--run_dir={run_dir}",
        "--checkpoint.every=0",
        "--eval_every=3",
        f"--compile_cache={tmp_path / 'xla'}",
    ]
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert CONTRACT_KEYS <= r.keys()
        assert isinstance(r["loss"], float) and r["mfu"] is None  # no peak FLOP/s for a CPU
        assert r["peak_memory_gb"] is None  # the CPU backend keeps no count; GPUs/TPUs do
    assert "eval_loss" in records[2] and "eval_bits_per_byte" in records[5]
    assert records[-1]["loss"] < records[0]["loss"]
    config = json.loads((run_dir / "config.json").read_text())
    # The axis sizes, and whether the planner chose them (--mesh.auto, issue 15).
    assert config["mesh"] == {
        "expert": 1,
        "data": 2,
        "fsdp": 2,
        "context": 1,
        "tensor": 2,
        "pipeline": 1,
        "auto": False,
    }
    assert config["steps"] == 6 and config["model"]["d_model"] == 64
    tb_losses = tensorboard_scalars(run_dir, "loss")
    assert tb_losses == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert "step      6 | loss" in result.stderr + result.stdout
    assert re.search(r"step needs \d+\.\d\d [KMG]B/device", result.stdout)  # XLA's memory plan
    assert any((tmp_path / "xla").iterdir())  # compiled programs kept for the next start

    # The resolved config.json reproduces the run exactly.
    again = tmp_path / "again"
    result = cli("--config", str(run_dir / "config.json"), f"--run_dir={again}")
    assert result.returncode == 0, result.stderr
    rerun = [json.loads(line) for line in (again / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rerun] == [r["loss"] for r in records]


def test_corrupt_config_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"steps": 3, "mesh": {"data": ')
    result = cli("--config", str(bad), f"--run_dir={tmp_path}")
    assert result.returncode != 0
    assert f"Config file '{bad}' is not valid JSON/YAML" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mesh.data=3"], "needs 3 devices but the run has 8"),
        (["--mesh.data=0"], "--mesh.data=0 is not a valid mesh size"),
        (["--mesh.data=-2"], "--mesh.data=-2 is not a valid mesh size"),
        (["--mesh.data=-1", "--mesh.fsdp=-1"], "Only one mesh axis may be -1"),
        (["--mesh.data=1", "--mesh.tensor=8"], "'kv_heads', size 4) is not divisible by"),
        (["--mesh.dta=2"], "--mesh.dta"),
        (["--steps=many"], "many"),
        (["--precision=fp8"], "fp8"),
        (["--config", "huge"], "Unknown preset 'huge'"),
        (["--config", "missing.yaml"], "Config file 'missing.yaml' does not exist"),
        (["--batch_size=12"], "--batch_size=12 does not split into 8 data-parallel shards"),
        (["--optim.microbatches=3"], "into 3 accumulation steps (--optim.microbatches=3)"),
        (["--steps=0"], "--steps=0 must be positive"),
        (["--checkpoint.keep=-1"], "--checkpoint.keep=-1 must not be negative"),
        (["--nan_policy=ignore"], "ignore"),
        (["--mesh.data=1", "--mesh.pipeline=8"], "2 layers do not split into --mesh.pipeline=8"),
        (
            ["--mesh.data=4", "--mesh.pipeline=2", "--model.n_layers=4", "--pipeline.repeats=4"],
            "4 layers do not split into --mesh.pipeline=2 stages x --pipeline.repeats=4",
        ),
        (
            ["--mesh.data=4", "--mesh.pipeline=2", "--pipeline.microbatches=1"],
            "--pipeline.microbatches=1 is fewer than the 2 stages",
        ),
        (
            [
                "--mesh.data=2",
                "--mesh.pipeline=4",
                "--model.n_layers=4",
                "--pipeline.microbatches=6",
            ],
            "--pipeline.microbatches=6 is not a multiple of --mesh.pipeline=4",
        ),
        (
            ["--mesh.data=4", "--mesh.pipeline=2", "--pipeline.microbatches=8"],
            "into 8 pipeline microbatches (--pipeline.microbatches=8) x 4 data-parallel shards",
        ),
        (["--pipeline.repeats=0"], "--pipeline.repeats=0 must be positive"),
        (["--config", "digits", "--mesh.pipeline=2"], "--task=digits has none to split"),
        (["--data.source=/nowhere/part-*.parquet"], "matches no files; check the path or glob"),
        (["--data.source=notes.txt"], "is not 'embedded', a token file (.bin), or Parquet/JSONL"),
        (["--data.prefetch=-1"], "--data.prefetch=-1 must not be negative"),
        (["--model.attention=cudnn"], "--model.attention=cudnn runs on NVIDIA GPUs only"),
        (["--model.loss_chunks=3"], "--model.loss_chunks=3 does not divide --data.seq_len=64"),
        (["--distributed.num_processes=2"], "A multi-process run needs all of"),
        (["--data.source=tests/vocab1000.bin"], "has 1000 token ids but --model.vocab_size=256"),
    ],
)
def test_bad_input_is_one_clear_error(args, message, tmp_path):
    if args[0] == "--data.source=tests/vocab1000.bin":  # a token file the model cannot embed
        docs = [np.arange(1, 1000)] * 20
        args = [f"--data.source={write_token_file(tmp_path / 'vocab1000', docs, 0, 1000)}"]
    base = ["--config", "tiny", f"--run_dir={tmp_path}", "--steps=1"]
    if args[0] == "--config":
        base = base[2:]
    result = cli(*base, *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
