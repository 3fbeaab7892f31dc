"""Several processes on JAX's distributed runtime, through the command line: the same losses as
one process, a resume on another process count, and survivors that stop when a peer dies."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, cli, cli_env

from engine.launch import free_port

# fsdp spans both processes (weights gathered across them), tensor stays inside each.
RUN = ["--config", "tiny", "--eval_every=0", "--mesh.data=1", "--mesh.fsdp=4", "--mesh.tensor=2"]
# Long enough (~3 s of steps) that the SIGTERM sent after step 4 lands before the run ends.
STEPS = 100


def losses(run_dir) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one") / "run"
    result = cli(*RUN, f"--steps={STEPS}", f"--run_dir={run_dir}")
    assert result.returncode == 0, result.stderr
    return losses(run_dir)


def test_two_processes_match_one_sigterm_saves_and_resume_on_one(tmp_path, one_process):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "engine.launch", "--processes=2", "--", *RUN,
               f"--steps={STEPS}", "--checkpoint.every=1000", f"--run_dir={run_dir}"]  # fmt: skip
    two = subprocess.Popen(command, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for_records(run_dir, 4, [two])
    two.send_signal(signal.SIGTERM)  # passed on to both: they agree on a step, save, exit 0
    out, err = two.communicate(timeout=300)
    assert two.returncode == 0, err[-3000:]
    assert "2 processes" in out and "preemption: stopped after step" in out
    got = losses(run_dir)
    stopped = max(got)
    assert sorted(got) == list(range(1, stopped + 1)) and stopped < STEPS  # process 0 alone wrote
    np.testing.assert_allclose([got[s] for s in got], [one_process[s] for s in got], rtol=1e-5)
    assert (run_dir / "checkpoints" / str(stopped) / "commit_success.txt").exists()

    # The process count changes (2 -> 1): same data position, same losses.
    one = cli(*RUN, f"--steps={STEPS}", f"--run_dir={run_dir}")
    assert one.returncode == 0, one.stderr
    assert f"resumed from step {stopped}" in one.stdout + one.stderr
    got = losses(run_dir)
    every = range(1, STEPS + 1)
    np.testing.assert_allclose([got[s] for s in every], [one_process[s] for s in every], rtol=1e-5)


def wait_for_records(run_dir, count, procs, timeout=300):
    metrics, deadline = run_dir / "metrics.jsonl", time.time() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= count):
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.1)


def test_a_dead_peer_stops_the_other_process_within_the_heartbeat_bound(tmp_path):
    run_dir, port = tmp_path / "run", free_port()
    env = dict(cli_env(devices=4), JAX_PLATFORMS="cpu")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "engine.train",
                *RUN,
                "--steps=100000",
                f"--run_dir={run_dir}",
                f"--distributed.coordinator_address=localhost:{port}",
                "--distributed.num_processes=2",
                f"--distributed.process_id={rank}",
                "--distributed.heartbeat_timeout_s=10",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in range(2)
    ]
    wait_for_records(run_dir, 2, procs)
    procs[1].kill()
    killed = time.time()
    _, err = procs[0].communicate(timeout=120)
    assert procs[0].returncode != 0
    assert time.time() - killed < 30  # heartbeat 10 s, plus slack for a loaded CI machine
    assert "Another process probably failed or lost contact" in err or "another task died" in err


def test_experts_split_across_two_processes_train_like_one(tmp_path):
    """The expert axis spans both processes: tokens cross them by all-to-all (gloo)."""
    run = ["--config", "tiny", "--eval_every=0", "--model.moe.experts=8", "--model.moe.d_ff=64",
           "--mesh.data=2", "--mesh.expert=4", "--steps=4"]  # fmt: skip
    one = cli(*run, f"--run_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "engine.launch", "--processes=2", "--", *run,
         f"--run_dir={tmp_path / 'two'}"],
        cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes" in two.stdout
    want, got = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(got) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=1e-5)
