"""Pluggable pieces: q/k norm and q/k/v biases on every mesh, rule tables from keys and files,
and Hugging Face name templates indexed by layer and expert."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from engine import hf
from engine.config import ConfigError
from engine.plan import rule_table
from engine.trainer import Trainer, setup, train
from models.registry import FAMILIES, ModelFamily, register
from sharding import RULE_PRESETS


def losses(records):
    return np.array([r["loss"] for r in records])


def test_qk_norm_and_qkv_bias_train_alike_on_every_mesh(tiny):
    model = dataclasses.replace(tiny().model, qk_norm=True, qkv_bias=True)
    one = losses(train(tiny(mesh=dict(data=1), steps=3, model=model), jax.devices()[:1]))
    cfg = tiny(mesh=dict(data=2, fsdp=2, tensor=2), steps=3, model=model)
    run = setup(cfg)
    layer = run.state.params["layers"]
    # Biases split by head over tensor, the norms' head_dim stays whole.
    assert {s.data.shape for s in layer["bq"][...].addressable_shards} == {(2, 4, 8)}
    assert {s.data.shape for s in layer["q_norm"]["scale"][...].addressable_shards} == {(2, 8)}
    sharded = losses(Trainer(cfg, run=run).fit())  # the run above, not a second compile
    np.testing.assert_allclose(sharded, one, rtol=1e-5)
    plain = losses(train(tiny(mesh=dict(data=1), steps=3), jax.devices()[:1]))
    assert np.abs(plain - one).max() > 1e-4  # the norms changed the computation


def test_rule_overrides_from_keys_and_files(tiny, tmp_path):
    assert rule_table("default", ("embed=",)) == RULE_PRESETS["no_zero3"]
    (tmp_path / "rules.yaml").write_text("embed: []\nvocab: [tensor]\n")
    assert dict(rule_table(str(tmp_path / "rules.yaml"))) == dict(RULE_PRESETS["no_zero3"])
    # The override reaches the params: embed whole, where the default splits it over fsdp.
    run = setup(tiny(mesh=dict(fsdp=8), rule_overrides=("embed=",)), init=False, evaluate=False)
    wq = run.state_shardings.params["layers"]["wq"].get_value()
    assert wq.shard_shape((2, 64, 8, 8)) == (2, 64, 8, 8)
    with pytest.raises(ConfigError, match="'embed' maps to unknown mesh axis fdsp"):
        rule_table("default", ("embed=fdsp",))
    with pytest.raises(ConfigError, match="entry 'embed' is not NAME=AXIS,AXIS"):
        rule_table("default", ("embed",))
    with pytest.raises(ConfigError, match="--rules=zero9 is neither a rule preset"):
        rule_table("zero9")


class Experts(nnx.Module):
    """Stand-in for an MoE family: weights stacked over layers and experts."""

    def __init__(self, arch, rngs, **plan):
        value = jax.random.normal(rngs.params(), (arch.layers, arch.experts, 4, 6))
        self.w = nnx.Param(value, out_sharding=("layers", "expert", "embed", "mlp"))


@dataclasses.dataclass(frozen=True)
class ExpertsConfig:
    layers: int = 2
    experts: int = 3


def test_tensor_names_are_indexed_by_layer_and_expert(tmp_path):
    family = ModelFamily(
        "toy_moe", ExpertsConfig, Experts, lambda a, t: 0.0,
        from_hf=lambda c, where: ExpertsConfig(c["num_layers"], c["num_experts"]),
        to_hf=lambda a, dtype: {"model_type": "toy_moe", "num_layers": a.layers,
                                "num_experts": a.experts},
        tensors={("w",): ("model.layers.{layer}.experts.{expert}.w.weight",
                          lambda w, a: w.T, lambda w, a: w.T)},
    )  # fmt: skip
    register(family)
    try:
        arch = ExpertsConfig()
        params = nnx.to_pure_dict(nnx.state(Experts(arch, nnx.Rngs(0))))
        names = sorted(hf.hf_tensors(params, arch))
        assert names == [
            f"model.layers.{i}.experts.{e}.w.weight" for i in (0, 1) for e in (0, 1, 2)
        ]
        out = hf.save_params(params, arch, tmp_path / "toy")
        ckpt = hf.Checkpoint(out)
        np.testing.assert_array_equal(
            ckpt.get("model.layers.1.experts.2.w.weight", (6, 4)), np.asarray(params["w"][1, 2]).T
        )
        loaded = hf.load(out)  # the registry finds the family by model_type
        np.testing.assert_array_equal(loaded.w[...], params["w"])
    finally:
        del FAMILIES["toy_moe"]


def test_an_unregistered_model_type_names_the_registered_ones(tmp_path):
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported; shardtrain imports"):
        hf.family_of({"model_type": "gpt2"})
