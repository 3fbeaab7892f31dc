"""Meshes, the rule table, and where each parameter's shards actually land."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from engine.metrics import planned_memory_gb
from engine.trainer import setup
from sharding import (
    DEFAULT_RULES,
    MeshConfig,
    ShardingError,
    layout,
    logical_to_spec,
    make_mesh,
)


def test_minus_one_fills_the_remaining_devices():
    assert MeshConfig(data=-1, tensor=2).resolve(8) == dict(
        expert=1, data=4, fsdp=1, context=1, tensor=2, pipeline=1
    )
    assert MeshConfig(data=2, fsdp=-1, tensor=2).resolve(8)["fsdp"] == 2


@pytest.mark.parametrize(
    "mesh, message",
    [
        (MeshConfig(data=3), "needs 3 devices but the run has 8"),
        (MeshConfig(data=0), "--mesh.data=0 is not a valid mesh size"),
        (MeshConfig(data=2, tensor=-2), "--mesh.tensor=-2 is not a valid mesh size"),
        (MeshConfig(data=-1, fsdp=-1), "Only one mesh axis may be -1"),
        (MeshConfig(data=-1, tensor=3), "does not divide the 8 available"),
    ],
)
def test_bad_meshes_are_named(mesh, message):
    with pytest.raises(ShardingError, match=message):
        make_mesh(mesh)


def test_rules_give_each_mesh_axis_to_one_dimension():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    # Weights: embed over fsdp (ZeRO-3), mlp over tensor.
    assert logical_to_spec(("embed", "mlp"), DEFAULT_RULES, mesh) == P("fsdp", "tensor")
    # Activations: batch takes data and fsdp, so embed stays whole.
    assert logical_to_spec(("batch", "length", "embed"), DEFAULT_RULES, mesh) == P(
        ("data", "fsdp"), None, None
    )
    # Size-1 mesh axes are dropped; unknown names are replicated.
    mesh = make_mesh(MeshConfig(data=8))
    assert logical_to_spec(("embed", "mlp", "nonsense"), DEFAULT_RULES, mesh) == P(None, None, None)


def expected_shards(f: int, t: int) -> dict:
    """Per-device shapes of every `tiny` parameter, written out by hand from the rule table for
    fsdp size `f` and tensor size `t` (vocab 256, d_model 64, 2 layers, 8 heads, 4 kv heads,
    head_dim 8, d_ff 128): embed over fsdp; vocab, heads, kv_heads, mlp over tensor."""
    return {
        ("embed",): (256 // t, 64 // f),
        ("head",): (64 // f, 256 // t),
        ("final_norm", "scale"): (64 // f,),
        ("layers", "attn_norm", "scale"): (2, 64 // f),
        ("layers", "mlp_norm", "scale"): (2, 64 // f),
        ("layers", "wq"): (2, 64 // f, 8 // t, 8),
        ("layers", "wk"): (2, 64 // f, 4 // t, 8),
        ("layers", "wv"): (2, 64 // f, 4 // t, 8),
        ("layers", "wo"): (2, 8 // t, 8, 64 // f),
        ("layers", "mlp", "w_gate"): (2, 64 // f, 128 // t),
        ("layers", "mlp", "w_up"): (2, 64 // f, 128 // t),
        ("layers", "mlp", "w_down"): (2, 128 // t, 64 // f),
    }


def _shard_shapes(tree) -> dict:
    flat = jax.tree_util.tree_leaves_with_path(tree)
    return {
        tuple(k.key for k in path if hasattr(k, "key")): leaf.addressable_shards[0].data.shape
        for path, leaf in flat
    }


@pytest.mark.parametrize(
    "mesh",
    [dict(data=8), dict(fsdp=8), dict(data=2, tensor=4), dict(data=2, fsdp=2, tensor=2)],
    ids=lambda m: "x".join(f"{k}{v}" for k, v in m.items()),
)
def test_every_parameter_and_moment_is_sharded_as_the_rules_say(mesh, tiny):
    run = setup(tiny(mesh=mesh))
    want = expected_shards(mesh.get("fsdp", 1), mesh.get("tensor", 1))
    adam = run.state.opt_state[0]
    for tree in (run.state.params, adam.mu, adam.nu):
        assert _shard_shapes(tree) == want
        assert all(len(x.addressable_shards) == 8 for x in jax.tree.leaves(tree))
    # sharding.layout prints the same blocks, with each dimension's name and mesh axes.
    header, *rows = [line.split("  ") for line in layout(run.state.params).splitlines()]
    rows = {r[0]: [c.strip() for c in r[1:] if c.strip()] for r in rows}
    assert header[0] == "array" and len(rows) == len(want)
    for path, shape in want.items():
        assert rows[".".join(path)][-1] == "x".join(map(str, shape))
    names, axes = rows["layers.wk"][1:3]
    assert names == "layers, embed, kv_heads, head_dim"
    assert (
        axes
        == f"-, {'fsdp' if 'fsdp' in mesh else '-'}, {'tensor' if 'tensor' in mesh else '-'}, -"
    )


def test_indivisible_dimension_names_parameter_and_axis(tiny):
    # 4 kv heads cannot split 8 ways.
    with pytest.raises(ShardingError, match=r"wk.*kv_heads', size 4.*--mesh.tensor=8"):
        setup(tiny(mesh=dict(tensor=8)))


def test_batch_is_split_over_data_and_fsdp(tiny):
    run = setup(tiny(mesh=dict(data=2, fsdp=2, tensor=2)))
    batch = run.put_batch(run.task.train_batch(0))
    assert batch["inputs"].shape == (16, 64)
    assert batch["inputs"].addressable_shards[0].data.shape == (4, 64)
    assert jax.device_count() == 8


def test_memory_plan_shows_fsdp_splitting_the_state(tiny):
    """The header's 'step needs X GB/device' is XLA's plan of the compiled step: FSDP over 8
    holds 1/8 of params and AdamW moments where data parallelism holds them whole (same
    rows per device), so the plan shrinks by about 7/8 of the state."""
    plans, state = {}, None
    for name in ("data", "fsdp"):
        run = setup(tiny(mesh={name: 8}), init=False, evaluate=False)
        plans[name] = planned_memory_gb(run.train_step) * 1e9
        state = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(run.state))
    saved = plans["data"] - plans["fsdp"]
    assert 0.7 * state * 7 / 8 < saved < 2.2 * state, (plans, state)
