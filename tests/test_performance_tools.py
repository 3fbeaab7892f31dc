"""The tools that say where a step's time goes: profiler traces and the MFU sweep."""

import dataclasses
import subprocess
import sys
from types import SimpleNamespace

import jax
from conftest import ROOT, cli_env

from engine.profile import _HOST, _busy_ns, _leaves, _table, latest_trace
from engine.trainer import train


def event(name, start, duration):
    return SimpleNamespace(name=name, start_ns=start, duration_ns=duration)


def test_ops_inside_a_loop_count_and_the_loop_does_not():
    line = SimpleNamespace(
        events=[
            event("while.3", 0, 100),
            event("fusion.1", 10, 30),
            event("ThreadpoolListener::Record", 15, 0),  # a marker, not an op
            event("fusion.2", 50, 40),
            event("copy.7", 120, 10),
        ]
    )
    leaves = _leaves(line)
    assert [e.name for e in leaves] == ["fusion.1", "fusion.2", "copy.7"]
    # Kernels that overlap without nesting (GPU kernels may start early) all count.
    line = SimpleNamespace(
        events=[
            event("gemm.1", 0, 100),
            event("gemm.2", 95, 100),
            event("fusion.3", 190, 20),
            event("copy.4", 200, 5),
        ]
    )
    assert [e.name for e in _leaves(line)] == ["gemm.1", "gemm.2", "copy.4"]
    # A line holding only markers (seen on a loaded CI machine) has no ops, and no error.
    assert _leaves(SimpleNamespace(events=[event("ThreadpoolListener::Record", 5, 0)])) == []
    # Two streams overlapping: busy is the union, not the sum.
    assert _busy_ns([event("a", 0, 50), event("b", 25, 50), event("c", 200, 10)]) == 85


def test_the_host_table_says_eigen_matmuls_are_timed_at_launch_only():
    events = [event("ynn_fusion.3", 0, 4_000_000), event("dot.12", 4_000_000, 200_000)]
    lines = _table(_HOST, events, "trace.pb", steps=1, step_s=0.01, top=5)
    assert lines[2].split()[-1] == "ynn_fusion.3" and lines[3].split()[-1] == "dot.12"
    assert lines[-1].startswith("note: the host's dot thunks (Eigen matmuls) are timed at")
    # A fusion merely named after a dot, or a GPU's kernels, get no note.
    for where, name in ((_HOST, "dot_bitcast_fusion"), ("kernels on /device:GPU:0", "dot.12")):
        lines = _table(where, [event(name, 0, 10)], "trace.pb", steps=1, step_s=0.01, top=5)
        assert not lines[-1].startswith("note:")


def test_training_writes_a_trace_and_says_where_the_time_went(tiny, capsys):
    cfg = tiny(mesh=dict(data=1), steps=5, eval_every=0)
    log = dataclasses.replace(cfg.log, profile_from=3, profile_steps=2)
    train(dataclasses.replace(cfg, log=log), jax.devices()[:1])
    trace = latest_trace(cfg.run_dir)  # where TensorBoard's profile tab looks
    assert trace is not None and trace.endswith(".xplane.pb")
    out = capsys.readouterr()
    lines = (out.out + out.err).splitlines()
    (head,) = [line for line in lines if line.startswith("profile (")]
    assert "2 steps" in head
    busy, step = (float(x) for x in head.split("busy ")[1].split(" ms per step")[0].split(" of "))
    assert 0 < busy <= step
    top = lines[lines.index(head) + 2 :][:3]
    ms = [float(line.split()[0]) for line in top]
    # Sorted by time; ops may overlap (the CPU runs independent ones on several threads).
    assert ms == sorted(ms, reverse=True) and 0 < ms[0] <= busy


def test_mfu_sweep_reports_each_variant_and_survives_a_failing_one(tmp_path):
    command = [sys.executable, "benchmarks/mfu_sweep.py", "--config", "tiny", "--steps", "2",
               "--warmup", "1", "--only", "0,1", "--out", str(tmp_path)]  # fmt: skip
    result = subprocess.run(
        command, cwd=ROOT, env=cli_env(1), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    rows = result.stdout.splitlines()[-2:]
    assert rows[0].split()[:3] == ["0", "as", "configured"]
    assert float(rows[0].split()[3]) > 0  # step ms
    # cuDNN attention needs a GPU: on CPU the variant fails with our one-sentence reason.
    assert rows[1].startswith(" 1 cudnn ") and "runs on NVIDIA GPUs only" in rows[1]
    logged = (tmp_path / "sweep.jsonl").read_text().splitlines()
    assert len(logged) == 2 and '"tokens_per_s"' in logged[0] and '"error"' in logged[1]


def test_layer_loop_benchmark_times_both_settings_and_their_losses_agree(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import layer_loop

    args = ["--config", "tiny", "--rounds", "2", "--steps_per_round", "2", "--warmup", "1"]
    assert layer_loop.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("round ") for line in lines) == 2
    loop, unrolled = lines[-2:]
    assert loop.startswith("--model.scan_unroll=1: median") and "(1.00x)" in loop
    assert unrolled.startswith("--model.scan_unroll=0: median")
    # Same arithmetic: fp32 losses of the timed steps agree (to fusion order: 4.8e-7 on tiny).
    assert loop.endswith("max loss difference 0.0e+00")
    assert float(unrolled.rsplit("max loss difference ", 1)[1]) < 1e-5


def test_block_kernels_benchmark_checks_the_three_forms_agree_before_timing(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import block_kernels

    shapes = ["--batch", "2", "--seq", "16", "--d_model", "32", "--heads", "4", "--d_ff", "64"]
    once = ["--rounds", "1", "--repeats", "1"]
    for dtype, tolerance in (("fp32", 1e-4), ("bf16", 5e-2)):  # bf16: 8 bits of mantissa
        assert block_kernels.main([*shapes, *once, "--dtype", dtype]) == 0
        header, swiglu, attention = capsys.readouterr().out.splitlines()
        assert f"d_ff 64, {dtype} |" in header
        for line in (swiglu, attention):
            assert "engine / einsum" in line and "torch / engine" in line
            assert float(line.rsplit("agree to ", 1)[1]) < tolerance
