"""Meshes, the rule table, and where each parameter's shards actually land."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from engine.trainer import setup
from sharding import DEFAULT_RULES, MeshConfig, ShardingError, logical_to_spec, make_mesh


def test_minus_one_fills_the_remaining_devices():
    assert MeshConfig(data=-1, tensor=2).resolve(8) == dict(data=4, fsdp=1, tensor=2, pipeline=1)
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


# tiny: vocab 256, d_model 64, 2 layers, 8 heads, 4 kv heads, head_dim 8, d_ff 128.
# Expected per-device shard shapes, written out by hand from the rule table.
EXPECTED = {
    "data8": (
        dict(data=8),
        {"embed": (256, 64), "head": (64, 256), "wq": (2, 64, 8, 8), "w_down": (2, 128, 64)},
    ),
    "fsdp8": (
        dict(fsdp=8),
        {"embed": (256, 8), "head": (8, 256), "wq": (2, 8, 8, 8), "w_down": (2, 128, 8)},
    ),
    "data2_tensor4": (
        dict(data=2, tensor=4),
        {"embed": (64, 64), "head": (64, 64), "wq": (2, 64, 2, 8), "w_down": (2, 32, 64)},
    ),
    "data2_fsdp2_tensor2": (
        dict(data=2, fsdp=2, tensor=2),
        {"embed": (128, 32), "head": (32, 128), "wq": (2, 32, 4, 8), "w_down": (2, 64, 32)},
    ),
}


@pytest.mark.parametrize("name", EXPECTED)
def test_parameter_shards_follow_the_rules(name, tiny):
    mesh, expected = EXPECTED[name]
    run = setup(tiny(mesh=mesh))
    params = run.state.params
    leaves = {
        "embed": params["embed"],
        "head": params["head"],
        "wq": params["layers"]["wq"],
        "w_down": params["layers"]["w_down"],
    }
    mu = run.state.opt_state[0].mu  # adamw's first moment mirrors the params
    for key, want in expected.items():
        assert leaves[key][...].addressable_shards[0].data.shape == want, key
        assert len(leaves[key][...].addressable_shards) == 8
    assert mu["layers"]["wq"][...].addressable_shards[0].data.shape == expected["wq"]
    # Norm scales are ("embed",): split over fsdp only.
    scale = params["layers"]["attn_norm"]["scale"][...]
    fsdp = mesh.get("fsdp", 1)
    assert scale.addressable_shards[0].data.shape == (2, 64 // fsdp)


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
