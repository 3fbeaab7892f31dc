"""Context parallelism in training: every mesh and strategy gives one device's losses."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx
from test_context import context_config, losses, mesh_id

from engine.trainer import train
from sharding import axis_rules

# ---------------------------------------------------------------- training parity


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    with_docs = losses(train(context_config(tmp_path_factory.mktemp("one")), jax.devices()[:1]))
    no_docs = context_config(tmp_path_factory.mktemp("plain"), document_mask=False)
    return {True: with_docs, False: losses(train(no_docs, jax.devices()[:1]))}


MESHES = [
    dict(context=8),
    dict(data=2, context=4),
    dict(fsdp=2, context=2, tensor=2),
    dict(data=2, context=2, pipeline=2),
]


@pytest.mark.parametrize("strategy", ["all_gather", "ring"])
@pytest.mark.parametrize("mesh", MESHES, ids=mesh_id)
def test_context_meshes_match_one_device(tmp_path, mesh, strategy, one_device):
    got = losses(train(context_config(tmp_path, mesh, context_strategy=strategy)))
    assert one_device[True][-1] < one_device[True][0] - 0.1  # it learns: equality means something
    np.testing.assert_allclose(got, one_device[True], rtol=1e-5)


@pytest.mark.parametrize(
    "strategy, document_mask, balance", [("ring", False, False), ("all_gather", True, False)]
)
def test_other_masks_and_orders_match_one_device(
    tmp_path, strategy, document_mask, balance, one_device
):
    """On data=2 x context=4; the balanced, document-masked case runs on every mesh above, and
    test_context's attention test covers every combination for both strategies."""
    cfg = context_config(tmp_path, dict(data=2, context=4), document_mask,
                         context_strategy=strategy, context_load_balance=balance)  # fmt: skip
    np.testing.assert_allclose(losses(train(cfg)), one_device[document_mask], rtol=1e-5)


def test_activations_and_batch_are_split_along_the_length(tmp_path):
    from engine.setup import setup

    run = setup(context_config(tmp_path, dict(data=2, context=4)))
    # [16 rows, 64 tokens]: rows over data, tokens over context.
    assert run.batch_shardings["inputs"].shard_shape((16, 64)) == (8, 16)
    model = nnx.merge(run.graphdef, run.state.params)
    tokens = jnp.zeros((16, 64), jnp.int32)
    with jax.set_mesh(run.mesh), axis_rules(run.plan.rules):
        features, _ = jax.jit(lambda t: model.features(t))(tokens)
    assert features.sharding.shard_shape(features.shape) == (8, 16, 64)


def test_remat_accumulation_and_loss_chunks_match_one_device(tmp_path, one_device):
    from engine.optim import OptimConfig

    optim = OptimConfig(lr=3e-3, warmup_steps=50, microbatches=2)
    cfg = context_config(tmp_path, dict(data=2, context=4), run=dict(optim=optim),
                         context_strategy="ring", remat="full", loss_chunks=4)  # fmt: skip
    np.testing.assert_allclose(losses(train(cfg)), one_device[True], rtol=1e-5)


def test_resume_onto_another_context_degree_then_generate(tmp_path, one_device):
    """Checkpoints do not depend on the split: saved on context=4, resumed on context=2 x
    tensor=2 with one device's losses; the trained model then generates on one device."""
    from engine.callbacks import Callback
    from engine.checkpoint import load_model
    from engine.generate import Sampling, generate

    class StopAfter2(Callback):
        def on_step(self, trainer, record):
            if record["step"] == 2:
                trainer.stop_reason = "stopped after step 2 for the test"

    keep = dataclasses.replace(tiny_config(tmp_path).checkpoint, final=True)
    first = train(context_config(tmp_path, dict(data=2, context=4), run=dict(checkpoint=keep)),
                  callbacks=[StopAfter2()])  # fmt: skip
    rest = train(context_config(tmp_path, dict(data=2, context=2, tensor=2),
                                run=dict(checkpoint=keep), context_strategy="ring"))  # fmt: skip
    assert [r["step"] for r in rest] == [3]
    np.testing.assert_allclose(losses(first + rest), one_device[True], rtol=1e-5)

    model, _ = load_model(tmp_path)
    prompt = np.arange(1, 9)[None]
    sampling = Sampling(max_new_tokens=6, temperature=0.0)
    cached = generate(model, prompt, sampling)
    assert cached.shape == (1, 14)
    np.testing.assert_array_equal(cached, generate(model, prompt, sampling, use_cache=False))
