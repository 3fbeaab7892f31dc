"""Hugging Face interop against `transformers` itself (CPU torch, fp32): logits, round trips,
greedy generation, sharded loading, and clear errors for what shardtrain's Llama does not have."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, assert_same_hf_tensors, torch_logits

from engine import hf
from engine.config import ConfigError
from engine.generate import Sampling, generate
from sharding import MeshConfig, make_mesh

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # fmt: skip


def hf_model(path, dtype=None, **overrides):
    """A random tiny transformers Llama saved to `path`: (model, path)."""
    torch.manual_seed(0)
    shard = overrides.pop("shard", "5GB")
    config = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=16, rope_theta=1e4,
                  eos_token_id=None, bos_token_id=None, pad_token_id=0)  # fmt: skip
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**config, **overrides}))
    model = model.to(dtype or torch.float32).eval()
    model.save_pretrained(path, max_shard_size=shard)
    return model, path


TOKENS = np.random.default_rng(0).integers(0, 96, (2, 48))


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_word_embeddings": True}, {"rope_scaling": LLAMA3_ROPE, "rope_theta": 5e5},
     {"num_key_value_heads": 8}],
    ids=["gqa", "tied", "llama3-rope", "mha"],
)  # fmt: skip
def test_logits_match_transformers(tmp_path, overrides):
    model, path = hf_model(tmp_path / "hf", **overrides)
    ours = hf.load(path)
    got = np.asarray(ours(jnp.asarray(TOKENS)))
    want = torch_logits(model, TOKENS)
    assert got.shape == (2, 48, 96)
    assert np.abs(got - want).max() <= 1e-4
    if "rope_scaling" in overrides:  # the scaling is really applied: without it, logits differ
        config = json.loads((path / "config.json").read_text())
        config.pop("rope_scaling", None)
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
        (path / "config.json").write_text(json.dumps(config))
        plain = np.asarray(hf.load(path)(jnp.asarray(TOKENS)))
        assert np.abs(plain - want).max() > 1e-3


def test_round_trip_is_bitwise_and_transformers_loads_the_export(tmp_path):
    model, path = hf_model(tmp_path / "hf", dtype=torch.bfloat16, shard="60KB")
    assert (path / "model.safetensors.index.json").exists()  # a sharded checkpoint
    ours = hf.load(path)
    out = hf.save(ours, tmp_path / "out", dtype="bfloat16")
    assert_same_hf_tensors(path, out)

    # Both loaded by transformers the same way (`.to(bf16)` would also round rotary buffers).
    back = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    original = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    assert back.dtype == original.dtype == torch.bfloat16
    np.testing.assert_array_equal(torch_logits(back, TOKENS), torch_logits(original, TOKENS))


def test_greedy_generation_equals_transformers_and_sampling_is_consistent(tmp_path):
    model, path = hf_model(tmp_path / "hf", rope_scaling=LLAMA3_ROPE)
    prompt = TOKENS[:, :9]
    with torch.no_grad():
        want = model.generate(torch.tensor(prompt), max_new_tokens=24, do_sample=False).numpy()
    ours = hf.load(path)
    greedy = generate(ours, prompt, Sampling(max_new_tokens=24))
    np.testing.assert_array_equal(greedy, want)
    np.testing.assert_array_equal(generate(ours, prompt, Sampling(24), use_cache=False), greedy)
    # top-k 1 and a tiny nucleus leave only the argmax; a real temperature samples elsewhere.
    for narrow in (Sampling(24, temperature=1.0, top_k=1), Sampling(24, 1.0, top_p=1e-6)):
        np.testing.assert_array_equal(generate(ours, prompt, narrow), greedy)
    hot = generate(ours, prompt, Sampling(24, temperature=2.0, seed=3))
    assert not np.array_equal(hot, greedy)
    np.testing.assert_array_equal(hot, generate(ours, prompt, Sampling(24, 2.0, seed=3)))


def test_loads_straight_into_a_sharded_mesh(tmp_path):
    model, path = hf_model(tmp_path / "hf")
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    ours = hf.load(path, mesh=mesh)
    wq = ours.layers.wq[...]
    assert wq.shape == (3, 64, 8, 16)
    assert {s.data.shape for s in wq.addressable_shards} == {(3, 32, 4, 16)}  # fsdp x tensor
    with jax.set_mesh(mesh):
        got = np.asarray(jax.jit(lambda m, t: m(t))(ours, jnp.asarray(TOKENS)))
        sharded = generate(ours, TOKENS[:, :9], Sampling(max_new_tokens=12))
    assert np.abs(got - torch_logits(model, TOKENS)).max() <= 1e-4
    np.testing.assert_array_equal(sharded, generate(hf.load(path), TOKENS[:, :9], Sampling(12)))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"kv_lora_rank": 512}, "kv_lora_rank=512 is not supported"),
        ({"attention_bias": True}, "attention_bias=True is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act=gelu is not supported"),
        ({"num_hidden_layers": 4}, "tensor 'model.layers.3.input_layernorm.weight' is missing"),
        ({"hidden_size": 32}, "tensor 'model.embed_tokens.weight' has shape [96, 64]"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope type 'yarn'"),
    ],
)
def test_bad_checkpoints_are_one_clear_error(tmp_path, change, message):
    _, path = hf_model(tmp_path / "hf")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        hf.load(path)


def test_cli_import_export_and_generate(tmp_path):
    model, path = hf_model(tmp_path / "hf")

    def run(*args):
        done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    run("engine.hf", "import", str(path), str(tmp_path / "imported"))
    run("engine.hf", "export", str(tmp_path / "imported"), str(tmp_path / "exported"))
    np.testing.assert_array_equal(
        torch_logits(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "exported"), TOKENS),
        torch_logits(model, TOKENS),
    )
    prompt = ",".join(map(str, TOKENS[0, :9]))
    out = run("engine.generate", f"--run_dir={tmp_path / 'imported'}", f"--prompt_ids={prompt}",
              "--max_new_tokens=8")  # fmt: skip
    with torch.no_grad():
        want = model.generate(torch.tensor(TOKENS[:1, :9]), max_new_tokens=8, do_sample=False)
    assert out.strip() == ",".join(map(str, want[0, 9:].tolist()))


def test_init_from_hf_trains_from_the_hugging_face_weights(tmp_path):
    from conftest import cli

    from engine.config import DataConfig
    from engine.data import TextTask
    from engine.sources import write_token_file

    model, path = hf_model(tmp_path / "hf", vocab_size=256, num_hidden_layers=2)
    rng = np.random.default_rng(0)
    tokens = write_token_file(tmp_path / "tok", [rng.integers(1, 256, 300) for _ in range(40)],
                              eos_id=0, vocab_size=256)  # fmt: skip
    run_dir = tmp_path / "run"
    result = cli("--config", "tiny", f"--init_from_hf={path}", f"--data.source={tokens}",
                 "--steps=1", f"--run_dir={run_dir}", "--mesh.fsdp=2", "--mesh.tensor=2",
                 "--mesh.data=2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "config.json").read_text())["model"]["d_model"] == 64
    loss = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    # The HF model's own loss on the run's first batch: the step saw exactly those weights.
    data = DataConfig(source=str(tokens), seq_len=64, eval_batches=2)  # the tiny preset
    batch = TextTask(data, 16, 0).train_batch(0)
    logits = torch.tensor(torch_logits(model, batch["inputs"]))
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 256), torch.tensor(batch["targets"]).reshape(-1).long(), reduction="none"
    ).numpy()
    want = (nll * batch["mask"].reshape(-1)).sum() / batch["mask"].sum()
    np.testing.assert_allclose(loss, want, rtol=1e-5)
