"""Parallelism is correct when every mesh gives the losses of one device (fp32)."""

import dataclasses

import jax
import numpy as np
import pytest
from conftest import tiny_config

from engine.config import PRESETS
from engine.optim import OptimConfig
from engine.sources import write_token_file
from engine.trainer import Trainer, train
from sharding import MeshConfig

STEPS = 5
MESHES = [
    dict(data=8),
    dict(fsdp=8),
    dict(data=2, tensor=4),
    dict(data=2, fsdp=2, tensor=2),
    dict(fsdp=4, tensor=2),
]


def losses(records, key="loss"):
    return np.array([r[key] for r in records])


@pytest.fixture(scope="module")
def single_device_losses(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("one"), steps=STEPS)
    return losses(train(cfg, devices=jax.devices()[:1]))


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(f"{k}{v}" for k, v in m.items()))
def test_mesh_matches_one_device(mesh, tiny, single_device_losses):
    got = losses(train(tiny(mesh=mesh, steps=STEPS)))
    # Losses must move, or equality would prove nothing.
    assert single_device_losses[-1] < single_device_losses[0] - 0.1
    np.testing.assert_allclose(got, single_device_losses, rtol=1e-5)


def test_gradient_accumulation_equals_full_batch(tiny):
    mesh = dict(data=2, fsdp=2, tensor=2)
    full = train(tiny(mesh=mesh, steps=STEPS))
    accumulated = train(
        tiny(mesh=mesh, steps=STEPS, optim=OptimConfig(lr=3e-3, warmup_steps=50, microbatches=4))
    )
    np.testing.assert_allclose(losses(accumulated), losses(full), rtol=1e-5)
    np.testing.assert_allclose(
        losses(accumulated, "grad_norm"), losses(full, "grad_norm"), rtol=1e-4
    )


def test_unrolled_layers_match_the_layer_loop(tmp_path):
    """--model.scan_unroll changes the program, not the arithmetic: unrolled (fully, or two
    of three layers per iteration, with remat) on a mesh, the losses are the loop's."""
    base = tiny_config(tmp_path, mesh=dict(fsdp=4, tensor=2), steps=STEPS)
    base = dataclasses.replace(base, model=dataclasses.replace(base.model, n_layers=3))
    runs = {}
    for unroll, remat in [(1, "none"), (0, "none"), (2, "full")]:
        trainer = Trainer(base.replace(model={"scan_unroll": unroll, "remat": remat}))
        runs[unroll] = losses(trainer.fit()), trainer.run.train_step.as_text()
    (loop, loop_hlo), unrolled_hlo = runs[1], runs[0][1]
    assert loop[-1] < loop[0] - 0.1
    assert " while(" in loop_hlo and " while(" not in unrolled_hlo
    for got, _ in runs.values():
        np.testing.assert_allclose(got, loop, rtol=1e-5)


def test_gradient_accumulation_for_the_classifier(tmp_path):
    cfg = PRESETS["digits"]
    cfg = dataclasses.replace(
        cfg, steps=4, run_dir=str(tmp_path), mesh=MeshConfig(data=2, fsdp=2, tensor=2),
        log=dataclasses.replace(cfg.log, progress=False, tensorboard=False),
        checkpoint=dataclasses.replace(cfg.checkpoint, final=False),  # two runs, one directory
    )  # fmt: skip
    full = train(cfg)
    accumulated = train(
        dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, microbatches=2))
    )
    np.testing.assert_allclose(losses(accumulated), losses(full), rtol=1e-5)


def test_bf16_tracks_fp32(tiny):
    fp32 = losses(train(tiny(mesh=dict(data=8), steps=50, precision="fp32")))
    bf16 = losses(train(tiny(mesh=dict(data=8), steps=50, precision="bf16")))
    assert fp32[-10:].mean() < fp32[0] - 1.0  # it learned
    # Not equal (different arithmetic), but within a few percent along the whole curve.
    np.testing.assert_allclose(bf16, fp32, rtol=0.03)
    assert not np.array_equal(bf16, fp32)


def test_fp16_with_loss_scaling_trains(tiny):
    fp32 = losses(train(tiny(mesh=dict(data=8), steps=30, precision="fp32")))
    fp16 = losses(train(tiny(mesh=dict(data=8), steps=30, precision="fp16")))
    assert np.all(np.isfinite(fp16))
    np.testing.assert_allclose(fp16[-5:].mean(), fp32[-5:].mean(), rtol=0.03)


def test_document_mask_on_every_kind_of_mesh(tmp_path):
    """Short packed documents (several per row): segment ids travel with the batch through
    data, FSDP, tensor and pipeline sharding and microbatching, and give one device's losses."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 256, rng.integers(4, 24)) for _ in range(800)]
    source = write_token_file(tmp_path / "docs", docs, eos_id=0, vocab_size=256)

    def run(name, mesh, devices=None, document_mask=True):
        cfg = tiny_config(tmp_path / name, mesh, steps=3, eval_every=0)
        data = dataclasses.replace(cfg.data, source=str(source), document_mask=document_mask)
        return losses(train(dataclasses.replace(cfg, data=data), devices))

    one = run("one", dict(data=1), jax.devices()[:1])
    for mesh in [dict(data=2, fsdp=2, tensor=2), dict(pipeline=2, fsdp=2, tensor=2)]:
        np.testing.assert_allclose(run("x".join(map(str, mesh.values())), mesh), one, rtol=1e-5)
    unmasked = run("unmasked", dict(data=1), jax.devices()[:1], document_mask=False)
    assert np.abs(unmasked - one).max() > 1e-3  # the mask changed the computation
