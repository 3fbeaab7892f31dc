"""The engine's step against optax's own clip + AdamW on a hand-written loss."""

import dataclasses

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from engine.optim import OptimConfig, make_optimizer
from engine.trainer import setup


@pytest.mark.parametrize("microbatches", [1, 2])
def test_step_matches_optax_reference(tiny, microbatches):
    # clip_norm well under the gradient norm (~2-3), so clipping is active on every step.
    optim = OptimConfig(lr=1e-2, warmup_steps=1, clip_norm=0.5, microbatches=microbatches)
    run = setup(tiny(mesh=dict(data=2, fsdp=2, tensor=2), steps=3, optim=optim))
    adamw, _ = make_optimizer(dataclasses.replace(optim), 3)
    reference = optax.chain(optax.clip_by_global_norm(0.5), adamw)

    def ref_loss(params, batch):
        logits = nnx.merge(run.graphdef, params)(batch["inputs"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    params = jax.device_get(run.state.params)
    ref_state = reference.init(params)
    state = run.state
    for step in range(3):
        host_batch = run.task.train_batch(step)
        state, metrics = run.train_step(state, run.put_batch(host_batch))
        loss, grads = jax.value_and_grad(ref_loss)(params, host_batch)
        updates, ref_state = reference.update(grads, ref_state, params)
        params = optax.apply_updates(params, updates)
        assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-5)
        assert float(metrics["grad_norm"]) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-4)
    # Adam divides by sqrt(v) + eps: where a gradient is near eps (a byte the batch barely saw),
    # reduction-order rounding moves that update by a visible fraction of lr. Hence atol ~ lr/200.
    got, want = jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(params)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=5e-5)


def test_chunked_loss_is_the_same_step_in_less_memory(tiny):
    """The output layer and loss over 4 pieces of the sequence: the same losses and params as
    all at once, on a tensor-parallel mesh that splits the vocabulary, without the full
    [batch, length, vocab] logits (and their gradient) alive at once."""
    runs = []
    for chunks in (1, 4):
        model = dataclasses.replace(tiny().model, vocab_size=4096, loss_chunks=chunks)
        runs.append(setup(tiny(mesh=dict(data=2, fsdp=2, tensor=2), steps=3, model=model)))
    losses = []
    for run in runs:
        state, per_step = run.state, []
        for step in range(3):
            state, metrics = run.train_step(state, run.put_batch(run.task.train_batch(step)))
            per_step.append(float(metrics["loss"]))
        losses.append(per_step)
        run.state = state
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
    for a, b in zip(*(jax.tree.leaves(jax.device_get(r.state.params)) for r in runs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    cfg = runs[0].cfg
    # fp32 logits per device: rows over data x fsdp = 4, the vocabulary over tensor = 2.
    logits_bytes = cfg.batch_size // 4 * cfg.data.seq_len * 4096 // 2 * 4
    temp = [r.train_step.memory_analysis().temp_size_in_bytes for r in runs]
    assert temp[1] < temp[0] - logits_bytes // 2, temp
