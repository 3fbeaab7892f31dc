"""Hugging Face <-> shardtrain for the Llama family (llama, mistral): config.json both ways,
and the tensor table. Hugging Face's `[out, in]` linear weights are transposed and heads split
out; both sides rotate pairs (i, i + D/2). A template's `{layer}` (and, for experts, `{expert}`)
index the leading stacked dimensions of our parameter, in order.
"""

from __future__ import annotations

from models.llama import LlamaConfig


def config_from_hf(c: dict, where: str = "config.json") -> LlamaConfig:
    """A LlamaConfig for a Hugging Face Llama-family config, or a ValueError naming the field
    shardtrain's Llama does not have."""
    kind = c.get("model_type")
    if kind not in ("llama", "mistral", "qwen2"):
        raise ValueError(
            f"{where}: model_type '{kind}' is not supported; shardtrain imports Llama-family "
            "models (llama, mistral without sliding window)."
        )
    if kind == "qwen2":
        raise ValueError(
            f"{where}: model_type 'qwen2' has q/k/v projection biases, which shardtrain's Llama "
            "does not; Llama and Mistral (without sliding window) layouts are supported."
        )
    unsupported = {
        "hidden_act": c.get("hidden_act", "silu") != "silu",
        "attention_bias": bool(c.get("attention_bias")),
        "mlp_bias": bool(c.get("mlp_bias")),
        "sliding_window": bool(c.get("sliding_window")) and bool(c.get("use_sliding_window", 1)),
    }
    for field, bad in unsupported.items():
        if bad:
            raise ValueError(
                f"{where}: {field}={c[field]} is not supported by shardtrain's Llama "
                "(SiLU MLP, no biases, full attention)."
            )
    rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(
            f"{where}: rope type '{rope_type}' is not supported; shardtrain has default and "
            "llama3 rotary embeddings."
        )
    heads = c["num_attention_heads"]
    scaling = {}
    if rope_type == "llama3":
        scaling = dict(
            rope_scaling="llama3",
            rope_factor=float(rope["factor"]),
            rope_low_freq_factor=float(rope["low_freq_factor"]),
            rope_high_freq_factor=float(rope["high_freq_factor"]),
            rope_original_max_len=int(rope["original_max_position_embeddings"]),
        )
    return LlamaConfig(
        vocab_size=c["vocab_size"],
        d_model=c["hidden_size"],
        n_layers=c["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        d_ff=c["intermediate_size"],
        rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10_000.0))),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        **scaling,
    )


def config_to_hf(cfg: LlamaConfig, dtype: str) -> dict:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "llama3":
        rope.update(
            rope_type="llama3",
            factor=cfg.rope_factor,
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_len,
        )
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "max_position_embeddings": max(8192, cfg.rope_original_max_len),
        # Both spellings: transformers >= 5 reads rope_parameters, 4.x rope_theta/rope_scaling.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling if cfg.rope_scaling != "none" else None,
        "rope_parameters": rope,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def _t(w, cfg):
    return w.T


def _same(w, cfg):
    return w


# shardtrain param path -> (HF name template, HF -> ours, ours -> HF).
_LAYER = {
    ("attn_norm", "scale"): ("input_layernorm.weight", _same, _same),
    ("wq",): ("self_attn.q_proj.weight",
              lambda w, c: w.T.reshape(c.d_model, c.n_heads, c.head_dim),
              lambda w, c: w.reshape(c.d_model, -1).T),
    ("wk",): ("self_attn.k_proj.weight",
              lambda w, c: w.T.reshape(c.d_model, c.n_kv_heads, c.head_dim),
              lambda w, c: w.reshape(c.d_model, -1).T),
    ("wv",): ("self_attn.v_proj.weight",
              lambda w, c: w.T.reshape(c.d_model, c.n_kv_heads, c.head_dim),
              lambda w, c: w.reshape(c.d_model, -1).T),
    ("wo",): ("self_attn.o_proj.weight",
              lambda w, c: w.T.reshape(c.n_heads, c.head_dim, c.d_model),
              lambda w, c: w.reshape(-1, c.d_model).T),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", _same, _same),
    ("mlp", "w_gate"): ("mlp.gate_proj.weight", _t, _t),
    ("mlp", "w_up"): ("mlp.up_proj.weight", _t, _t),
    ("mlp", "w_down"): ("mlp.down_proj.weight", _t, _t),
}  # fmt: skip
TENSORS = {
    ("layers", *path): (f"model.layers.{{layer}}.{name}", to_ours, to_hf)
    for path, (name, to_ours, to_hf) in _LAYER.items()
} | {
    ("embed",): ("model.embed_tokens.weight", _same, _same),
    ("final_norm", "scale"): ("model.norm.weight", _same, _same),
    ("head",): ("lm_head.weight", _t, _t),
}
