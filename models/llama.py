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

from sharding import constrain

RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
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
    remat: RematPolicy = "none"
    """Activations recomputed in the backward pass: none, full, dots (keep matmul outputs),
    dots_no_batch (keep only weight-like matmul outputs)."""
    attention: Literal["xla", "cudnn"] = "xla"
    """xla: attention as einsums; cudnn: jax.nn.dot_product_attention's fused kernel (GPU,
    bf16/fp16 only)."""
    loss_chunks: int = 1
    """Training: run the output layer and loss over this many pieces of the sequence, each
    recomputed in the backward pass, so [batch, length, vocab] logits never exist at once
    (large vocabularies: less memory for one more output-layer matmul)."""

    def matmul_params(self) -> int:
        """Weights that enter a matmul per token (the embedding lookup does not; the head does)."""
        attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.d_model * self.d_ff
        return self.n_layers * (attn + mlp) + self.d_model * self.vocab_size

    def num_params(self) -> int:
        norms = (2 * self.n_layers + 1) * self.d_model
        embed = 0 if self.tie_embeddings else self.vocab_size * self.d_model
        return self.matmul_params() + embed + norms

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per matmul weight, plus causal attention (half of T^2)."""
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


def _param(rngs: nnx.Rngs, shape, names, stddev: float) -> nnx.Param:
    value = stddev * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, out_sharding=names)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=("embed",))
        self.eps = eps

    def __call__(self, x):
        # Statistics in fp32 whatever the compute dtype: bf16 variance loses too many bits.
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


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


def rotary(x, positions, freq):
    """Rotate pairs (i, i + D/2) of `x` [batch, length, heads, D] by position-dependent angles."""
    angle = positions[:, :, None, None].astype(jnp.float32) * freq
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention(q, k, v, impl: str, visible=None, segments=None):
    """Grouped-query attention; q [B,T,H,D], k/v [B,S,K,D] with H a multiple of K. Causal
    (S = T) and, with `segments` [B,T], within a document only; or keys where `visible`
    [B,T,S] is True (decoding from a cache)."""
    same_document = None if segments is None else segments[:, :, None] == segments[:, None, :]
    if impl == "cudnn" and visible is None:
        mask = None if same_document is None else same_document[:, None]
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=True, implementation="cudnn"
        )
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) * d**-0.5
    if visible is None:
        visible = jnp.tril(jnp.ones((t, t), bool))
        if same_document is not None:
            visible = visible & same_document
    if visible.ndim == 3:
        visible = visible[:, None, None]
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)


class Block(nnx.Module):
    """One decoder layer: pre-norm attention then pre-norm SwiGLU, both residual."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        d, h, k, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
        std, out_std = 0.02, 0.02 / (2 * cfg.n_layers) ** 0.5
        self.cfg = cfg
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        self.wq = _param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), std)
        self.wk = _param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), std)
        self.wv = _param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), std)
        self.wo = _param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), out_std)
        self.mlp_norm = RMSNorm(d, cfg.norm_eps)
        self.w_gate = _param(rngs, (d, f), ("embed", "mlp"), std)
        self.w_up = _param(rngs, (d, f), ("embed", "mlp"), std)
        self.w_down = _param(rngs, (f, d), ("mlp", "embed"), out_std)

    def __call__(self, x, positions, segments=None, cache=None):
        """x [B,T,D] -> [B,T,D]; `segments` [B,T]: document ids, attention stays within one.
        With `cache` = (k [B,S,K,hd], v, start): this call's keys and values are written at
        start..start+T and attention reads the whole cache; returns (x, (k, v))."""
        cfg = self.cfg
        h = self.attn_norm(x)
        q = jnp.einsum("btd,dhk->bthk", h, self.wq[...])
        k = jnp.einsum("btd,dhk->bthk", h, self.wk[...])
        v = jnp.einsum("btd,dhk->bthk", h, self.wv[...])
        freq = rope_frequencies(cfg)
        q = constrain(rotary(q, positions, freq), ("batch", "length", "heads", None))
        k = constrain(rotary(k, positions, freq), ("batch", "length", "kv_heads", None))
        v = constrain(v, ("batch", "length", "kv_heads", None))
        visible = None
        if cache is not None:
            k_cache, v_cache, start = cache
            k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), start, 1)
            v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), start, 1)
            visible = jnp.arange(k.shape[1])[None, None, :] <= positions[:, :, None]
        o = attention(q, k, v, cfg.attention, visible, segments)
        x = x + jnp.einsum("bthk,hkd->btd", o, self.wo[...])
        x = constrain(x, ("batch", "length", "embed"))

        h = self.mlp_norm(x)
        gate = jnp.einsum("btd,df->btf", h, self.w_gate[...])
        up = jnp.einsum("btd,df->btf", h, self.w_up[...])
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        x = x + jnp.einsum("btf,fd->btd", hidden, self.w_down[...])
        x = constrain(x, ("batch", "length", "embed"))
        return x if cache is None else (x, (k, v))


@dataclasses.dataclass(frozen=True)
class ScanLayers:
    """Run stacked layers in order with `lax.scan`: one compiled layer body for any depth."""

    remat: RematPolicy = "none"

    def __call__(self, layers: nnx.Module, x, *args):
        graphdef, stacked = nnx.split(layers)

        def layer(x, params):
            return nnx.merge(graphdef, params)(x, *args), None

        if self.remat != "none":
            layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[self.remat])
        x, _ = jax.lax.scan(layer, x, stacked)
        return x


class Llama(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), 0.02)

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs):
            return Block(cfg, rngs)

        self.layers = make_layers(rngs)
        # How the stack runs; parallelism may swap it (sharding.pipeline), the layers stay.
        self.layer_runner = ScanLayers(cfg.remat)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.head = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), 0.02)

    def __call__(self, tokens, segments=None):
        """Logits [batch, length, vocab] for integer `tokens` [batch, length]; with `segments`
        [batch, length] (document ids of packed rows) attention stays within each document."""
        return self.logits(self.features(tokens, segments))

    def features(self, tokens, segments=None):
        """The last layer's output [batch, length, d_model], before the output layer."""
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        extra = () if segments is None else (segments,)  # per-example, like positions
        return self.layer_runner(self.layers, self._embed(tokens), positions, *extra)

    def decode(self, tokens, positions, cache):
        """Logits for `tokens` [B,T] at `positions` [B,T] that also read and extend a KV cache
        `(k, v, start)`, k/v [layers, B, max_len, kv_heads, head_dim]: the prompt once (T =
        its length, start 0), then one token at a time. Returns (logits, (k, v))."""
        k_all, v_all, start = cache
        graphdef, stacked = nnx.split(self.layers)

        def layer(x, inputs):
            params, k, v = inputs
            return nnx.merge(graphdef, params)(x, positions, cache=(k, v, start))

        x, (k_all, v_all) = jax.lax.scan(layer, self._embed(tokens), (stacked, k_all, v_all))
        return self.logits(x), (k_all, v_all)

    def _embed(self, tokens):
        # Gather whole rows: a lookup into a table split along `embed` reshards badly.
        table = constrain(self.embed[...], ("vocab", None))
        return constrain(jnp.take(table, tokens, axis=0), ("batch", "length", "embed"))

    def logits(self, x):
        x = self.final_norm(x)
        if self.cfg.tie_embeddings:
            logits = jnp.einsum("btd,vd->btv", x, self.embed[...])
        else:
            logits = jnp.einsum("btd,dv->btv", x, self.head[...])
        return constrain(logits, ("batch", "length", "vocab"))
