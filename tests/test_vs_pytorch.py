"""benchmarks/vs_pytorch.py compares like with like: from the same initial weights (through our
Hugging Face export) and batches, shardtrain and transformers + torch.optim.AdamW compute the
same losses, the first step and the ones after it (optimizer, schedule, clipping, decay mask)."""

import sys

import jax
import pytest
from conftest import ROOT, tiny_config

from engine.setup import setup

pytest.importorskip("torch")
pytest.importorskip("transformers")
sys.path.insert(0, str(ROOT / "benchmarks"))
from vs_pytorch import PHASES, first_losses, make_variant  # noqa: E402


def test_shardtrain_and_torch_train_the_same_model_the_same_way(tmp_path):
    # Warmup of 2 steps: step 0 runs at lr 0, so the later steps check the schedule and AdamW;
    # a low clip norm makes clipping act on every step. Remat on ours puts the twin under
    # gradient checkpointing, as the benchmark times `1b`: the losses must not move.
    cfg = tiny_config(tmp_path, mesh={"data": 1}, steps=6).replace(
        optim={"warmup_steps": 2, "clip_norm": 0.5, "weight_decay": 0.1},
        model={"remat": "full"},
    )
    ours, theirs = first_losses(cfg, steps=4)
    assert abs(ours[0] - theirs[0]) <= 1e-4
    assert ours == pytest.approx(theirs, abs=1e-4)  # without clipping: 7e-4 off by step 3
    assert ours[-1] < ours[0] - 0.05  # they trained, in step


def test_each_timed_phase_computes_the_same_loss_on_both_sides(tmp_path):
    # `--phases` times the forward, the forward + backward and the step apart: each must be
    # the same computation on both sides, or the split says nothing about where time goes.
    run = setup(tiny_config(tmp_path, mesh={"data": 1}), jax.devices()[:1])
    batches = [run.task.train_batch(0)]
    # Both built first: the twin reads the initial weights, which our first step donates.
    ours = make_variant("shardtrain", run, batches, "cpu", phases=PHASES)
    theirs = make_variant("torch eager", run, batches, "cpu", phases=PHASES)
    for phase in PHASES:
        assert ours[phase](1) == pytest.approx(theirs[phase](1), abs=1e-4), phase
