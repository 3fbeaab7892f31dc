"""Models: parameter counts, depth-independent compile, remat, and the digits target."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engine.config import PRESETS
from engine.trainer import flops_per_token, setup, train
from models import LLAMA_PRESETS, Llama
from models.llama import attention
from sharding import DEFAULT_RULES, axis_rules, make_mesh


@pytest.mark.parametrize("tie, extras", [(False, False), (True, False), (False, True)])
def test_param_count_formula_matches_the_model(tie, extras):
    cfg = dataclasses.replace(
        LLAMA_PRESETS["tiny"], tie_embeddings=tie, qk_norm=extras, qkv_bias=extras
    )
    model = nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0)))
    actual = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    assert actual == cfg.num_params()


def _hlo_size(n_layers: int) -> int:
    cfg = dataclasses.replace(LLAMA_PRESETS["tiny"], n_layers=n_layers)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0))))

    def loss(params, tokens):
        return nnx.merge(graphdef, params)(tokens).mean()

    tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    return len(jax.jit(jax.grad(loss)).lower(params, tokens).as_text())


def test_program_size_does_not_grow_with_depth():
    # Layers run under lax.scan: 16 layers lower to the same program as 2 (bar constants).
    assert _hlo_size(16) < 1.05 * _hlo_size(2)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch", "save:attn_out,mlp_hidden"])
def test_remat_changes_memory_not_results(policy, tiny):
    base = train(tiny(steps=3))
    model = dataclasses.replace(PRESETS["tiny"].model, remat=policy)
    remat = train(tiny(steps=3, model=model))
    np.testing.assert_allclose([r["loss"] for r in remat], [r["loss"] for r in base], rtol=1e-5)


def test_digits_reaches_95_percent(tmp_path):
    cfg = PRESETS["digits"]
    cfg = dataclasses.replace(
        cfg,
        run_dir=str(tmp_path),
        log=dataclasses.replace(cfg.log, progress=False, tensorboard=False),
    )
    records = train(cfg, devices=jax.devices()[:1])
    assert records[-1]["eval_accuracy"] >= 0.95


def test_flops_per_token_matches_xla_cost_analysis():
    # XLA counts a scan body once, so compare a one-layer model; XLA also computes the masked
    # half of causal attention, which the model-FLOPs formula rightly leaves out. A model wide
    # enough that matmuls dominate, since the formula counts no elementwise work.
    cfg = PRESETS["small"]
    model = dataclasses.replace(cfg.model, n_layers=1, remat="none")
    cfg = dataclasses.replace(cfg, model=model, precision="fp32", batch_size=8)
    run = setup(cfg, init=False)
    cost = run.train_step.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    # cost_analysis is per device; the batch is split over all of them.
    xla_per_token = cost["flops"] * run.mesh.size / (cfg.batch_size * cfg.data.seq_len)
    masked_half = 6 * cfg.data.seq_len * model.n_heads * model.head_dim
    assert xla_per_token == pytest.approx(flops_per_token(cfg) + masked_half, rel=0.03)


def test_einsum_attention_is_the_function_cudnn_computes():
    """`--model.attention=cudnn` hands q, k, v to jax.nn.dot_product_attention as they are;
    its reference (XLA) implementation must agree with our einsum attention, grouped-query
    layout and causal mask included, so switching kernels on a GPU changes speed only."""
    q, k, v = (
        jax.random.normal(key, (2, 16, heads, 8))
        for key, heads in zip(jax.random.split(jax.random.key(0), 3), (8, 2, 2), strict=True)
    )
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    np.testing.assert_allclose(attention(q, k, v, "xla"), want, atol=1e-5)


def test_document_mask_makes_a_packed_document_see_only_itself():
    """A row packing doc A then doc B: with segment ids, B's logits are those of B alone
    (rotary attention depends only on relative positions); without, B also reads A."""
    model = Llama(LLAMA_PRESETS["tiny"], nnx.Rngs(0))
    a, b = jax.random.randint(jax.random.key(1), (2, 12), 1, 256)
    packed = jnp.concatenate([a, b])[None]
    segments = jnp.repeat(jnp.arange(2), 12)[None]
    alone = model(b[None])[0]
    np.testing.assert_allclose(model(packed, segments)[0, 12:], alone, atol=2e-5)
    np.testing.assert_allclose(model(packed, segments)[0, :12], model(a[None])[0], atol=2e-5)
    assert np.abs(model(packed)[0, 12:] - alone).max() > 1e-2  # the mask is what did it


def _dot_dimensions(jaxpr):
    """dimension_numbers of every dot_general in `jaxpr` and the jaxprs inside it (scan, remat)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn.params["dimension_numbers"]
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _dot_dimensions(sub)


@pytest.mark.parametrize("mesh", [{"data": 8}, {"context": 2, "data": 4}])
def test_weight_gradients_contract_tokens_as_one_dimension(mesh):
    """models.layers.dense: XLA:CPU copies an operand into a transposed layout before a matmul
    that contracts batch and length apart (the SwiGLU backward ran 1.5x slower). Under context
    parallelism they stay apart: merged, they would need resharding."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Llama(LLAMA_PRESETS["tiny"], nnx.Rngs(0))))
    tokens = jax.ShapeDtypeStruct((8, 16), jnp.int32)

    def loss(params, tokens):
        return nnx.merge(graphdef, params)(tokens).mean()

    with jax.set_mesh(make_mesh(mesh)), axis_rules(DEFAULT_RULES):
        jaxpr = jax.make_jaxpr(jax.grad(loss))(params, tokens)
    # Matmuls without batch dimensions are the weights' (attention's have some): q, k, v, o,
    # gate, up, down and the output layer, each forward, for dx and for dw.
    weights = [c for c, (batch, _) in _dot_dimensions(jaxpr.jaxpr) if not batch]
    assert len(weights) >= 3 * 8
    apart = [c for c in weights if all({0, 1} <= set(side) for side in c)]
    assert len(apart) == (8 if "context" in mesh else 0), weights
