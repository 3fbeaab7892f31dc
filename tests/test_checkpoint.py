"""Checkpoints through the command line, as a user meets them: kill -9 and resume, SIGTERM,
another mesh, a corrupt newest checkpoint, NaN policies, fine-tuning from another run; and
through the library, restoring after the step has donated the state."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import ROOT, cli, tiny_config

from engine.checkpoint import Checkpoints
from engine.setup import setup

RUN = ["--config", "tiny", "--steps=12", "--checkpoint.every=3", "--eval_every=0"]


def run(run_dir, *args):
    return cli(*RUN, f"--run_dir={run_dir}", *args)


def start(run_dir, *args):
    return cli(*RUN, f"--run_dir={run_dir}", *args, background=True)


def records(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def wait_for_step(run_dir, step: int, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r["step"] >= step for r in records(run_dir)):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise TimeoutError(f"no step {step} in {run_dir}")


def losses(run_dir) -> dict[int, float]:
    rs = records(run_dir)
    steps = [r["step"] for r in rs]
    assert len(steps) == len(set(steps)), f"a step appears twice: {steps}"
    return {r["step"]: r["loss"] for r in rs}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    result = run(run_dir)
    assert result.returncode == 0, result.stderr
    return run_dir


def killed_at_step_7(run_dir):
    proc = start(run_dir)
    wait_for_step(run_dir, 7, proc)
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.wait()
    assert 6 <= max(losses(run_dir)) < 12


def test_kill_9_then_same_command_resumes_bitwise(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    killed_at_step_7(run_dir)
    result = run(run_dir)
    assert result.returncode == 0, result.stderr
    assert "resumed from step" in result.stdout + result.stderr
    assert losses(run_dir) == losses(uninterrupted)  # every step once, bit for bit


@pytest.mark.parametrize(
    "mesh",
    [["--mesh.data=2", "--mesh.fsdp=2", "--mesh.tensor=2"], ["--mesh.data=4", "--mesh.pipeline=2"]],
    ids=["fsdp-tensor", "pipeline"],
)
def test_resume_on_another_mesh(tmp_path, uninterrupted, mesh):
    run_dir = tmp_path / "run"
    killed_at_step_7(run_dir)
    result = run(run_dir, *mesh)
    assert result.returncode == 0, result.stderr
    got, want = losses(run_dir), losses(uninterrupted)
    assert got.keys() == want.keys()
    np.testing.assert_allclose(list(got.values()), list(want.values()), rtol=1e-5)


def test_sigterm_finishes_the_step_saves_and_exits_0(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir, "--steps=10000", "--checkpoint.every=1000")
    wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    last = max(losses(run_dir))
    assert f"SIGTERM: stopped after step {last}, checkpoint saved" in out + err
    assert (run_dir / "checkpoints" / str(last) / "commit_success.txt").exists()


def test_corrupt_newest_checkpoint_falls_back_and_keeps_the_older(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    ckpts = run_dir / "checkpoints"
    assert sorted(int(p.name) for p in ckpts.iterdir()) == [6, 9, 12]  # keep=3
    for f in (ckpts / "12" / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0garbage" * 8)
    older = sorted(f.read_bytes() for f in (ckpts / "9").rglob("*") if f.is_file())
    result = run(run_dir)
    assert result.returncode == 0, result.stderr
    assert f"checkpoint {ckpts / '12'} could not be read" in result.stderr
    assert "resumed from step 9" in result.stdout + result.stderr
    assert losses(run_dir) == losses(uninterrupted)
    assert older == sorted(f.read_bytes() for f in (ckpts / "9").rglob("*") if f.is_file())
    assert list(ckpts.glob("12.unreadable-*"))  # set aside, not deleted


def test_nan_skip_drops_the_update_and_halt_keeps_the_last_good_checkpoint(tmp_path):
    skip = run(tmp_path / "skip", "--nan_policy=skip", "--debug.nan_steps", "4")
    assert skip.returncode == 0, skip.stderr
    rs = {r["step"]: r for r in records(tmp_path / "skip")}
    assert rs[4]["skipped"] == 1 and rs[4]["loss"] is None and rs[5]["skipped"] == 0
    assert all(np.isfinite(rs[s]["loss"]) for s in range(5, 13))
    assert "step 4: loss nan" in skip.stdout + skip.stderr

    limit = run(
        tmp_path / "limit", "--nan_policy=skip", "--nan_skip_limit=2", "--debug.nan_steps", "4", "5"
    )
    assert limit.returncode == 3 and "2 non-finite steps in a row" in limit.stderr

    halt = run(tmp_path / "halt", "--debug.nan_steps", "5")
    assert halt.returncode == 3
    assert "step 5: loss nan" in halt.stderr and "the last good checkpoint is step 3" in halt.stderr
    assert "Traceback" not in halt.stderr
    assert sorted(p.name for p in (tmp_path / "halt" / "checkpoints").iterdir()) == ["3"]


def export(source, out):
    command = [sys.executable, "-m", "engine.checkpoint", "export", str(source), str(out)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_init_from_another_run_or_its_params_export(tmp_path, uninterrupted):
    fresh = losses(uninterrupted)
    result = run(tmp_path / "tuned", f"--init_from={uninterrupted}", "--steps=2")
    assert result.returncode == 0, result.stderr
    tuned = losses(tmp_path / "tuned")
    assert sorted(tuned) == [1, 2]  # a new run: step 0, fresh optimizer
    assert tuned[1] < fresh[1] - 0.3  # but trained weights

    bad = run(tmp_path / "bad", f"--init_from={tmp_path}")
    assert bad.returncode == 2 and "is not a run directory, a checkpoint" in bad.stderr

    # Params-only export: a bitwise copy of the newest params, with a config that has no run_dir.
    out = tmp_path / "export"
    done = export(uninterrupted, out)
    assert done.returncode == 0, done.stderr
    files = lambda d: {f.relative_to(d): f.read_bytes() for f in d.rglob("*") if f.is_file()}  # noqa: E731
    assert files(out / "params") == files(uninterrupted / "checkpoints" / "12" / "params")
    assert "run_dir" not in json.loads((out / "config.json").read_text())
    again = export(uninterrupted, out)
    assert again.returncode == 2 and "exists and is not empty" in again.stderr  # never overwrites

    mesh = ["--mesh.data=2", "--mesh.fsdp=2", "--mesh.tensor=2"]
    config = ["--config", str(out / "config.json"), f"--run_dir={tmp_path / 'from_export'}"]
    from_export = cli(*config, f"--init_from={out}", "--steps=1", *mesh)
    assert from_export.returncode == 0, from_export.stderr
    np.testing.assert_allclose(losses(tmp_path / "from_export")[1], tuned[1], rtol=1e-5)


@pytest.mark.parametrize("compress", [True, False], ids=["zstd", "uncompressed"])
def test_restore_after_donating_steps_trains_on_bitwise(tmp_path, compress):
    """Checkpoints kept by a loop that has since donated its state (as the step does) restore
    a state that trains on, exactly as the uninterrupted state does; both compress settings.
    The save compiles nothing: in one process orbax's replica-parallel writes compiled a slice
    per replica and shape, which blocked the loop's first save for seconds."""
    mesh = {"data": 2, "fsdp": 4}  # each shard on two devices: replicas to write once
    cfg = tiny_config(tmp_path / "run", mesh=mesh).replace(checkpoint={"compress": compress})
    run = setup(cfg)
    ckpt = Checkpoints(run)

    def step(state, i):
        return run.train_step(state, run.put_batch(run.task.train_batch(i)))

    state, _ = step(run.state, 0)  # donates the initial state, hyperparams included
    compiles = []

    def count(event, seconds, **kwargs):  # any stage, so a persistent-cache hit counts too
        compiles.extend([event] if event.startswith("/jax/core/compile/") else [])

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        ckpt.save(1, state)
        ckpt.wait()
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert compiles == []
    restored = ckpt.restore_latest()
    want, _ = step(state, 1)
    got, _ = step(restored.state, 1)
    ckpt.close()
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    files = [f for f in (tmp_path / "run" / "checkpoints" / "1").rglob("*") if f.is_file()]
    assert files and restored.step == 1
