"""What a new user meets (issue 14): no traceback, no wrong number, no lost work. Each test runs
the command line as the README shows it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, cli, cli_env

from engine.config import ConfigError, DataConfig
from engine.sources import token_stream, write_token_file

TINY = ["--config", "tiny", "--steps=2", "--eval_every=0"]


def module(*args, devices=8):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=cli_env(devices),
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run as a newcomer starts it: no checkpoint flags at all."""
    run_dir = tmp_path_factory.mktemp("newcomer") / "run"
    result = cli(*TINY, f"--run_dir={run_dir}")
    assert result.returncode == 0, result.stderr
    return run_dir, result


def test_a_run_keeps_its_final_state_and_says_where(trained):
    run_dir, result = trained
    assert (run_dir / "checkpoints" / "2" / "params").is_dir()  # every=0, yet not lost
    out = result.stdout + result.stderr
    assert "done: 2 steps in" in out and str(run_dir / "metrics.jsonl") in out
    assert str(run_dir / "checkpoints" / "2") in out


def test_opting_out_keeps_nothing_and_export_names_the_real_cause(tmp_path):
    run_dir = tmp_path / "run"
    result = cli(*TINY, f"--run_dir={run_dir}", "--checkpoint.final=False")
    assert result.returncode == 0 and not (run_dir / "checkpoints").exists()
    assert "no checkpoint kept (--checkpoint.final=False)" in result.stdout + result.stderr
    export = module("engine.hf", "export", str(run_dir), str(tmp_path / "out"))
    assert export.returncode == 2
    assert "is a run directory without a checkpoint" in export.stderr
    assert "--init_from" not in export.stderr
    # Running again into it says that metrics.jsonl is replaced.
    again = cli(*TINY, f"--run_dir={run_dir}", "--checkpoint.final=False")
    assert "warning: replacing" in again.stdout + again.stderr


def test_generate_refuses_bad_prompts_in_one_sentence(trained, tmp_path):
    run_dir, _ = trained
    cases = [
        (["--prompt_ids=2024"], "token id 2024, outside the model's vocabulary of 256 ids"),
        (["--prompt="], "The prompt is empty"),
        (["--prompt_ids=1,x"], "is not a comma-separated list of token ids"),
    ]
    for args, message in cases:
        done = module("engine.generate", f"--run_dir={run_dir}", *args, "--max_new_tokens=2")
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    ok = module("engine.generate", f"--run_dir={run_dir}", "--prompt=def ", "--max_new_tokens=3")
    assert ok.returncode == 0, ok.stderr
    hf_dir = tmp_path / "hf"
    assert module("engine.hf", "export", str(run_dir), str(hf_dir)).returncode == 0
    text = module("engine.generate", f"--hf_dir={hf_dir}", "--prompt=The capital")
    assert text.returncode == 2 and "has no tokenizer to encode it" in text.stderr
    assert "--prompt_ids" in text.stderr
    help_text = module("engine.generate", "--help").stdout
    assert '--prompt "def main("\n' in help_text  # one example a line, not run together


def test_hf_export_refuses_a_non_empty_directory(trained, tmp_path):
    run_dir, _ = trained
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    done = module("engine.hf", "export", str(run_dir), str(out))
    assert done.returncode == 2 and "exists and is not empty" in done.stderr
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_another_axis_takes_over_the_fill_and_cpu_users_learn_about_virtual_devices(tmp_path):
    done = cli(*TINY, f"--run_dir={tmp_path / 'a'}", "--mesh.fsdp=-1")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "a/config.json").read_text())["mesh"]["data"] == 1
    assert "fsdp=8" in done.stdout
    big = cli(*TINY, f"--run_dir={tmp_path / 'b'}", "--mesh.data=16")
    assert big.returncode == 2
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=N" in big.stderr


def test_config_files_layer_on_a_preset_and_typos_name_the_file(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("optim:\n  lr: 0.01\nsteps: 2\n")
    done = cli("--config", "tiny", "--config", str(mine), f"--run_dir={tmp_path / 'r'}",
               "--eval_every=0")  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "r/config.json").read_text())
    assert config["optim"]["lr"] == 0.01 and config["model"]["d_model"] == 64  # tiny's
    typo = tmp_path / "typo.yaml"
    typo.write_text("optim:\n  lrr: 0.01\n")
    bad = cli("--config", "tiny", "--config", str(typo), f"--run_dir={tmp_path / 't'}")
    assert bad.returncode == 2
    assert f"Config file '{typo}' has an unknown key 'optim.lrr'; did you mean 'optim.lr'?" in (
        bad.stderr
    )


def test_token_files_take_str_paths_and_a_missing_one_is_named(tmp_path):
    path = write_token_file(str(tmp_path / "tok"), [np.arange(1, 9)] * 400, 0, 256)
    assert path.exists()
    with pytest.raises(ConfigError, match="missing.bin does not exist"):
        token_stream(DataConfig(source=str(tmp_path / "missing.bin")), 100)


def test_the_token_cache_follows_the_content(tmp_path):
    """An edit that keeps the size and modification time is still seen."""
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": "a" * 3000}) + "\n" for _ in range(40)))
    cfg = DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"))
    first = np.asarray(token_stream(cfg, 100).train[:10]).copy()
    stat = source.stat()
    source.write_text(source.read_text().replace("a", "b"))
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert source.stat().st_size == stat.st_size
    second = np.asarray(token_stream(cfg, 100).train[:10])
    assert first[0] == ord("a") and second[0] == ord("b")
    # A failed tokenization leaves no partial file behind.
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": ' + "\n")
    with pytest.raises(Exception):  # noqa: B017 (the reader's own error)
        token_stream(DataConfig(source=str(broken), cache_dir=str(tmp_path / "cache")), 100)
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_labels_units_and_warnings(tmp_path):
    tiny = cli(*TINY, f"--run_dir={tmp_path / 't'}", "--log.progress_every_s=0")
    out = tiny.stdout + tiny.stderr
    assert "warning: --optim.warmup_steps=50 is not below --steps=2" in tiny.stderr
    assert " KB/device" in out or " MB/device" in out  # not '0.00 GB'
    assert "step 1/2 | loss" in out  # no terminal: progress lines instead of a bar
    digits = cli("--config", "digits", "--steps=2", f"--run_dir={tmp_path / 'd'}", "--eval_every=0")
    assert digits.returncode == 0, digits.stderr
    assert "examples/s" in digits.stdout + digits.stderr
    assert " tok/s" not in digits.stdout + digits.stderr
    classifier = module("engine.generate", f"--run_dir={tmp_path / 'd'}", "--prompt=hi")
    assert classifier.returncode == 2
    assert "holds a --task=digits model, which does not generate text" in classifier.stderr
    usage = cli("--nonsense")
    assert "run python -m engine.train --help" in usage.stderr  # not a file path


def test_launch_output_is_quiet_marked_and_splits_devices_evenly(tmp_path):
    run_dir = tmp_path / "run"
    done = module("engine.launch", "--processes=2", "--", *TINY, "--mesh.data=8",
                  f"--run_dir={run_dir}")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "[Gloo]" not in done.stdout + done.stderr  # one line per peer pair, before
    assert "2 processes" in done.stdout and "done: 2 steps" in done.stdout
    marked = [line for line in done.stderr.splitlines() if line.startswith("warning")]
    assert not marked  # every process's stderr line carries its process
    uneven = module("engine.launch", "--processes=3", "--", *TINY)
    assert uneven.returncode == 2
    assert "--processes=3 does not split the 8 default virtual devices evenly" in uneven.stderr


def test_gloos_connection_chatter_is_dropped_even_when_threads_interleave_it():
    from engine.launch import _is_noise

    gloo = (
        "[Gloo] Rank 1 is connected to 7 peer ranks. Expected number of connected peer ranks is : 7"
    )
    seen = [  # as several threads of one process printed it into one pipe (jax 0.10)
        "[Gloo] Rank 3 is connected to 7 peer ranks. Expected number of connected peer ranks "
        "is : [Gloo] Rank 2 is connected to 77",
        "[Gloo] Rank 0[Gloo] Rank  is connected to 3 peer ranks. Expected number of connected "
        "peer ranks is : 3",
        "7",
        "peer ranks. Expected number of connected peer ranks is : 7",
    ]
    assert all(_is_noise(line + "\n") for line in [gloo, gloo[:20], *seen])
    kept = ["step      2 | loss 5.5786", "launch: 2 processes x 4 CPU devices", "",
            "[Gloo] Rank 1 failed: connection refused", "error: peer 1 is gone"]  # fmt: skip
    assert not any(_is_noise(line) for line in kept)


def test_launch_keeps_the_users_xla_flags_and_sets_only_the_device_count():
    from engine.launch import _with_device_count

    flags = "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8"
    assert _with_device_count(flags, 4).split() == [
        "--xla_dump_to=/tmp/x", "--xla_force_host_platform_device_count=4"
    ]  # fmt: skip
    assert _with_device_count("", 2) == "--xla_force_host_platform_device_count=2"


def test_the_compile_cache_defaults_to_jaxs_own_variable_when_set(monkeypatch):
    from engine.config import Config

    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    assert Config().compile_cache_dir() == os.path.expanduser("~/.cache/shardtrain/xla")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/tmp/jax-cache")
    assert Config().compile_cache_dir() == "/tmp/jax-cache"
    assert Config(compile_cache="/tmp/mine").compile_cache_dir() == "/tmp/mine"  # given wins
    assert Config(compile_cache="").compile_cache_dir() is None
