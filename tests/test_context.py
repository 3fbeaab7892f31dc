"""Context parallelism: the sequence split over devices gives the unsplit model's numbers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from engine.config import ConfigError, validate
from engine.plan import Plan, violations
from models import LLAMA_PRESETS, Llama
from models.layers import xla_attention
from sharding import DEFAULT_RULES, axis_rules, context, make_mesh
from sharding.context import context_attention, load_balance_order, reorder, restore

STEPS = 3


def context_config(run_dir, mesh=None, document_mask=True, run=None, **model):
    """`tiny` for 3 steps with document masks; `model` keys, and `run`: other Config keys."""
    cfg = tiny_config(run_dir, mesh, steps=STEPS, **(run or {}))
    data = dataclasses.replace(cfg.data, document_mask=document_mask)
    return dataclasses.replace(cfg, data=data, model=dataclasses.replace(cfg.model, **model))


def losses(records):
    return np.array([r["loss"] for r in records])


def mesh_id(mesh):
    return "x".join(f"{k}{v}" for k, v in mesh.items())


# ---------------------------------------------------------------- the attention itself


def test_load_balance_order_gives_each_device_an_early_and_a_late_chunk():
    order = load_balance_order(16, 4)  # 8 chunks of 2
    np.testing.assert_array_equal(order.reshape(4, 2, 2)[:, :, 0], [[0, 14], [2, 12], [4, 10],
                                                                    [6, 8]])  # fmt: skip
    assert sorted(order) == list(range(16))
    x = jnp.arange(32).reshape(2, 16)
    np.testing.assert_array_equal(restore(jnp.take(x, order, axis=1), 4), x)


@pytest.mark.parametrize("strategy", ["all_gather", "ring"])
@pytest.mark.parametrize(
    "length, block", [(32, 1024), (20, 1024), (32, 2)], ids=["even", "odd_shards", "many_blocks"]
)
def test_attention_and_its_gradients_equal_unsplit_attention(strategy, length, block, monkeypatch):
    """Every combination of document mask and load-balanced order, on context=4 x data=2,
    against the plain einsum kernel on whole sequences; shards of odd length (20 / 4) run one
    block per device, and blocks of at most 2 positions four per device."""
    monkeypatch.setattr(context, "BLOCK", block)
    b, h, kv, d = 2, 4, 2, 8
    q, k, v = (jax.random.normal(jax.random.key(i), (b, length, n, d))
               for i, n in enumerate((h, kv, kv)))  # fmt: skip
    ends = np.random.default_rng(0).random((b, length)) < 0.15
    segments = jnp.asarray(np.cumsum(ends, axis=1), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length), (b, length))
    mesh = make_mesh({"context": 4, "data": 2})
    checked = 0
    for seg in (None, segments):
        for balance in (False, True) if length % 8 == 0 else (False,):

            def split(q, k, v, seg=seg, balance=balance):
                args = (q, k, v, positions, seg)
                if balance:
                    order = load_balance_order(length, 4)
                    args = [None if a is None else jnp.take(a, order, axis=1) for a in args]
                out = context_attention(*args, strategy=strategy)
                return restore(out, 4) if balance else out

            def whole(q, k, v, seg=seg):
                return xla_attention(q, k, v, None, seg)

            with jax.set_mesh(mesh), axis_rules(DEFAULT_RULES):
                out = jax.jit(split)(q, k, v)
                grads = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(split(*a))), (0, 1, 2)))(
                    q, k, v
                )
            want = whole(q, k, v)
            want_grads = jax.grad(lambda *a: jnp.sum(jnp.sin(whole(*a))), (0, 1, 2))(q, k, v)
            np.testing.assert_allclose(out, want, atol=2e-6)
            for got, expected in zip(grads, want_grads, strict=True):
                np.testing.assert_allclose(got, expected, atol=1e-5)
            checked += 1
    assert checked == (4 if length % 8 == 0 else 2)


def test_logits_of_a_packed_batch_equal_the_unsplit_model(tmp_path):
    cfg = context_config(tmp_path)
    model = Llama(cfg.model.arch, nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 64), 0, 256)
    segments = jnp.asarray(np.cumsum(np.random.default_rng(2).random((4, 64)) < 0.05, 1))
    want = model(tokens, segments)
    graphdef, state = nnx.split(Llama(cfg.model.arch, nnx.Rngs(0), context="ring"))

    @jax.jit
    def split(state, tokens, segments):
        batch = reorder({"inputs": tokens, "segments": segments}, 4)
        logits = nnx.merge(graphdef, state)(batch["inputs"], batch["segments"],
                                            batch["positions"])  # fmt: skip
        return logits, restore(logits, 4)

    with jax.set_mesh(make_mesh({"context": 4, "tensor": 2})), axis_rules(DEFAULT_RULES):
        raw, got = split(state, tokens, segments)
    # Per device: all rows, a quarter of the (reordered) sequence, half the vocabulary.
    assert raw.sharding.shard_shape(raw.shape) == (4, 16, 128)
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("strategy", ["all_gather", "ring"])
def test_bf16_attention_tracks_fp32(strategy):
    """bf16 inputs, fp32 softmax statistics: within bf16 rounding of the fp32 result."""
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 64, n, 16))
               for i, n in enumerate((4, 2, 2)))  # fmt: skip
    positions = jnp.broadcast_to(jnp.arange(64), (2, 64))
    with jax.set_mesh(make_mesh({"context": 8})), axis_rules(DEFAULT_RULES):
        attend = jax.jit(lambda *a: context_attention(*a, positions, strategy=strategy))
        got = attend(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), xla_attention(q, k, v), atol=0.03)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "mesh, keys, message",
    [
        (dict(context=4, data=2), dict(seq_len=36),
         "--data.seq_len=36 does not split into 2 x 4 load-balanced chunks (--mesh.context=4); "
         "use a multiple of 8, or --model.context_load_balance=False (a multiple of 4)."),
        (dict(context=4, data=2), dict(seq_len=30, context_load_balance=False),
         "--data.seq_len=30 does not split into 4 pieces (--mesh.context=4); use a multiple of 4."),
        (dict(context=4, data=2), dict(loss_chunks=32),
         "--model.loss_chunks=32 cuts each device's share of the sequence (--mesh.context=4) "
         "into pieces, and --data.seq_len=64 is not a multiple of 128; use a chunk count that "
         "divides 16."),
        (dict(context=2, data=4), dict(context_strategy="ring", attention="cudnn"),
         "--model.context_strategy=ring runs its own blockwise attention and cannot use "
         "--model.attention=cudnn"),
        (dict(context=2, expert=2, data=2),
         dict(moe=dict(experts=4, top_k=2, d_ff=32, capacity_factor=1.25)),
         "--model.moe.capacity_factor=1.25 gives experts' slots in token order, and "
         "--model.context_load_balance reorders each sequence"),
        (dict(context=2, pipeline=2, data=2), dict(moe=dict(experts=4, top_k=2, d_ff=32)),
         "MoE layers in pipeline stages cannot also split sequences (--mesh.context=2)"),
    ],
)  # fmt: skip
def test_impossible_context_settings_get_one_sentence(tmp_path, mesh, keys, message):
    seq = keys.pop("seq_len", 64)
    cfg = context_config(tmp_path, mesh, **keys)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=seq))
    errors = [str(e) for e in violations(cfg, Plan.from_config(cfg), 8, "gpu")]
    assert any(e.startswith(message) for e in errors), errors


def test_unknown_strategy_and_a_model_without_sequences(tmp_path):
    with pytest.raises(ConfigError, match="--model.context_strategy=ulysses is not a context"):
        validate(context_config(tmp_path, context_strategy="ulysses"))
    from engine.config import PRESETS
    from sharding import MeshConfig

    digits = dataclasses.replace(PRESETS["digits"], mesh=MeshConfig(data=4, context=2))
    (error,) = violations(digits, Plan.from_config(digits), 8, "cpu")
    assert str(error).startswith("--mesh.context=2 splits sequences, and --task=digits has none")


def test_remat_policies_do_not_keep_the_blocks_of_attention():
    """Under `dots` a remat policy may keep matmul outputs, but not the kernel's per-block
    scores: its backward recomputes them (before, dots kept 6x what no remat keeps)."""
    tokens = jnp.zeros((2, 1024), jnp.int32)
    temp = {}
    for remat in ("none", "dots"):
        graphdef, state = nnx.split(Llama(LLAMA_PRESETS["tiny"], nnx.Rngs(0), remat=remat,
                                          context="ring"))  # fmt: skip

        def loss(state, graphdef=graphdef):
            return jnp.sum(nnx.merge(graphdef, state).features(tokens)[0])

        with jax.set_mesh(make_mesh({"context": 8})), axis_rules(DEFAULT_RULES):
            compiled = jax.jit(jax.grad(loss)).lower(state).compile()
        temp[remat] = compiled.memory_analysis().temp_size_in_bytes
    assert temp["dots"] < temp["none"]


def test_the_planner_splits_long_sequences_and_prices_the_exchange():
    """1b at 32k tokens, 2 sequences, 8 H100s: the batch splits 2 ways at most, so the best
    plans split the sequence; the key/value exchange is priced; short sequences never search
    the axis."""
    from engine.autoplan import plan_search, target_for
    from engine.config import PRESETS

    fits, _ = plan_search(PRESETS["1b_32k"], target_for("h100", 8))
    best_plan, best = fits[0]
    assert best_plan.mesh["context"] > 1
    assert best.times_s["context"] > 0
    assert all(plan.mesh["context"] == 1 or e.times_s["context"] > 0 for plan, e in fits)
    fits, rejected = plan_search(PRESETS["tiny"], target_for("h100", 8))
    assert {plan.mesh["context"] for plan, _ in fits + rejected} == {1}


def test_a_kernel_on_gathered_keys_gets_the_causal_mask_by_position():
    """The all_gather strategy's path for cuDNN (a kernel on gathered keys with an explicit
    mask), run here with jax.nn.dot_product_attention's XLA implementation on the same mask."""
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 32, n, 8))
               for i, n in enumerate((4, 2, 2)))  # fmt: skip
    segments = jnp.asarray(np.cumsum(np.random.default_rng(0).random((2, 32)) < 0.15, 1))
    order = load_balance_order(32, 4)
    positions = jnp.broadcast_to(jnp.asarray(order), (2, 32))

    def kernel(q, k, v, visible):
        return jax.nn.dot_product_attention(q, k, v, mask=visible[:, None], implementation="xla")

    def split(q, k, v):
        q, k, v, seg = (jnp.take(a, order, axis=1) for a in (q, k, v, segments))
        return restore(context_attention(q, k, v, positions, seg, "all_gather", kernel), 4)

    def whole(q, k, v):
        return xla_attention(q, k, v, None, segments)

    with jax.set_mesh(make_mesh({"context": 4, "data": 2})), axis_rules(DEFAULT_RULES):
        got = jax.jit(split)(q, k, v)
        grads = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(split(*a))), (0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(got, whole(q, k, v), atol=2e-6)
    want = jax.grad(lambda *a: jnp.sum(jnp.sin(whole(*a))), (0, 1, 2))(q, k, v)
    for a, b in zip(grads, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
