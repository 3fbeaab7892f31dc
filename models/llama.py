"""A Llama-style decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Layers are stacked on a leading `layers` axis and run with `lax.scan`, so compile time does not
grow with depth. Dimensions are named logically ("embed", "heads", ...); the mesh is chosen
elsewhere by a rule table.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from models.layers import (
    FEED_FORWARD,
    RMSNorm,
    attention,
    dense,
    param,
    remat_policy,
    rotary,
    zeros,
)
from models.moe import MoEConfig
from sharding import constrain


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture only: what a Hugging Face config.json describes. How it runs (remat,
    attention kernel, loss chunks, mesh) is the execution plan's (engine.plan)."""

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 32
    d_ff: int = 384
    rope_theta: float = 10_000.0
    rope_scaling: Literal["none", "llama3"] = "none"
    """llama3: Llama 3.1's long-context frequency scaling, with the four rope_* keys below."""
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qk_norm: bool = False
    """RMSNorm over each head's queries and keys before the rotation (Qwen3, OLMo 2)."""
    qkv_bias: bool = False
    """Biases on the query, key and value projections (Qwen2)."""
    feed_forward: str = "swiglu"
    """The feed-forward block of dense layers, by name in models.layers.FEED_FORWARD."""
    moe: MoEConfig = MoEConfig()
    """Mixture-of-Experts layers (models.moe); experts=0: none."""

    def __post_init__(self):
        if isinstance(self.moe, dict):  # from a config.json
            object.__setattr__(self, "moe", MoEConfig(**self.moe))

    @property
    def stacked_layers(self) -> int:
        """Steps of the layer scan: layers, or groups of `moe.every` layers."""
        return self.n_layers // self.moe.every if self.moe.experts else self.n_layers

    @property
    def moe_layers(self) -> int:
        return sum(self.moe.is_moe(i) for i in range(self.n_layers))

    def _ffn_params(self, active: bool) -> int:
        """Feed-forward weights over all layers; `active`: only those one token goes through."""
        moe, d = self.moe, self.d_model
        sparse = self.moe_layers
        expert = 3 * d * moe.expert_d_ff(self.d_ff)
        routed = moe.top_k if active else moe.experts
        per_moe_layer = d * moe.experts + expert * (routed + moe.shared_experts)
        return (self.n_layers - sparse) * 3 * d * self.d_ff + sparse * per_moe_layer

    def matmul_params(self, active: bool = True) -> int:
        """Weights that enter a matmul per token (the embedding lookup does not; the head does);
        of an MoE's experts only the top_k a token is routed to, unless `active` is False."""
        attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = self._ffn_params(active)
        return self.n_layers * attn + ffn + self.d_model * self.vocab_size

    def num_params(self) -> int:
        norms = (2 * self.n_layers + 1) * self.d_model
        norms += 2 * self.n_layers * self.head_dim if self.qk_norm else 0
        norms += (
            self.n_layers * self.head_dim * (self.n_heads + 2 * self.n_kv_heads) * self.qkv_bias
        )
        embed = 0 if self.tie_embeddings else self.vocab_size * self.d_model
        return self.matmul_params(active=False) + embed + norms

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per active matmul weight, plus causal attention (half
        of T^2)."""
        attention = 6 * self.n_layers * seq_len * self.n_heads * self.head_dim
        return 6 * self.matmul_params() + attention


LLAMA_PRESETS: dict[str, LlamaConfig] = {
    # CPU tests: well under a second a step on 8 virtual devices.
    "tiny": LlamaConfig(d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8, d_ff=128),
    # The quick-start run: ~0.8M parameters, learns Python bytes in minutes on 2 CPU cores.
    "default": LlamaConfig(),
    # Mid-size, for memory/sharding benchmarks (~110M params with a 32k vocabulary).
    "small": LlamaConfig(
        vocab_size=32_000,
        d_model=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=4,
        head_dim=64,
        d_ff=2048,
    ),
    # Llama 3.2 1B shapes (tied embeddings, 128k vocabulary).
    "1b": LlamaConfig(
        vocab_size=128_256,
        d_model=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        head_dim=64,
        d_ff=8192,
        rope_theta=500_000.0,
        tie_embeddings=True,
    ),
    # Llama 3 8B shapes.
    "8b": LlamaConfig(
        vocab_size=128_256,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        d_ff=14_336,
        rope_theta=500_000.0,
    ),
}


LLAMA_PRESETS |= {
    # CPU tests of MoE: `tiny` with 8 experts of width 64, two per token.
    "tiny_moe": dataclasses.replace(
        LLAMA_PRESETS["tiny"], moe=MoEConfig(experts=8, top_k=2, d_ff=64)
    ),
    # The quick-start model with 8 experts of half its MLP width, two per token: the same
    # active parameters per token as `default` (0.82M), 3.1x the total.
    "moe": dataclasses.replace(
        LLAMA_PRESETS["default"], moe=MoEConfig(experts=8, top_k=2, d_ff=192)
    ),
    # Mixtral 8x7B: Llama 3 8B's layers with a 32k vocabulary and 8 experts in place of each
    # MLP (46.7B parameters, 12.9B active per token).
    "mixtral_8x7b": dataclasses.replace(
        LLAMA_PRESETS["8b"],
        vocab_size=32_000,
        rope_theta=1_000_000.0,
        moe=MoEConfig(experts=8, top_k=2, aux_loss_weight=0.02),
    ),
}


def rope_frequencies(cfg: LlamaConfig):
    """Angle per position of each rotated pair, [head_dim / 2]."""
    half = cfg.head_dim // 2
    freq = 1.0 / cfg.rope_theta ** (jnp.arange(half, dtype=jnp.float32) / half)
    if cfg.rope_scaling == "llama3":
        # Long wavelengths slowed by `factor`, short ones kept, the band between interpolated.
        wavelen = 2 * jnp.pi / freq
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        smooth = (cfg.rope_original_max_len / wavelen - low) / (high - low)
        scaled = (1 - smooth) * freq / cfg.rope_factor + smooth * freq
        freq = jnp.where(wavelen > cfg.rope_original_max_len / low, freq / cfg.rope_factor, freq)
        medium = (wavelen >= cfg.rope_original_max_len / high) & (
            wavelen <= cfg.rope_original_max_len / low
        )
        freq = jnp.where(medium, scaled, freq)
    return freq


class Block(nnx.Module):
    """One decoder layer: pre-norm attention then a pre-norm feed-forward block, both residual."""

    def __init__(
        self, cfg: LlamaConfig, rngs: nnx.Rngs, attention: str = "xla", moe=False,
        context: str = "all_gather",
    ):  # fmt: skip
        d, h, k, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        std, out_std = 0.02, 0.02 / (2 * cfg.n_layers) ** 0.5
        self.cfg, self.attention, self.context = cfg, attention, context
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        self.wq = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), std)
        self.wk = param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), std)
        self.wv = param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), std)
        self.wo = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), out_std)
        if cfg.qkv_bias:
            self.bq = zeros((h, hd), ("heads", "head_dim"))
            self.bk = zeros((k, hd), ("kv_heads", "head_dim"))
            self.bv = zeros((k, hd), ("kv_heads", "head_dim"))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.norm_eps, "head_dim")
            self.k_norm = RMSNorm(hd, cfg.norm_eps, "head_dim")
        self.mlp_norm = RMSNorm(d, cfg.norm_eps)
        self.mlp = FEED_FORWARD["moe" if moe else cfg.feed_forward](cfg, rngs)

    def _add_bias_and_norm(self, y, bias, norm):
        if bias is not None:
            y = y + bias[...].astype(y.dtype)
        return y if norm is None else norm(y)

    def __call__(self, x, positions, segments=None, cache=None):
        """x [B,T,D] -> (x, aux); `segments` [B,T]: document ids, attention stays within one.
        With `cache` = (k [B,S,K,hd], v, start): this call's keys and values are written at
        start..start+T and attention reads the whole cache; returns (x, aux, (k, v))."""
        cfg = self.cfg
        bias = (self.bq, self.bk, self.bv) if cfg.qkv_bias else (None,) * 3
        norms = (self.q_norm, self.k_norm) if cfg.qk_norm else (None, None)
        h = self.attn_norm(x)
        q, k, v = dense(h, self.wq[...], self.wk[...], self.wv[...])
        q = self._add_bias_and_norm(q, bias[0], norms[0])
        k = self._add_bias_and_norm(k, bias[1], norms[1])
        v = self._add_bias_and_norm(v, bias[2], None)
        freq = rope_frequencies(cfg)
        q = constrain(rotary(q, positions, freq), ("batch", "length", "heads", None))
        k = constrain(rotary(k, positions, freq), ("batch", "length", "kv_heads", None))
        v = constrain(v, ("batch", "length", "kv_heads", None))
        q, k, v = (
            checkpoint_name(q, "query"),
            checkpoint_name(k, "key"),
            checkpoint_name(v, "value"),
        )
        visible = None
        if cache is not None:
            k_cache, v_cache, start = cache
            k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), start, 1)
            v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), start, 1)
            visible = jnp.arange(k.shape[1])[None, None, :] <= positions[:, :, None]
        o = attention(q, k, v, self.attention, visible, segments, positions, self.context)
        o = checkpoint_name(o, "attention")
        o = checkpoint_name(dense(o, self.wo[...], n_in=2), "attn_out")
        x = constrain(x + o, ("batch", "length", "embed"))

        y, aux = self.mlp(self.mlp_norm(x))
        x = constrain(x + y, ("batch", "length", "embed"))
        return (x, aux) if cache is None else (x, aux, (k, v))


def stack(n: int, make, name: str = "layers"):
    """`n` modules from `make(rngs)` stacked on a leading dimension named `name`."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: name})
    def build(rngs):
        return make(rngs)

    return build


class Group(nnx.Module):
    """`every` consecutive layers with one scan step: every-1 dense blocks, then an MoE block.
    Same call as a Block; a cache has a leading dimension of `every` layers."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs, attention="xla", context="all_gather"):
        dense = lambda r: Block(cfg, r, attention, context=context)  # noqa: E731
        self.dense = stack(cfg.moe.every - 1, dense, "sublayers")(rngs)
        self.moe = Block(cfg, rngs, attention, moe=True, context=context)

    def __call__(self, x, positions, segments=None, cache=None):
        if cache is None:
            x, _ = ScanLayers()(self.dense, x, positions, segments)
            return self.moe(x, positions, segments)
        k_all, v_all, start = cache
        x, (k, v) = scan_cached(self.dense, x, positions, (k_all[:-1], v_all[:-1], start), segments)
        x, aux, (k_last, v_last) = self.moe(x, positions, segments, (k_all[-1], v_all[-1], start))
        return x, aux, (jnp.concatenate([k, k_last[None]]), jnp.concatenate([v, v_last[None]]))


def scan_cached(layers: nnx.Module, x, positions, cache, segments=None):
    """Run stacked layers in order, each reading and extending its slice of the KV cache
    `(k, v, start)`, k/v [layers, ...]: returns (x, (k, v))."""
    graphdef, stacked = nnx.split(layers)
    k_all, v_all, start = cache

    def layer(x, inputs):
        params, k, v = inputs
        x, _, kv = nnx.merge(graphdef, params)(x, positions, segments, (k, v, start))
        return x, kv

    return jax.lax.scan(layer, x, (stacked, k_all, v_all))


def make_layers(cfg: LlamaConfig, rngs: nnx.Rngs, attention="xla", context="all_gather"):
    """The stacked layers: one Block per layer, or one Group per `moe.every` layers."""
    moe = cfg.moe
    if moe.experts and moe.every > 1:
        return stack(cfg.n_layers // moe.every, lambda r: Group(cfg, r, attention, context))(rngs)
    block = lambda r: Block(cfg, r, attention, moe=moe.experts > 0, context=context)  # noqa: E731
    return stack(cfg.n_layers, block)(rngs)


@dataclasses.dataclass(frozen=True)
class ScanLayers:
    """Run stacked layers in order with `lax.scan`: one compiled layer body for any depth,
    or `unroll` layers per loop iteration (0: every layer, no loop). Returns the output and
    each aux value averaged over the layers."""

    remat: str = "none"
    unroll: int = 1

    def __call__(self, layers: nnx.Module, x, *args):
        graphdef, stacked = nnx.split(layers)

        def layer(x, params):
            return nnx.merge(graphdef, params)(x, *args)

        policy = remat_policy(self.remat)
        if policy is not None:
            layer = jax.checkpoint(layer, policy=policy)
        # Unrolled, XLA fuses across layers and drops the loop's stacked residual buffers.
        x, aux = jax.lax.scan(layer, x, stacked, unroll=self.unroll or True)
        return x, jax.tree.map(lambda a: jnp.mean(a, axis=0), aux)


class Llama(nnx.Module):
    """`remat`, `attention` (the kernel), `context` (how attention crosses a split sequence:
    sharding.context) and `scan_unroll` (layers per loop iteration) are how it runs (the
    execution plan's), not what it is."""

    def __init__(
        self, cfg: LlamaConfig, rngs: nnx.Rngs, *, remat: str = "none", attention: str = "xla",
        context: str = "all_gather", scan_unroll: int = 1,
    ):  # fmt: skip
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), 0.02)
        self.layers = make_layers(cfg, rngs, attention, context)
        # How the stack runs; parallelism may swap it (sharding.pipeline), the layers stay.
        self.layer_runner = ScanLayers(remat, scan_unroll)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), 0.02)

    def __call__(self, tokens, segments=None, positions=None):
        """Logits [batch, length, vocab] for integer `tokens` [batch, length]."""
        return self.logits(self.features(tokens, segments, positions)[0])

    def features(self, tokens, segments=None, positions=None):
        """The last layer's output [batch, length, d_model] before the output layer, and the
        layers' aux values. `positions` [batch, length] default to 0, 1, ...; with `segments`
        (document ids of packed rows) attention stays within each document."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        extra = () if segments is None else (segments,)  # per-example, like positions
        return self.layer_runner(self.layers, self._embed(tokens), positions, *extra)

    def decode(self, tokens, positions, cache):
        """Logits for `tokens` [B,T] at `positions` [B,T] that also read and extend a KV cache
        `(k, v, start)`, k/v [layers, B, max_len, kv_heads, head_dim]: the prompt once (T =
        its length, start 0), then one token at a time. Returns (logits, (k, v))."""
        k_all, v_all, start = cache
        shape, steps = k_all.shape, self.cfg.stacked_layers
        if steps != shape[0]:  # groups of layers: [groups, layers per group, ...]
            k_all, v_all = (c.reshape(steps, -1, *shape[1:]) for c in (k_all, v_all))
        x, (k_all, v_all) = scan_cached(self.layers, self._embed(tokens), positions,
                                        (k_all, v_all, start))  # fmt: skip
        return self.logits(x), (k_all.reshape(shape), v_all.reshape(shape))

    def _embed(self, tokens):
        # Gather whole rows: a lookup into a table split along `embed` reshards badly.
        table = constrain(self.embed[...], ("vocab", None))
        # Through fp32 (exact, and a no-op in fp32): the backward's scatter-add then sums a
        # token's repeats in fp32, where bf16 loses them and XLA:GPU retries bf16 atomics.
        rows = jnp.take(table.astype(jnp.float32), tokens, axis=0).astype(table.dtype)
        return constrain(rows, ("batch", "length", "embed"))

    def logits(self, x):
        x = self.final_norm(x)
        if self.cfg.tie_embeddings:
            logits = dense(x, self.embed[...].T)
        else:
            logits = dense(x, self.head[...])
        return constrain(logits, ("batch", "length", "vocab"))
