"""Pipeline parallelism: the losses and gradients of one device, stage-sharded weights, a
collective permute in the compiled step, and activation memory that does not grow with the
number of microbatches."""

import dataclasses
import re

import jax
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from engine.config import PRESETS
from engine.optim import OptimConfig
from engine.precision import POLICIES
from engine.step import make_loss_fn
from engine.trainer import setup, train
from sharding import MeshConfig, PipelineConfig

STEPS = 5
LAYERS = 8  # divisible by every stages x repeats below


def deep(cfg, **overrides):
    """`cfg` with an 8-layer model, so that 2 and 4 stages, with 2 repeats, all fit."""
    model = dataclasses.replace(cfg.model, n_layers=LAYERS)
    return dataclasses.replace(cfg, model=model, **overrides)


def losses(records, key="loss"):
    return np.array([r[key] for r in records])


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    cfg = deep(tiny_config(tmp_path_factory.mktemp("one"), steps=STEPS))
    return train(cfg, devices=jax.devices()[:1])


# (mesh, devices, repeats, microbatches)
CASES = [
    (dict(pipeline=2), 2, 1, 2),
    (dict(pipeline=2), 2, 2, 4),
    (dict(pipeline=4), 4, 1, 8),
    (dict(pipeline=4), 4, 2, 4),
    (dict(pipeline=2, fsdp=2, tensor=2), 8, 1, 4),
    (dict(pipeline=2, fsdp=2, tensor=2), 8, 2, 2),
    (dict(pipeline=4, data=2), 8, 1, 4),
    (dict(pipeline=4, data=2), 8, 2, 8),
]


def case_id(case):
    mesh, _, repeats, micro = case
    return "x".join(f"{k}{v}" for k, v in mesh.items()) + f"-R{repeats}-M{micro}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_pipeline_matches_one_device(case, tmp_path, one_device):
    mesh, devices, repeats, micro = case
    cfg = deep(
        tiny_config(tmp_path, mesh, steps=STEPS),
        pipeline=PipelineConfig(microbatches=micro, repeats=repeats),
    )
    got = train(cfg, devices=jax.devices()[:devices])
    assert losses(one_device)[-1] < losses(one_device)[0] - 0.1  # it learned
    np.testing.assert_allclose(losses(got), losses(one_device), rtol=1e-5)
    np.testing.assert_allclose(losses(got, "grad_norm"), losses(one_device, "grad_norm"), rtol=1e-4)
    np.testing.assert_allclose(
        losses(got[-1:], "eval_loss"), losses(one_device[-1:], "eval_loss"), rtol=1e-5
    )


def unstage(params, stages: int):
    """Staged [R, S, L/(S*R), ...] layer weights back to [L, ...], as a dict of numpy arrays."""
    flat = jax.tree.map(np.asarray, jax.device_get(nnx.to_pure_dict(params)))
    if stages == 1:
        return flat
    layers = lambda x: x.reshape(LAYERS, *x.shape[3:])  # noqa: E731
    return {**flat, "layers": jax.tree.map(layers, flat["layers"])}


def params_and_grads(cfg, devices):
    run = setup(cfg, devices)
    batch = run.put_batch(run.task.train_batch(0))
    loss_fn = make_loss_fn(run.graphdef, POLICIES["fp32"])

    def mean_loss(params):
        loss_sum, count, _ = loss_fn(params, batch)
        return loss_sum / count

    with jax.set_mesh(run.mesh):
        grads = jax.jit(jax.grad(mean_loss))(run.state.params)
    stages = run.mesh.shape["pipeline"]
    return unstage(run.state.params, stages), unstage(grads, stages)


def test_pipeline_gradients_equal_one_device(tmp_path):
    """Every parameter's gradient, not just the norm, on a circular pipeline x fsdp x tensor."""
    base = deep(tiny_config(tmp_path, dict(data=1)))
    staged = deep(
        tiny_config(tmp_path, dict(pipeline=2, fsdp=2, tensor=2)),
        pipeline=PipelineConfig(microbatches=4, repeats=2),
    )
    params, grads = params_and_grads(base, jax.devices()[:1])
    staged_params, staged_grads = params_and_grads(staged, jax.devices())
    # Same initial weights: staging is a reshape of the one-device layer stack.
    jax.tree.map(np.testing.assert_array_equal, staged_params, params)
    jax.tree.map(
        lambda g, s: np.testing.assert_allclose(s, g, rtol=1e-4, atol=1e-7), grads, staged_grads
    )
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-3  # not all zero


def test_pipeline_with_accumulation_and_bf16(tmp_path, one_device):
    mesh = dict(pipeline=2, data=4)
    pipe = PipelineConfig(microbatches=2, repeats=2)
    accumulated = train(
        deep(
            tiny_config(tmp_path, mesh, steps=STEPS),
            pipeline=pipe,
            optim=OptimConfig(lr=3e-3, warmup_steps=50, microbatches=2),
        )
    )
    np.testing.assert_allclose(losses(accumulated), losses(one_device), rtol=1e-5)
    bf16 = train(deep(tiny_config(tmp_path, mesh, steps=STEPS), pipeline=pipe, precision="bf16"))
    np.testing.assert_allclose(losses(bf16), losses(one_device), rtol=0.02)
    assert not np.array_equal(losses(bf16), losses(one_device))


def test_compiled_step_moves_activations_with_collective_permute(tmp_path):
    cfg = deep(
        tiny_config(tmp_path, dict(pipeline=4, data=2)),
        pipeline=PipelineConfig(microbatches=4, repeats=2),
    )
    hlo = setup(cfg, init=False, evaluate=False).train_step.as_text()
    dump = tmp_path / "train_step.hlo.txt"
    dump.write_text(hlo)
    ops = re.findall(r"\bcollective-permute(?:-start)?\(", dump.read_text())
    assert len(ops) >= 2  # forward, and its transpose in the backward pass
    # The one-device-per-stage ring: 0->1->2->3->0 within each data replica.
    assert "source_target_pairs=" in hlo


def layer_bytes_per_device(run) -> int:
    return sum(
        leaf.addressable_shards[0].data.nbytes
        for leaf in jax.tree.leaves(run.state.params["layers"])
    )


def test_layer_weights_per_device_fall_as_one_over_stages(tmp_path):
    sizes = {}
    for stages in (1, 2, 4):
        cfg = deep(tiny_config(tmp_path, dict(pipeline=stages)))
        run = setup(cfg, jax.devices()[:stages])
        sizes[stages] = layer_bytes_per_device(run)
        wq = run.state.params["layers"]["wq"]
        if stages > 1:  # [repeats, stages, layers per stage, ...], one stage per device
            assert wq.shape == (1, stages, LAYERS // stages, 64, 8, 8)
            assert wq.addressable_shards[0].data.shape == (1, 1, LAYERS // stages, 64, 8, 8)
        # Weights outside the layers split their `embed` dimension over the stages instead.
        embed = run.state.params["embed"]
        assert embed.addressable_shards[0].data.shape == (256, 64 // stages)
    assert sizes[2] * 2 == sizes[1] and sizes[4] * 4 == sizes[1]


def temp_bytes(cfg, devices) -> int:
    run = setup(cfg, devices, init=False, evaluate=False)
    return run.train_step.memory_analysis().temp_size_in_bytes


def test_activation_memory_does_not_grow_with_microbatches(tmp_path):
    """Each pipeline iteration is rematerialized, so a stage keeps only its inputs: more,
    smaller microbatches must not cost memory, and without remat inside the layers the
    pipeline stays far below a stage's share of the unpipelined activations."""
    base = deep(dataclasses.replace(PRESETS["default"], batch_size=64, run_dir=str(tmp_path)))
    full = dataclasses.replace(base.model, remat="full")
    pipe = lambda m, **kw: dataclasses.replace(  # noqa: E731
        base, mesh=MeshConfig(data=1, pipeline=2), pipeline=PipelineConfig(microbatches=m), **kw
    )
    two = jax.devices()[:2]
    assert temp_bytes(pipe(32, model=full), two) < temp_bytes(pipe(8, model=full), two)
    unpipelined = temp_bytes(dataclasses.replace(base, mesh=MeshConfig(data=1)), two[:1])
    assert temp_bytes(pipe(8), two) < 0.25 * unpipelined
