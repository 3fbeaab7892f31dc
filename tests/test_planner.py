"""The planner: what it prints trains, its memory figures match XLA's, a tight budget moves it to a
sharded plan, --mesh.auto keeps what the user fixed, and bad input gets one sentence."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from conftest import cli, tiny_config

from engine.autoplan import auto_plan, no_plan_error, plan_search, target_for, to_plan, workload
from engine.config import PRESETS, ConfigError, explicit_keys, parse_args
from engine.estimate import compile_abstract, memory
from engine.family import model_arch
from engine.plan import Plan, apply_plan, violations
from engine.plan_main import _confirm
from engine.trainer import train
from sharding.planner import Candidate, estimate, factorizations

CPU8 = None


def cpu8():
    global CPU8
    CPU8 = CPU8 or target_for("cpu", 8)
    return CPU8


@pytest.fixture(scope="module")
def tiny_plans():
    return plan_search(PRESETS["tiny"], cpu8(), platform="cpu")


def test_factorizations_cover_every_mesh():
    assert sorted(factorizations(8, 2)) == [(1, 8), (2, 4), (4, 2), (8, 1)]
    assert len(factorizations(64, 4)) == 84  # C(6 + 3, 3): 2^6 over 4 axes


def test_every_plan_passes_training_validation_and_its_flags_parse_back(tiny_plans):
    fits, rejected = tiny_plans
    assert fits and rejected
    cfg = PRESETS["tiny"]
    for plan, _ in fits:
        assert violations(apply_plan(cfg, plan), plan, 8, "cpu") == [], plan
    for plan, _ in fits[:10]:  # what the table prints: its flags give the same plan
        again = parse_args(["--config", "tiny", *plan.flags()])
        assert Plan.from_config(again) == plan
    # A rejected plan says why, in training's own words or as the memory it lacks.
    reasons = {r for _, e in rejected for r in e.problems}
    assert any("do not split into --mesh.pipeline" in r for r in reasons)


def test_first_choice_trains_on_8_cpu_devices(tmp_path, tiny_plans):
    plan, est = tiny_plans[0][0]
    cfg = apply_plan(tiny_config(tmp_path, steps=3), plan)
    records = train(cfg, plan=plan)
    assert len(records) == 3 and all(np.isfinite(r["loss"]) for r in records)


@pytest.mark.parametrize(
    "preset, mesh, remat, precision, unroll",
    [
        ("tiny", {"data": 8}, "none", "fp32", 1),
        ("tiny", {"fsdp": 4, "tensor": 2}, "full", "fp32", 1),
        ("default", {"data": 2, "fsdp": 4}, "dots_no_batch", "fp32", 1),
        ("default", {"fsdp": 8}, "none", "bf16", 1),
        # The planner runs remat plans as the loop whatever the preset; `default` unrolls.
        ("default", {"data": 2, "fsdp": 4}, "dots_no_batch", "fp32", 0),
        ("default", {"data": 8}, "none", "fp32", 0),
    ],
)
def test_memory_prediction_within_10_percent_of_xla(preset, mesh, remat, precision, unroll):
    cfg = PRESETS[preset].replace(
        precision=precision, model={"remat": remat, "scan_unroll": unroll}
    )
    base = Plan.from_config(cfg)
    c = Candidate({a.name: mesh.get(a.name, 1) for a in base.axes}, remat)
    plan = to_plan(c, base)
    cfg = apply_plan(cfg, plan)
    run = compile_abstract(cfg, plan)
    assert run.eval_step is None  # an estimate compiles the train step alone
    xla = memory(run).total_gb
    predicted = estimate(workload(cfg, plan), c, cpu8(), plan.rules, precision).memory_gb
    error = predicted["total"] / xla - 1
    if plan.scan_unroll != 1:
        # The estimate is the loop's; unrolled without remat XLA keeps 16-23 % less (no
        # stacked residual buffers): the prediction must stay on the safe side.
        assert 0 <= error < 0.3, (predicted, xla)
    elif precision == "bf16" and tuple(map(int, jax.__version__.split(".")[:2])) >= (0, 11):
        # The fit is jax 0.10's; jax 0.11's CPU plan for bf16 steps is 10-25 % smaller still
        # (benchmarks/RESULTS.md): the prediction must at least stay on the safe side.
        assert 0 <= error < 0.25, (predicted, xla)
    else:
        assert abs(error) < 0.10, (predicted, xla)


def test_a_budget_data8_cannot_meet_moves_the_planner_to_a_sharded_plan_that_runs(tmp_path):
    cfg = tiny_config(tmp_path, steps=2)
    fits, _ = plan_search(cfg, cpu8(), platform="cpu")
    replicated = min(e.memory_gb["total"] for p, e in fits if p.mesh["data"] == 8)
    budget = replicated * 0.9
    tight = dataclasses.replace(cpu8(), memory_gb=budget)
    fits, rejected = plan_search(cfg, tight, platform="cpu")
    plan, est = fits[0]
    assert plan.mesh["data"] < 8 and est.memory_gb["total"] <= budget
    assert any(e.candidate.mesh["data"] == 8 and e.problems[0].startswith("over memory")
               for _, e in rejected)  # fmt: skip
    run_cfg = apply_plan(cfg, plan)
    assert memory(compile_abstract(run_cfg, plan)).total_gb < budget * 1.1
    assert len(train(run_cfg, plan=plan)) == 2


def test_mesh_auto_keeps_what_the_user_fixed(tmp_path):
    argv = ["--config", "tiny", "--mesh.auto", "--mesh.tensor=2", "--model.remat=full"]
    assert {"mesh.auto", "mesh.tensor", "model.remat"} <= explicit_keys(argv)
    assert "mesh.data" not in explicit_keys(argv)  # the preset's value is not a choice
    cfg, plan, *_ = auto_plan(parse_args(argv), jax.devices(), explicit_keys(argv))
    assert plan.mesh["tensor"] == 2 and plan.remat == "full" and cfg.model.remat == "full"

    run_dir = tmp_path / "run"
    result = cli(*argv, "--steps=2", f"--run_dir={run_dir}")
    assert result.returncode == 0, result.stderr
    assert "--mesh.auto chose" in result.stdout and "tensor=2" in result.stdout
    recorded = json.loads((run_dir / "config.json").read_text())
    assert recorded["mesh"]["tensor"] == 2 and recorded["model"]["remat"] == "full"
    assert np.prod([v for k, v in recorded["mesh"].items() if k != "auto"]) == 8


def test_fixed_keys_that_leave_no_plan_are_one_sentence():
    argv = ["--config", "tiny", "--mesh.auto", "--mesh.tensor=3"]
    with pytest.raises(ConfigError, match="with tensor=3 fixed"):
        auto_plan(parse_args(argv), jax.devices(), explicit_keys(argv))
    # 7 devices: no axis can take 7 (16 sequences, 8 heads, 64 wide, 2 layers).
    seven = target_for("h100", 7)
    fits, rejected = plan_search(PRESETS["tiny"], seven)
    message = str(no_plan_error(PRESETS["tiny"], seven, rejected, {}))
    assert not fits and message.startswith("No plan over 7 devices passes training's checks")


def test_plan_command_line_and_its_errors():
    run = ["--config", "tiny", "--target.devices", "8"]
    out = cli(*run, "--target.kind", "cpu", "--confirm", "1", "--json", module="engine.plan")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["plans"][0]["rank"] == 1 and report["confirmed"][0]["xla_gb"] > 0
    assert abs(report["confirmed"][0]["error"]) < 0.10

    bad = cli(*run, "--target.kind", "h900", module="engine.plan")
    assert bad.returncode == 2 and "--target.kind=h900 is not in the device table" in bad.stderr
    assert "Traceback" not in bad.stderr
    small = cli(*run, "--target.kind", "h100", "--target.memory_gb", "1e-6", module="engine.plan")
    assert small.returncode == 2 and "No plan fits" in small.stderr
    assert "--model.remat=full" in small.stderr and "Traceback" not in small.stderr


def test_the_confirmation_holds_a_cudnn_plan_to_the_einsums_it_compiles():
    """cuDNN's kernel compiles on GPUs only, so `--confirm` compiles a cuDNN plan's einsums on
    the CPU: its prediction must count their residuals, not the kernel's (it did: -69 % here)."""
    cfg = PRESETS["tiny"].replace(data={"seq_len": 512}, precision="bf16")
    target = target_for("h100", 8)
    fits, _ = plan_search(cfg, target, platform="gpu")
    (plan, est), *_ = fits
    assert plan.attention == "cudnn"
    (confirmed,) = _confirm(cfg, [(plan, est)], target)
    assert confirmed["attention"] == "cudnn" and abs(confirmed["error"]) < 0.10, confirmed
    assert confirmed["predicted_cpu_gb"] > 2 * confirmed["predicted_gb"]  # [T, T] scores


def _layer_bytes(preset: str, seq_len: int, attention: str) -> dict:
    cfg = PRESETS[preset].replace(data={"seq_len": seq_len}, precision="bf16")
    return workload(cfg, dataclasses.replace(Plan.from_config(cfg), attention=attention))


def test_a_fused_attention_kernel_is_counted_as_keeping_no_scores():
    """On any machine the planner counts cuDNN's residuals (q, k, v, output, statistics) with
    its shape twin: per token they do not grow with the sequence, where the einsums' scores
    do; and without batch dots, remat=dots keeps what dots_no_batch keeps."""
    fused = [_layer_bytes("tiny", t, "cudnn") for t in (128, 256)]
    einsums = [_layer_bytes("tiny", t, "xla") for t in (128, 256)]
    for remat in ("none", "dots_no_batch", "dots", "full"):
        assert fused[0].layer_bytes[remat] == fused[1].layer_bytes[remat], remat
    assert sum(einsums[1].layer_bytes["none"]) > sum(einsums[0].layer_bytes["none"])
    assert fused[1].layer_bytes["dots"] == fused[1].layer_bytes["dots_no_batch"]
    assert not fused[0].batch_dots and einsums[0].batch_dots
    keeps = {r: sum(fused[0].layer_bytes[r]) for r in ("none", "dots_no_batch", "full")}
    assert keeps["none"] > keeps["dots_no_batch"] > keeps["full"] > 0


def test_the_gpu_estimate_against_the_h100_measurements():
    """`1b` on one H100 (benchmarks/RESULTS.md, 2026-11-26 and 11-27): XLA planned 42.4 GB for
    dots_no_batch and 32.0 GB for dots with 2 accumulation steps and 4 loss chunks (the same
    program as dots_no_batch under cuDNN). The estimate stays on the safe side of both, within
    30 % (it was 35 % and 85 % over when it counted the einsums' residuals; dots_no_batch has
    kept cuDNN's output since, about 1.1 GB more); dots is not searched; chunks pay their
    recomputed logits."""
    h100 = target_for("h100", 1)
    fits, rejected = plan_search(PRESETS["1b"], h100)
    found = {e.candidate.describe(): e for _, e in fits + rejected}
    assert not any("remat=dots " in d + " " for d in found)
    for plan, measured in (("remat=dots_no_batch", 42.4), ("remat=dots_no_batch accum=2 chunks=4",
                                                             32.0)):  # fmt: skip
        predicted = found[f"1 device {plan}"].memory_gb["total"]
        assert measured <= predicted < 1.3 * measured, (plan, predicted)
    one, four = (found[f"1 device remat=none accum=2{c}"].times_s["compute"]
                 for c in ("", " chunks=4"))  # fmt: skip
    cfg, arch = PRESETS["1b"], model_arch(PRESETS["1b"])
    logits_flops = 2 * arch.d_model * arch.vocab_size * cfg.batch_size * cfg.data.seq_len
    speed = h100.device.flops("bf16") * h100.device.matmul_efficiency
    assert four - one == pytest.approx(logits_flops / speed, rel=1e-6)
    assert all(p.scan_unroll == 0 for p, _ in fits)  # the preset's unrolled layers, on a GPU


def test_mesh_auto_keeps_the_configured_plan_within_the_estimates_error(tiny_plans):
    from engine.autoplan import KEEP_CONFIGURED, _configured_first

    fits, _ = tiny_plans
    fastest = fits[0][1].times_s["step"]
    near = next(e for _, e in fits[1:] if e.times_s["step"] <= fastest * (1 + KEEP_CONFIGURED))
    far = next(e for _, e in fits if e.times_s["step"] > fastest * (1 + KEEP_CONFIGURED))
    base = Plan.from_config(PRESETS["tiny"]).on(PRESETS["tiny"], "cpu")  # as auto_plan has it
    for e, kept in ((near, True), (far, False)):
        configured = to_plan(e.candidate, base)
        first = _configured_first(fits, configured, 8)[0][1]
        assert (first.candidate == e.candidate) is kept
        assert first.candidate == (e.candidate if kept else fits[0][1].candidate)
