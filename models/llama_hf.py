"""Hugging Face <-> shardtrain for the Llama family: llama, mistral, qwen2 (q/k/v biases),
qwen3 (q/k norms), mixtral and qwen3_moe (experts). Config.json both ways, and a tensor table
per model_type. Hugging Face's `[out, in]` linear weights are transposed and heads split out;
both sides rotate pairs (i, i + D/2). A template's `{layer}` (and, for experts, `{expert}`)
index the leading stacked dimensions of our parameter, in order.
"""

from __future__ import annotations

from models.llama import LlamaConfig
from models.moe import MoEConfig

# model_type -> what its layers have beyond Llama's.
KINDS = {
    "llama": {},
    "mistral": {},
    "qwen2": {"qkv_bias": True},
    "qwen3": {"qk_norm": True},
    "mixtral": {"moe": True},
    "qwen3_moe": {"qk_norm": True, "moe": True},
}
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


def _moe_from_hf(c: dict, kind: str, where: str) -> MoEConfig:
    experts = c.get("num_local_experts") or c.get("num_experts")
    if kind == "mixtral":
        every, d_ff, norm_topk = 1, c["intermediate_size"], True
        if c.get("router_jitter_noise"):
            raise ValueError(
                f"{where}: router_jitter_noise={c['router_jitter_noise']} is not supported "
                "(shardtrain's router adds no noise); set it to 0."
            )
    else:
        every, d_ff = c.get("decoder_sparse_step", 1), c["moe_intermediate_size"]
        norm_topk = bool(c.get("norm_topk_prob", False))
        if c.get("mlp_only_layers"):
            raise ValueError(
                f"{where}: mlp_only_layers={c['mlp_only_layers']} is not supported; shardtrain "
                "places dense layers only by decoder_sparse_step."
            )
        if every != 1:
            raise ValueError(
                f"{where}: decoder_sparse_step={every} is not supported for Hugging Face "
                "import (shardtrain stacks such layers in groups); use a model with MoE in "
                "every layer, or train one with --model.moe.every."
            )
    return MoEConfig(
        experts=experts,
        top_k=c["num_experts_per_tok"],
        d_ff=d_ff,
        every=every,
        norm_topk=norm_topk,
        aux_loss_weight=float(c.get("router_aux_loss_coef") or 0.0),
    )


def config_from_hf(c: dict, where: str = "config.json") -> LlamaConfig:
    """A LlamaConfig for a Hugging Face config of one of `KINDS`, or a ValueError naming the
    field shardtrain's Llama does not have."""
    kind = c.get("model_type")
    if kind not in KINDS:
        raise ValueError(
            f"{where}: model_type '{kind}' is not supported; shardtrain imports {', '.join(KINDS)}."
        )
    extras = KINDS[kind]
    unsupported = {
        "hidden_act": c.get("hidden_act", "silu") != "silu",
        "attention_bias": bool(c.get("attention_bias")),
        "mlp_bias": bool(c.get("mlp_bias")),
        "sliding_window": bool(c.get("sliding_window")) and bool(c.get("use_sliding_window", 1)),
        "kv_lora_rank": "kv_lora_rank" in c,  # DeepSeek's multi-head latent attention
        "shared_expert_intermediate_size": bool(c.get("shared_expert_intermediate_size")),
    }
    for field, bad in unsupported.items():
        if bad:
            raise ValueError(
                f"{where}: {field}={c.get(field)} is not supported by shardtrain's {kind} "
                "(SiLU MLP, no output or MLP biases, full attention, no latent attention, no "
                "gated shared expert)."
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
    if extras.get("moe"):
        scaling["moe"] = _moe_from_hf(c, kind, where)
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
        qk_norm=bool(extras.get("qk_norm")),
        qkv_bias=bool(extras.get("qkv_bias")),
        **scaling,
    )


def kind_of(cfg: LlamaConfig) -> str | None:
    """The Hugging Face model_type that holds `cfg` exactly (`KINDS` read backwards), or None."""
    moe = cfg.moe
    has = {"qkv_bias": cfg.qkv_bias, "qk_norm": cfg.qk_norm, "moe": moe.experts > 0}
    kind = next((k for k, extras in KINDS.items() if extras.keys() == {f for f in has if has[f]}),
                None)  # fmt: skip
    if cfg.feed_forward != "swiglu" or kind is None or not moe.experts:
        return kind
    # HF's MoE layouts: every layer, no shared experts, dropless; Mixtral renormalizes.
    if moe.every != 1 or moe.shared_experts or moe.capacity_factor is not None:
        return None
    return None if kind == "mixtral" and not moe.norm_topk else kind


def config_to_hf(cfg: LlamaConfig, dtype: str, kind: str = "llama") -> dict:
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
    out = {
        "architectures": [ARCHITECTURES[kind]],
        "model_type": kind,
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
    moe = cfg.moe
    if kind == "mixtral":
        out |= {"intermediate_size": moe.expert_d_ff(cfg.d_ff), "sliding_window": None}
    if kind == "qwen3_moe":
        out |= {"moe_intermediate_size": moe.expert_d_ff(cfg.d_ff), "mlp_only_layers": [],
                "decoder_sparse_step": 1, "norm_topk_prob": moe.norm_topk,
                "num_experts": moe.experts}  # fmt: skip
    if moe.experts:
        out |= {
            "num_local_experts": moe.experts,
            "num_experts_per_tok": moe.top_k,
            "router_aux_loss_coef": moe.aux_loss_weight,
            "output_router_logits": False,
        }
    if kind.startswith("qwen"):
        out |= {"use_sliding_window": False, "sliding_window": None}
    return out


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
_BIASES = {
    (f"b{x}",): (f"self_attn.{x}_proj.bias",
                 lambda w, c, x=x: w.reshape(c.n_heads if x == "q" else c.n_kv_heads, c.head_dim),
                 lambda w, c: w.reshape(-1))
    for x in "qkv"
}  # fmt: skip
_QK_NORMS = {(f"{x}_norm", "scale"): (f"self_attn.{x}_norm.weight", _same, _same) for x in "qk"}


def _experts(prefix: str, router: str, names: tuple[str, str, str]) -> dict:
    gate, up, down = (f"{prefix}.{{expert}}.{n}.weight" for n in names)
    return {
        ("mlp", "router"): (router, _t, _t),
        ("mlp", "w_gate"): (gate, _t, _t),
        ("mlp", "w_up"): (up, _t, _t),
        ("mlp", "w_down"): (down, _t, _t),
    }


_ATTENTION = {path: v for path, v in _LAYER.items() if path[0] != "mlp"}
_LAYERS = {
    "llama": _LAYER,
    "mistral": _LAYER,
    "qwen2": _LAYER | _BIASES,
    "qwen3": _LAYER | _QK_NORMS,
    "mixtral": _ATTENTION
    | _experts("block_sparse_moe.experts", "block_sparse_moe.gate.weight", ("w1", "w3", "w2")),
    "qwen3_moe": _ATTENTION
    | _QK_NORMS
    | _experts("mlp.experts", "mlp.gate.weight", ("gate_proj", "up_proj", "down_proj")),
}


def tensors(kind: str) -> dict:
    """Our param path -> (HF name template, HF -> ours, ours -> HF) for one model_type."""
    return {
        ("layers", *path): (f"model.layers.{{layer}}.{name}", to_ours, to_hf)
        for path, (name, to_ours, to_hf) in _LAYERS[kind].items()
    } | {
        ("embed",): ("model.embed_tokens.weight", _same, _same),
        ("final_norm", "scale"): ("model.norm.weight", _same, _same),
        ("head",): ("lm_head.weight", _t, _t),
    }
