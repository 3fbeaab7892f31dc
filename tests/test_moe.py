"""Mixture-of-Experts: routing computes the mixture it should, capacity drops what it should,
the router losses have their published values, and every mesh with an `expert` axis gives the
losses of one device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jaxpr_equations, tiny_config
from flax import nnx

from engine.config import ConfigError, ModelConfig, validate
from engine.optim import OptimConfig
from engine.plan import Plan, violations
from engine.trainer import flops_per_token, setup, train
from models import LLAMA_PRESETS, LlamaConfig, MoEConfig
from models.moe import MoE, route, router_losses, swiglu_batched, swiglu_grouped
from sharding import DEFAULT_RULES, axis_rules, make_mesh, route_to_experts, tree_shardings

STEPS = 4
TINY_MOE = ModelConfig.of(LLAMA_PRESETS["tiny_moe"])


def moe_config(run_dir, mesh=None, **overrides):
    overrides.setdefault("model", TINY_MOE)
    overrides.setdefault("steps", STEPS)
    return tiny_config(run_dir, mesh, **overrides)


def losses(records, key="loss"):
    return np.array([r[key] for r in records])


# ---------------------------------------------------------------- routing


def one_by_one(block: MoE, h):
    """Every token through each of its top-k experts in turn, weighted: the definition."""
    logits = jnp.einsum("btd,de->bte", h, block.router[...])
    _, weights, experts = route(logits, block.cfg.top_k, block.cfg.norm_topk)
    out = jnp.zeros_like(h)
    for b, t in np.ndindex(*h.shape[:2]):
        for j in range(block.cfg.top_k):
            e = int(experts[b, t, j])
            hidden = jax.nn.silu(h[b, t] @ block.w_gate[e]) * (h[b, t] @ block.w_up[e])
            out = out.at[b, t].add(weights[b, t, j] * (hidden @ block.w_down[e]))
    return out


def block_and_input(**moe):
    arch = LlamaConfig(d_model=16, d_ff=24, n_layers=2, moe=MoEConfig(experts=4, **moe))
    h = jax.random.normal(jax.random.key(1), (8, 6, 16))
    return MoE(arch, nnx.Rngs(0)), h


@pytest.mark.parametrize(
    "mesh", [None, dict(expert=4), dict(data=2, expert=4), dict(fsdp=2, expert=2, tensor=2)],
    ids=["one-device", "expert4", "data2xexpert4", "fsdp2xexpert2xtensor2"],
)  # fmt: skip
@pytest.mark.parametrize("norm_topk", [True, False], ids=["mixtral", "qwen3-moe"])
def test_dropless_routing_is_the_mixture_of_each_tokens_top_k(mesh, norm_topk):
    block, h = block_and_input(top_k=2, norm_topk=norm_topk)
    want = one_by_one(block, h)
    if mesh is None:
        got, aux = block(h)
    else:
        graphdef, state = nnx.split(block)
        device_mesh = make_mesh({"data": 1, **mesh}, jax.devices()[: np.prod(list(mesh.values()))])
        state = jax.device_put(state, tree_shardings(state, device_mesh, DEFAULT_RULES))

        @jax.jit
        def run(state, h):
            with axis_rules(DEFAULT_RULES):
                return nnx.merge(graphdef, state)(h)

        with jax.set_mesh(device_mesh):
            got, aux = run(state, h)
        shards = state["w_gate"][...].addressable_shards
        assert shards[0].data.shape[0] == 4 // mesh.get("expert", 1)  # whole experts each
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert float(aux["moe_dropped"]) == 0


def test_dropless_gradient_moves_token_rows_without_summing_scatters():
    """A token's k copies reach the experts by a repeat and a permutation: the backward sums
    the copies and scatters each row once. A gather of repeated rows would scatter-add k rows
    into each token (contended atomics on a GPU, compare-and-swap loops in bf16)."""
    block, h = block_and_input(top_k=2)
    graphdef, state = nnx.split(block)

    def loss(state, h):
        return nnx.merge(graphdef, state)(h)[0].sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(state, h).jaxpr
    rows = [
        e for e in jaxpr_equations(jaxpr)
        if "scatter" in e.primitive.name and e.invars[-1].aval.shape[-1] == h.shape[-1]
    ]  # fmt: skip
    assert len(rows) >= 2  # the forward's un-permute and the backward's permutation
    assert [e.primitive.name for e in rows if not e.params["unique_indices"]] == []
    _, grad_h = jax.grad(loss, argnums=(0, 1))(state, h)
    eps = 1e-3  # and the gradient is the function's: a central difference along h
    direction = jax.random.normal(jax.random.key(2), h.shape)
    numeric = (loss(state, h + eps * direction) - loss(state, h - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(jnp.vdot(grad_h, direction), numeric, rtol=1e-3)


def identity_experts(num_experts):
    """Expert e multiplies by e + 1, so the output says which expert a token went through."""
    scale = jnp.arange(1.0, num_experts + 1)
    grouped = lambda w, rows, sizes: (
        rows * jnp.repeat(w[0], sizes, total_repeat_length=rows.shape[0])[:, None]
    )  # noqa: E501, E731
    batched = lambda w, slots: slots * w[0][:, None, None]  # noqa: E731
    return (scale,), grouped, batched


def test_capacity_keeps_first_choices_first_and_drops_the_overflow():
    """One sequence of 4 tokens, 2 experts, capacity 2 per expert: expert 0 is every token's
    first choice, so tokens 2 and 3 lose it; their second choice (expert 1) fits since first
    choices (token 3's) claim before second choices."""
    x = jnp.arange(1.0, 5.0)[None, :, None]  # [1, 4, 1]
    experts = jnp.array([[[0, 1], [0, 1], [0, 1], [1, 0]]])
    gates = jnp.full((1, 4, 2), 0.5)
    weights, grouped, batched = identity_experts(2)
    y, dropped = route_to_experts(x, experts, gates, weights, (("expert",),), grouped, batched,
                                  capacity=2)  # fmt: skip
    # Slots: expert 0 <- tokens 0, 1 (first choices); expert 1 <- token 3 (first), then token 0
    # (second). Token 1's second choice, token 2's both and token 3's second are dropped.
    kept = np.array([[1, 1], [1, 0], [0, 0], [1, 0]])  # per (token, choice)
    scale = np.array([[1, 2], [1, 2], [1, 2], [2, 1]])
    want = (np.arange(1.0, 5.0)[:, None] * scale * kept * 0.5).sum(1)
    np.testing.assert_allclose(y[0, :, 0], want)
    assert float(dropped) == 4
    # Dropless routes the same assignments through the grouped path with nothing lost.
    y_all, none = route_to_experts(x, experts, gates, weights, (("expert",),), grouped, batched)
    np.testing.assert_allclose(y_all[0, :, 0], (np.arange(1.0, 5.0)[:, None] * scale * 0.5).sum(1))
    assert float(none) == 0


def test_capacity_large_enough_drops_nothing_and_matches_dropless():
    block, h = block_and_input(top_k=2, capacity_factor=2.0)  # 2 x 6 x 2 / 4 = 6 = length
    np.testing.assert_allclose(block(h)[0], one_by_one(block, h), atol=1e-5)
    tight, _ = block_and_input(top_k=2, capacity_factor=0.5)
    _, aux = tight(h)
    assert 0 < float(aux["moe_dropped"]) < 1


def test_grouped_and_batched_expert_functions_agree():
    block, h = block_and_input(top_k=1)
    weights = (block.w_gate[...], block.w_up[...], block.w_down[...])
    rows = h.reshape(-1, 16)[:12]
    sizes = jnp.array([3, 3, 3, 3])
    grouped = swiglu_grouped(weights, rows, sizes)
    batched = swiglu_batched(weights, rows.reshape(4, 3, 16)).reshape(12, 16)
    np.testing.assert_allclose(grouped, batched, atol=1e-6)


# ---------------------------------------------------------------- losses


def test_router_losses_have_their_published_values():
    """Two tokens, two experts, top-1. Token 0: logits (0, 0) -> p = (.5, .5), picks expert 0
    (ties go to the lower index); token 1: (ln 3, 0) -> p = (.75, .25), picks expert 0.
    Switch: E * sum_e f_e P_e = 2 * (1 * .625 + 0 * .375) = 1.25.
    z-loss: mean(logsumexp^2) = ((ln 2)^2 + (ln 4)^2) / 2."""
    logits = jnp.array([[[0.0, 0.0], [np.log(3.0), 0.0]]])
    probs, _, experts = route(logits, 1, True)
    aux = router_losses(logits, probs, experts, 2)
    assert float(aux["moe_aux_loss"]) == pytest.approx(1.25)
    assert float(aux["moe_z_loss"]) == pytest.approx((np.log(2) ** 2 + np.log(4) ** 2) / 2)
    assert float(aux["moe_load_max"]) == pytest.approx(2.0)  # all load on one of two experts
    # Perfectly balanced routing scores 1, whatever E and k.
    uniform = jnp.zeros((1, 8, 4))
    balanced = jnp.array([[[0, 1], [2, 3]] * 4])
    aux = router_losses(uniform, jax.nn.softmax(uniform), balanced, 4)
    assert float(aux["moe_aux_loss"]) == pytest.approx(1.0)
    assert float(aux["moe_load_max"]) == pytest.approx(1.0)


def test_losses_and_load_are_logged_and_the_aux_loss_is_in_the_gradient(tmp_path):
    one = jax.devices()[:1]
    records = train(moe_config(tmp_path / "a", dict(data=1)), one)
    for key in ("moe_aux_loss", "moe_z_loss", "moe_load_max", "moe_dropped"):
        assert key in records[-1] and np.isfinite(records[-1][key])
    heavy = dataclasses.replace(
        TINY_MOE, moe=dataclasses.replace(TINY_MOE.moe, aux_loss_weight=10.0)
    )
    weighted = train(moe_config(tmp_path / "b", dict(data=1), model=heavy), one)
    # The training loss reported is the cross-entropy either way; the weight moves the params.
    assert records[0]["loss"] == weighted[0]["loss"]
    assert records[-1]["loss"] != weighted[-1]["loss"]
    assert weighted[-1]["moe_aux_loss"] < records[-1]["moe_aux_loss"]


def test_flops_count_active_experts_and_match_xla_when_dense_equivalent(tmp_path):
    """One expert, top-1, no router weight counted twice: the MoE's FLOPs are the dense
    model's plus the router; XLA's count of the train step agrees."""
    base = dataclasses.replace(LLAMA_PRESETS["small"], n_layers=1)
    moe = dataclasses.replace(base, moe=MoEConfig(experts=1, top_k=1))
    assert moe.matmul_params() == base.matmul_params() + base.d_model
    data = dataclasses.replace(tiny_config(tmp_path).data, seq_len=256)
    cfg = tiny_config(tmp_path, dict(data=1), model=ModelConfig.of(moe), batch_size=8, data=data)
    run = setup(cfg, devices=jax.devices()[:1], init=False, evaluate=False)
    cost = run.train_step.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    xla_per_token = cost["flops"] / (cfg.batch_size * cfg.data.seq_len)
    masked_half = 6 * cfg.data.seq_len * moe.n_heads * moe.head_dim
    assert xla_per_token == pytest.approx(flops_per_token(cfg) + masked_half, rel=0.05)
    eight = dataclasses.replace(moe, moe=MoEConfig(experts=8, top_k=2))
    expert = 3 * moe.d_model * moe.d_ff
    assert eight.matmul_params() == base.matmul_params() + expert + 8 * moe.d_model
    assert eight.num_params() - base.num_params() == 7 * expert + 8 * moe.d_model


# ---------------------------------------------------------------- parallelism


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    return losses(train(moe_config(tmp_path_factory.mktemp("one")), jax.devices()[:1]))


MESHES = [
    dict(expert=8),
    dict(data=2, expert=4),
    dict(fsdp=2, expert=2, tensor=2),
    dict(pipeline=2, expert=4),
    dict(data=2, context=2, expert=2),  # tokens split along the length reach their experts
]


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(f"{k}{v}" for k, v in m.items()))
def test_expert_meshes_match_one_device(tmp_path, mesh, one_device):
    got = losses(train(moe_config(tmp_path, mesh)))
    assert one_device[-1] < one_device[0] - 0.1  # it learns, so equality means something
    np.testing.assert_allclose(got, one_device, rtol=1e-5)


def test_accumulation_with_experts_matches_one_device(tmp_path, one_device):
    optim = OptimConfig(lr=3e-3, warmup_steps=50, microbatches=2)
    accumulated = losses(train(moe_config(tmp_path, dict(data=2, expert=4), optim=optim)))
    np.testing.assert_allclose(accumulated, one_device, rtol=1e-5)


def test_every_other_layer_moe_trains_the_same_on_an_expert_mesh(tmp_path):
    model = dataclasses.replace(TINY_MOE, moe=dataclasses.replace(TINY_MOE.moe, every=2))
    one = losses(train(moe_config(tmp_path / "one", model=model, steps=3), jax.devices()[:1]))
    from engine.callbacks import Callback

    class Shapes(Callback):
        def on_start(self, trainer):
            layers = trainer.run.state.params["layers"]
            # [groups, dense layers per group, ...] and [groups, experts, ...] split 4 ways.
            assert layers["dense"]["mlp"]["w_gate"][...].shape == (1, 1, 64, 128)
            moe = layers["moe"]["mlp"]["w_gate"][...]
            assert moe.shape == (1, 8, 64, 64)
            assert {s.data.shape for s in moe.addressable_shards} == {(1, 2, 64, 64)}
            self.checked = True

    shapes = Shapes()
    cfg = moe_config(tmp_path / "ep", dict(data=2, expert=4), model=model, steps=3)
    got = losses(train(cfg, callbacks=[shapes]))
    assert shapes.checked
    np.testing.assert_allclose(got, one, rtol=1e-5)


def test_expert_weights_and_adam_moments_are_split_by_expert_fsdp_and_tensor(tmp_path):
    run = setup(moe_config(tmp_path, dict(fsdp=2, expert=2, tensor=2)))
    mlp = run.state.params["layers"]["mlp"]
    # [layers, experts, d_model, d_ff]: experts over `expert`, d_model over fsdp, d_ff over tensor.
    want = {"w_gate": (2, 4, 32, 32), "w_up": (2, 4, 32, 32), "w_down": (2, 4, 32, 32)}
    adam = run.state.opt_state[0]  # (ScaleByAdamState, ...) per optax.chain
    for name, shape in want.items():
        for tree in (mlp, adam.mu["layers"]["mlp"], adam.nu["layers"]["mlp"]):
            shards = {s.data.shape for s in tree[name][...].addressable_shards}
            assert shards == {shape}, (name, shards)
    assert {s.data.shape for s in mlp["router"][...].addressable_shards} == {(2, 32, 8)}


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "moe, message",
    [
        (dict(top_k=9), "--model.moe.top_k=9 must be between 1 and --model.moe.experts=8"),
        (dict(capacity_factor=0.0), "--model.moe.capacity_factor=0.0 must be positive"),
        (dict(every=3), "--model.moe.every=3 does not divide --model.n_layers=2"),
    ],
)
def test_bad_moe_settings_get_one_sentence(tmp_path, moe, message):
    model = dataclasses.replace(TINY_MOE, moe=dataclasses.replace(TINY_MOE.moe, **moe))
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("+", r"\+")):
        validate(moe_config(tmp_path, model=model))


def test_experts_not_divisible_by_the_expert_axis_is_one_sentence(tmp_path):
    model = dataclasses.replace(TINY_MOE, moe=dataclasses.replace(TINY_MOE.moe, experts=6))
    cfg = moe_config(tmp_path, dict(data=2, expert=4), model=model)
    errors = violations(cfg, Plan.from_config(cfg), 8, "cpu")
    assert str(errors[0]).startswith("--model.moe.experts=6 is not divisible by --mesh.expert=4")
    dense = tiny_config(tmp_path, dict(data=2, expert=4))
    (error,) = violations(dense, Plan.from_config(dense), 8, "cpu")
    assert "this model has none" in str(error)


def test_resume_onto_another_expert_size(tmp_path, one_device):
    """Checkpoints hold whole experts in one layout: a run saved on expert=4 resumes on
    expert=2 x tensor=2 with the losses of one uninterrupted device."""
    from engine.callbacks import Callback

    class StopAfter2(Callback):
        def on_step(self, trainer, record):
            if record["step"] == 2:
                trainer.stop_reason = "stopped after step 2 for the test"

    keep = dataclasses.replace(tiny_config(tmp_path).checkpoint, final=True)
    first = train(moe_config(tmp_path, dict(data=2, expert=4), checkpoint=keep),
                  callbacks=[StopAfter2()])  # fmt: skip
    rest = train(moe_config(tmp_path, dict(data=2, expert=2, tensor=2), checkpoint=keep))
    assert [r["step"] for r in rest] == [3, 4]
    np.testing.assert_allclose(losses(first + rest), one_device, rtol=1e-5)


def test_bf16_moe_tracks_fp32_on_data_and_expert_meshes(tmp_path, one_device):
    for mesh in (dict(data=8), dict(data=2, expert=4)):
        name = "x".join(map(str, mesh.values()))
        bf16 = losses(train(moe_config(tmp_path / name, mesh, precision="bf16")))
        assert np.all(np.isfinite(bf16))
        np.testing.assert_allclose(bf16, one_device, rtol=0.03)


def test_the_planner_prices_the_expert_all_to_all_by_routing(tmp_path):
    """Dropless send buffers hold every copy per peer, so the planner charges ep x the
    capacity path's all-to-all bytes (at capacity factor 1) and the expert axis costs time."""
    from engine.autoplan import target_for, workload
    from sharding.planner import Candidate, estimate

    target = target_for("h100", 8)
    seconds = {}
    for factor in (None, 1.0):
        model = dataclasses.replace(
            TINY_MOE, moe=dataclasses.replace(TINY_MOE.moe, capacity_factor=factor)
        )
        cfg = moe_config(tmp_path, model=model)
        plan = Plan.from_config(cfg)
        load = workload(cfg, plan)
        assert (load.moe_layers, load.routed, load.dropless) == (2, 2.0, factor is None)
        est = estimate(load, Candidate({"expert": 8}, "none"), target, plan.rules, "fp32")
        seconds[factor] = est.times_s["expert"]
        assert "expert" not in estimate(load, Candidate({"data": 8}, "none"), target,
                                        plan.rules, "fp32").times_s  # fmt: skip
    assert seconds[None] > seconds[1.0] > 0


def test_generation_from_a_cache_equals_recomputing_with_grouped_layers():
    """every=2 stacks (dense, MoE) pairs: the KV cache is split per group and rejoined."""
    from engine.generate import Sampling, generate
    from models import Llama

    arch = dataclasses.replace(
        LLAMA_PRESETS["tiny_moe"], n_layers=4, moe=dataclasses.replace(TINY_MOE.moe, every=2)
    )
    model = Llama(arch, nnx.Rngs(0))
    prompt = np.random.default_rng(0).integers(1, 256, (2, 5))
    cached = generate(model, prompt, Sampling(max_new_tokens=6))
    np.testing.assert_array_equal(cached, generate(model, prompt, Sampling(6), use_cache=False))
