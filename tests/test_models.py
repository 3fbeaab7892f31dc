"""Models: parameter counts, depth-independent compile, remat, and the digits target."""

import dataclasses
import functools
import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jaxpr_equations
from flax import nnx
from jax._src.cudnn import fused_attention_stablehlo

from engine.config import PRESETS
from engine.precision import POLICIES
from engine.trainer import flops_per_token, setup, train
from models import LLAMA_PRESETS, Llama, layers
from models.layers import causal_block_rows, dense, xla_attention
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
    # part of causal attention's diagonal blocks (of rows/length of the masked half), which the
    # model-FLOPs formula rightly leaves out. A model wide enough that matmuls dominate, since
    # the formula counts no elementwise work.
    cfg = PRESETS["small"]
    model = dataclasses.replace(cfg.model, n_layers=1, remat="none")
    cfg = dataclasses.replace(cfg, model=model, precision="fp32", batch_size=8)
    run = setup(cfg, init=False, evaluate=False)
    cost = run.train_step.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    # cost_analysis is per device; the batch is split over all of them.
    xla_per_token = cost["flops"] * run.mesh.size / (cfg.batch_size * cfg.data.seq_len)
    masked_half = 6 * cfg.data.seq_len * model.n_heads * model.head_dim
    masked_half *= causal_block_rows(cfg.data.seq_len, jnp.float32) / cfg.data.seq_len
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


def test_remat_keeps_the_fused_attention_kernels_forward(monkeypatch):
    """cuDNN's attention is no dot: the dots policies and save:attention keep its output and
    softmax statistics instead of running its forward again in the backward pass, and its
    shape twin (what the planner counts with on any machine) keeps the same residuals under
    every policy. Traced only: tracing JAX's kernel checks nothing but the cuDNN version."""
    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 90500)
    shapes = [(2, 64, 4, 16), (2, 64, 2, 16), (2, 64, 2, 16), (16, 16)]
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]

    def layer(remat):  # a new function each time: jax.checkpoint caches what it traced
        def fn(q, k, v, w):
            q, k, v = (a @ w for a in (q, k, v))  # weight-like dots, as the projections are
            return attention(q, k, v, "cudnn").astype(jnp.float32)

        policy = layers.remat_policy(remat)
        return fn if policy is None else jax.checkpoint(fn, policy=policy)

    def residuals(fn):
        kept = jax.eval_shape(lambda *a: jax.vjp(fn, *a)[1], *args)
        return sorted((x.shape, x.dtype.name) for x in jax.tree.leaves(kept) if x.size)

    forwards = {"none": 1, "full": 2, "dots_no_batch": 1, "dots": 1, "save:attention": 1,
                "save:query,key,value": 2}  # fmt: skip
    for remat, want in forwards.items():
        fn = layer(remat)
        grad = jax.grad(lambda *a, fn=fn: fn(*a).sum(), argnums=(0, 1, 2, 3))
        program = str(jax.make_jaxpr(grad)(*args))
        assert program.count(layers._CUDNN_ATTENTION_FORWARD) == want, remat
        kernel = residuals(fn)
        with layers.shapes_only():
            assert residuals(layer(remat)) == kernel, remat
        statistics = ((2, 4, 64), "float32")
        assert (statistics in kernel) == (want == 1), remat


def test_causal_attention_in_blocks_computes_the_whole_attention():
    """On a CPU, causal `xla_attention` runs blocks of query rows against only the keys up to
    each block's end (80 tokens in fp32: 32 + 32 + 16 rows against 32, 64 and 80 keys); its
    outputs and gradients, with and without a document mask, are those of the whole
    attention."""
    shape = (2, 80, 8, 8)
    q, k, v, cotangent = (
        jax.random.normal(key, shape[:2] + (heads, 8))
        for key, heads in zip(jax.random.split(jax.random.key(0), 4), (8, 2, 2, 8), strict=True)
    )
    segments = jnp.repeat(jnp.array([[0, 1], [0, 0]]), jnp.array([50, 30]), axis=1)
    same = (segments[:, :, None] == segments[:, None, :])[:, None]
    for seg, mask in ((None, None), (segments, same)):

        def ours(q, k, v, seg=seg):
            return jnp.sum(xla_attention(q, k, v, None, seg) * cotangent)

        def whole(q, k, v, mask=mask):
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)
            return jnp.sum(out * cotangent)

        np.testing.assert_allclose(ours(q, k, v), whole(q, k, v), rtol=1e-5)
        for got, want in zip(
            jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(whole, (0, 1, 2))(q, k, v), strict=True
        ):
            np.testing.assert_allclose(got, want, atol=1e-5)
    assert causal_block_rows(80, jnp.float32) == 32
    scores = [
        eqn.outvars[0].aval.shape
        for eqn in jax.make_jaxpr(xla_attention)(q, k, v).jaxpr.eqns
        if eqn.primitive.name == "dot_general"
        and eqn.params["dimension_numbers"][0] == ((3,), (3,))
    ]
    assert [s[-2:] for s in scores] == [(4 * 32, 32), (4 * 32, 64), (4 * 16, 80)]


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
    for eqn in jaxpr_equations(jaxpr):
        if eqn.primitive.name == "dot_general":
            yield eqn.params["dimension_numbers"]


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


@pytest.mark.parametrize("lead", [(4, 8), (3, 5)])  # rows even (kept in pairs) and odd
def test_bf16_dense_sums_in_fp32_and_rounds_once(lead):
    """On XLA:CPU a bf16 `dense` runs a custom gradient (XLA would upcast both operands of a
    bf16 -> bf16 matmul to fp32): its results are the fp32 ones rounded once, and its
    gradients those of plain bf16 matmuls."""
    assert jax.default_backend() == "cpu"
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (*lead, 3, 16), jnp.bfloat16)
    w1, w2 = (0.1 * jax.random.normal(k, (3, 16, 24), jnp.bfloat16) for k in keys[1:3])
    cotangent = jax.random.normal(keys[3], (*lead, 24))

    def loss(x, w1, w2, dense=dense):
        a, b = dense(x, w1, w2, n_in=2)
        return jnp.sum((a.astype(jnp.float32) - 2 * b.astype(jnp.float32)) * cotangent)

    def plain(x, *weights, n_in):
        return tuple(jnp.tensordot(x, w, n_in) for w in weights)

    a, b = dense(x, w1, w2, n_in=2)
    assert a.dtype == b.dtype == jnp.bfloat16
    exact = [v.astype(jnp.float32) for v in (x, w1, w2)]
    np.testing.assert_array_equal(a, dense(exact[0], exact[1], n_in=2).astype(jnp.bfloat16))
    np.testing.assert_array_equal(b, dense(exact[0], exact[2], n_in=2).astype(jnp.bfloat16))
    grads = jax.grad(loss, argnums=(0, 1, 2))(x, w1, w2)
    expected = jax.grad(functools.partial(loss, dense=plain), argnums=(0, 1, 2))(x, w1, w2)
    for got, want in zip(grads, expected, strict=True):
        assert got.dtype == jnp.bfloat16
        scale = float(jnp.abs(want.astype(jnp.float32)).max())
        np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32),
                                   rtol=2**-7, atol=2**-8 * scale)  # fmt: skip


@pytest.mark.parametrize("policy", ["dots", "dots_no_batch"])
def test_remat_policies_keep_the_same_activations_in_bf16(policy):
    """Matmuls sit behind a custom gradient on XLA:CPU, which remat policies cannot see into:
    the `dots` policies keep their results by name, as many in bf16 as in fp32."""
    model = lambda: Llama(LLAMA_PRESETS["tiny"], nnx.Rngs(0), remat=policy)  # noqa: E731
    graphdef, params = nnx.split(nnx.eval_shape(model))
    tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)

    def saved(dtype):  # what the backward keeps: the leaves of the vjp's closure
        cast = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, dtype), params)

        def fn(p):
            return nnx.merge(graphdef, p)(tokens)

        residuals = jax.eval_shape(lambda p: jax.vjp(fn, p)[1], cast)
        # Transposes count alike: the matmuls keep their input transposed, as 32-bit words
        # that hold two bf16 values or one fp32 value.
        pairs = jnp.dtype(dtype).itemsize == 2
        return sorted(tuple(sorted(values(a, pairs))) for a in jax.tree.leaves(residuals))

    def values(a, pairs):  # a's shape in values of the compute dtype
        if a.dtype != jnp.uint32 or not pairs:
            return a.shape
        return (*a.shape[:-1], 2 * a.shape[-1])

    assert saved(jnp.bfloat16) == saved(jnp.float32)


def _two_layer_gradient(unroll: int, dtype):
    """A two-layer tiny Llama's loss, its params in `dtype`, tokens, the compiled gradient and
    every two-dimensional dot of it: (lhs, rhs, lhs contracting dim) by instruction name, with
    a table of each instruction's HLO type, e.g. `f32[64,128]{1,0}`."""
    cfg = dataclasses.replace(LLAMA_PRESETS["tiny"], n_layers=2, tie_embeddings=False)
    graphdef, params = nnx.split(Llama(cfg, nnx.Rngs(0), scan_unroll=unroll))
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, cfg.vocab_size)

    def loss(params, tokens):
        return nnx.merge(graphdef, params)(tokens).astype(jnp.float32).mean()

    step = jax.jit(jax.grad(loss)).lower(params, tokens).compile()
    hlo = step.as_text()
    types = dict(re.findall(r"%(\S+) = (\w+\[[\d,]*\]\{[\d,]*\})", hlo))
    dots = re.findall(
        r"= \w+\[\d+,\d+\]\S* dot\(%(\S+), %(\S+)\).*?lhs_contracting_dims=\{(\d)\}", hlo
    )
    # q, k, v, o, gate, up, down: forward, dx and dw; the head's dx and dw (a mean of the
    # logits needs no forward logits)
    assert len(dots) >= 7 * 3 + 2
    return loss, params, tokens, step, dots, types


@pytest.mark.parametrize("unroll", [1, 0])
def test_bf16_weight_gradients_run_as_bf16_matmuls(unroll):
    """XLA:CPU's bf16 matmul kernel takes [K, N] @ [N, F] but not a matmul contracting the rows
    of both operands, which it runs in fp32: `dense` keeps its input transposed for the weight
    gradient. No two-dimensional matmul of a bf16 model may run in fp32, in the layer loop or
    unrolled, the output layer's included. Unrolled, XLA folded the transpose back into a
    matmul XLA:CPU has no 16-bit kernel for, and the gradient failed to run; outside any loop
    it kept x.T as x in a column-major layout, and the output layer's ran in fp32."""
    _, params, tokens, step, dots, types = _two_layer_gradient(unroll, jnp.bfloat16)
    grads = step(params, tokens)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert [d for d in dots if "f32" in (types[d[0]][:3], types[d[1]][:3])] == []


@pytest.mark.parametrize("unroll", [1, 0])
def test_fp32_weight_gradients_contract_a_kept_transpose(unroll):
    """XLA:CPU runs x.T @ g from x's rows at about half the speed of the same matmul from x.T
    written out: `dense` keeps x.T for its weight gradients in fp32 too. No two-dimensional
    matmul may contract the rows of its left operand, which must be laid out in rows (a
    column-major x.T would be x again), and the gradients are autodiff's."""
    loss, params, tokens, step, dots, types = _two_layer_gradient(unroll, jnp.float32)
    layouts = {types[lhs][types[lhs].index("{") :] for lhs, _, _ in dots}
    assert (layouts, {rows for *_, rows in dots}) == ({"{1,0}"}, {"1"}), dots

    def plain_matmuls(x, ws):
        return tuple(x @ w for w in ws)

    with mock.patch.object(layers, "_matmuls", plain_matmuls):
        want = jax.grad(loss)(params, tokens)
    got = step(params, tokens)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_bf16_embedding_gradient_sums_a_tokens_repeats_in_fp32():
    """The lookup's gradient is a scatter-add over every position of a token: in bf16 its
    repeats lose precision (and XLA:GPU runs bf16 atomics as compare-and-swap loops, 31 % of
    `small`'s step on an H200). It sums in fp32 and rounds once, as the policy rounds any
    weight gradient."""
    graphdef, params = nnx.split(Llama(LLAMA_PRESETS["tiny"], nnx.Rngs(0)))
    tokens = jax.random.choice(jax.random.key(1), jnp.array([3, 5]), (8, 64))
    cotangent = jax.random.normal(jax.random.key(2), (8, 64, LLAMA_PRESETS["tiny"].d_model))

    def loss(params):
        model = nnx.merge(graphdef, POLICIES["bf16"].cast_to_compute(params))  # as the step
        return jnp.sum(model._embed(tokens).astype(jnp.float32) * cotangent)

    grad = jax.grad(loss)(params)["embed"][...]
    # What reaches the table: the cotangent as the bf16 rows' (rounded), summed exactly.
    rows = np.asarray(cotangent.astype(jnp.bfloat16), np.float64)
    for token in (3, 5):
        exact = rows[np.asarray(tokens) == token].sum(0)
        want = exact.astype(jnp.bfloat16).astype(np.float64)
        np.testing.assert_allclose(grad[token], want, rtol=2**-8, atol=1e-6)
    assert float(jnp.abs(grad[0]).max()) == 0.0  # a token that never occurs
