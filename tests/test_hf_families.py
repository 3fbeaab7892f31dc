"""Qwen2, Qwen3, Mixtral and Qwen3-MoE against `transformers` itself (CPU torch, fp32): logits,
bitwise bf16 round trips, greedy generation, expert-parallel loading, and one-sentence errors
for what shardtrain does not have."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_same_hf_tensors, torch_logits

from engine import hf
from engine.config import ConfigError
from engine.generate import Sampling, generate
from sharding import make_mesh

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=8, num_key_value_heads=2, head_dim=16, rope_theta=1e4,
              eos_token_id=None, bos_token_id=None, pad_token_id=0)  # fmt: skip
FAMILIES = {
    "qwen2": ("Qwen2", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3", {}),
    "mixtral": ("Mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": ("Qwen3Moe", {"num_experts": 4, "num_experts_per_tok": 2,
                               "moe_intermediate_size": 32, "norm_topk_prob": False,
                               "tie_word_embeddings": True}),
}  # fmt: skip
TOKENS = np.random.default_rng(0).integers(1, 96, (2, 40))  # 0 is the pad id


def hf_model(path, kind, dtype=None, **overrides):
    """A random tiny transformers model of `kind` saved to `path`: (model, path)."""
    torch.manual_seed(0)
    prefix, extra = FAMILIES[kind]
    config = getattr(transformers, f"{prefix}Config")(**{**COMMON, **extra, **overrides})
    model = getattr(transformers, f"{prefix}ForCausalLM")(config)
    with torch.no_grad():  # random biases and norms, so that a dropped one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model = model.to(dtype or torch.float32).eval()
    model.save_pretrained(path)
    return model, path


@pytest.mark.parametrize("kind", FAMILIES)
def test_logits_and_greedy_generation_match_transformers(tmp_path, kind):
    model, path = hf_model(tmp_path / "hf", kind)
    ours = hf.load(path)
    want = torch_logits(model, TOKENS)
    got = np.asarray(ours(jnp.asarray(TOKENS)))
    assert np.abs(got - want).max() <= 1e-4
    prompt = TOKENS[:, :7]
    with torch.no_grad():
        greedy = model.generate(torch.tensor(prompt), max_new_tokens=16, do_sample=False)
    np.testing.assert_array_equal(generate(ours, prompt, Sampling(max_new_tokens=16)), greedy)


@pytest.mark.parametrize("kind", FAMILIES)
def test_bf16_round_trip_is_bitwise_and_transformers_loads_the_export(tmp_path, kind):
    model, path = hf_model(tmp_path / "hf", kind, dtype=torch.bfloat16)
    out = hf.save(hf.load(path), tmp_path / "out", dtype="bfloat16")
    assert_same_hf_tensors(path, out)
    assert json.loads((out / "config.json").read_text())["model_type"] == kind
    cls = getattr(transformers, f"{FAMILIES[kind][0]}ForCausalLM")
    # Both loaded by transformers the same way (`.to(bf16)` would also round rotary buffers).
    back, original = cls.from_pretrained(out).eval(), cls.from_pretrained(path).eval()
    assert back.dtype == original.dtype == torch.bfloat16
    np.testing.assert_array_equal(torch_logits(back, TOKENS), torch_logits(original, TOKENS))


def test_mixtral_loads_onto_an_expert_mesh_whole_experts_per_device(tmp_path):
    model, path = hf_model(tmp_path / "hf", "mixtral")
    mesh = make_mesh({"expert": 4, "data": 2})
    ours = hf.load(path, mesh=mesh)
    w1 = ours.layers.mlp.w_gate[...]
    assert w1.shape == (2, 4, 64, 96)
    assert {s.data.shape for s in w1.addressable_shards} == {(2, 1, 64, 96)}
    with jax.set_mesh(mesh):
        got = np.asarray(jax.jit(lambda m, t: m(t))(ours, jnp.asarray(TOKENS)))
    assert np.abs(got - torch_logits(model, TOKENS)).max() <= 1e-4


@pytest.mark.parametrize(
    "kind, change, message",
    [
        ("qwen3_moe", {"mlp_only_layers": [0]}, "mlp_only_layers=[0] is not supported"),
        ("qwen3_moe", {"decoder_sparse_step": 2}, "decoder_sparse_step=2 is not supported"),
        ("mixtral", {"sliding_window": 4096}, "sliding_window=4096 is not supported"),
        ("qwen3", {"attention_bias": True}, "attention_bias=True is not supported"),
        ("qwen3_moe", {"model_type": "deepseek_v3"}, "model_type 'deepseek_v3' is not supported"),
    ],
)  # fmt: skip
def test_unsupported_features_name_their_field(tmp_path, kind, change, message):
    _, path = hf_model(tmp_path / "hf", kind)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        hf.load(path)


def test_an_architecture_no_family_holds_is_refused_on_export(tmp_path):
    from flax import nnx

    from models import LLAMA_PRESETS, Llama

    arch = LLAMA_PRESETS["tiny_moe"]
    grouped = Llama(arch.__class__(**{**arch.__dict__, "n_layers": 2}), nnx.Rngs(0))
    assert hf.save(grouped, tmp_path / "ok").is_dir()  # all-MoE, renormalized: Mixtral
    import dataclasses

    every = dataclasses.replace(arch, n_layers=4, moe=dataclasses.replace(arch.moe, every=2))
    with pytest.raises(ConfigError, match="No Hugging Face model type holds"):
        hf.save(Llama(every, nnx.Rngs(0)), tmp_path / "no")
