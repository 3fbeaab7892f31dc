"""Decoder building blocks, each replaceable: norms, rotary positions, attention kernels (a
registry by name), feed-forward blocks (a registry by name), and remat policies that may name
the activations to save.

A block returns `(y, aux)`: `aux` maps names to scalars the block wants logged or added to the
loss (an MoE router's balance loss, say); the layer stack averages them over layers.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from sharding import constrain
from sharding.context import context_attention, context_degree

Aux = dict[str, jax.Array]

# Activations tagged with `checkpoint_name`, which `--model.remat=save:NAME,...` can keep.
ACTIVATION_NAMES = ("query", "key", "value", "attention", "attn_out", "mlp_hidden", "mlp_out")

# cuDNN's fused attention is one op autodiff cannot see into, and no dot, so a dots policy
# would recompute its forward in the backward pass (`1b` on an H100: 32 forward kernels a step
# for 16 layers, 12.5 of 252 ms). What its backward reads besides q, k, v (the output and fp32
# softmax statistics) grows with the sequence as q does, not as the scores, so the policies
# that keep matmul outputs, and save:attention, keep it too. JAX's primitive is matched by
# name; the shape twin names its residuals with _FUSED_ATTENTION.
_CUDNN_ATTENTION_FORWARD = "dot_product_attention_fwd_wrapper"
_FUSED_ATTENTION = "fused_attention"


def _fused_attention_kernel(prim, *_, **__) -> bool:
    return prim.name == _CUDNN_ATTENTION_FORWARD


def _keeping_fused_attention(policy: Callable, *names: str) -> Callable:
    """`policy`, the activations `names` and the fused attention kernel's residuals."""
    both = jax.checkpoint_policies.save_from_both_policies
    names = jax.checkpoint_policies.save_only_these_names(*names, _FUSED_ATTENTION)
    return both(policy, both(names, _fused_attention_kernel))


_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # `dense`'s results named "dot" count as dots: on XLA:CPU they sit behind a custom gradient.
    "dots": _keeping_fused_attention(jax.checkpoint_policies.checkpoint_dots, "dot"),
    "dots_no_batch": _keeping_fused_attention(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, "dot"
    ),
}
REMAT_HELP = (
    "none, full, dots (keep matmul outputs), dots_no_batch (keep only weight-like matmul "
    "outputs; both keep a fused attention kernel's output), or save:NAME,... to keep just these "
    f"activations ({', '.join(ACTIVATION_NAMES)})"
)


def remat_policy(name: str) -> Callable | None:
    """The `jax.checkpoint` policy of a remat setting; None for 'none' (no remat)."""
    if name == "none":
        return None
    if name in _POLICIES:
        return _POLICIES[name]
    if name.startswith("save:"):
        names = tuple(n for n in name[5:].split(",") if n)
        unknown = [n for n in names if n not in ACTIVATION_NAMES]
        if names and not unknown:
            policy = jax.checkpoint_policies.save_only_these_names(*names)
            return _keeping_fused_attention(policy) if "attention" in names else policy
    raise ValueError(f"--model.remat={name} is not a remat policy; use {REMAT_HELP}.")


def param(rngs: nnx.Rngs, shape, names, stddev: float) -> nnx.Param:
    value = stddev * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, out_sharding=names)


def dense(x, *weights, n_in: int = 1):
    """`x` [..., *in] times each of `weights` [*in, *out] -> [..., *out] (a tuple for several
    weights), as matmuls of two-dimensional operands: the leading positions of `x` (batch,
    length) merged into rows, `in` and `out` each merged into one dimension (bitcasts).
    - A weight's gradient then contracts one dimension; contracting batch and length apart,
      XLA:CPU first copies an operand into a transposed layout (the SwiGLU block ran 1.3-1.5x
      slower on 2 cores, forward and backward: benchmarks/block_kernels.py).
    - Several weights share one merged input, so autodiff keeps it once.
    - Under context parallelism batch and length stay apart: they are split over different
      mesh axes, which one merged dimension cannot carry without resharding."""
    lead = x.shape[: x.ndim - n_in]
    if context_degree() == 1:
        x = x.reshape(-1, math.prod(x.shape[x.ndim - n_in :]))
        ys = _matmuls(x, tuple(w.reshape(x.shape[1], -1) for w in weights))
    else:
        ys = tuple(jnp.tensordot(x, w, n_in) for w in weights)
    ys = tuple(y.reshape(*lead, *w.shape[n_in:]) for y, w in zip(ys, weights, strict=True))
    return ys if len(ys) > 1 else ys[0]


def _matmuls(x, ws):
    """x [N, K] @ each of ws [K, F]. On XLA:CPU behind a custom gradient, for two reasons:
    - The weight gradients contract the rows N. XLA:CPU runs x.T @ g from x's row-major layout
      at about half the speed of the same matmul from x.T written out (99-126 against 179-201
      GFLOP/s on 2 cores at `default`'s shapes), so the forward keeps x.T, once for all of ws
      (`default`'s fp32 step 1-4 % faster, benchmarks/RESULTS.md).
    - In 16 bits, sums in fp32, rounded once, forward and backward: XLA:CPU's bf16 matmul
      kernel (avx512_bf16) writes fp32 only, so it runs a bf16 -> bf16 matmul in fp32 with both
      operands upcast first (2.1x slower on 2 cores), and autodiff of an fp32 result would feed
      fp32 cotangents, and fp32 matmuls, to the backward. The rounding is the one a bf16 matmul
      does.
    GPUs keep the plain matmul (their kernels sum in fp32 and take either layout). The results
    are named for the `dots` remat policies, which cannot see through a custom gradient."""
    if jax.default_backend() != "cpu":
        return tuple(x @ w for w in ws)
    return tuple(checkpoint_name(y, "dot") for y in _matmuls_wide_sum(x, ws))


_ROWS = (((1,), (0,)), ((), ()))  # [N, K] x [K, F]: x @ w
_COLS = (((1,), (1,)), ((), ()))  # [N, F] x [K, F]: g @ w.T


def _wide_sum(a, b, dims):
    """The matmul summed, and returned, in fp32 at least (the callers round it to their dtype)."""
    wide = jnp.promote_types(a.dtype, jnp.float32)
    return jax.lax.dot_general(a, b, dims, preferred_element_type=wide)


@jax.custom_vjp
def _matmuls_wide_sum(x, ws):
    return tuple(_wide_sum(x, w, _ROWS).astype(x.dtype) for w in ws)


def _matmuls_wide_sum_fwd(x, ws):
    # The weight gradients contract the rows: keeping x transposed (one copy for all of ws)
    # gives them [K, N] @ [N, F], a form XLA:CPU's kernels take at full speed; in 16 bits x
    # itself would be upcast to fp32 as well.
    return _matmuls_wide_sum(x, ws), (_transposed_bits(x), ws)


def _matmuls_wide_sum_bwd(residuals, gs):
    bits, ws = residuals
    # The barrier keeps x_t transposed: without a layer loop between the two passes XLA would
    # fold the transpose into the matmul, back to the slow form (and in 16 bits XLA:CPU, jax
    # 0.10, has no kernel for it at all: "DotThunk ... BF16 x BF16 = F32").
    x_t = jax.lax.optimization_barrier(_from_bits(bits, gs[0].dtype))  # the outputs' dtype is x's
    dx = sum(_wide_sum(g, w, _COLS) for g, w in zip(gs, ws, strict=True))
    dws = tuple(_wide_sum(x_t, g, _ROWS).astype(w.dtype) for g, w in zip(gs, ws, strict=True))
    return dx.astype(x_t.dtype), dws


def _transposed_bits(x):
    """x.T [K, N] as unsigned integers; 16-bit values two to a 32-bit word where N is even.
    - As bits: a layer loop stacks residuals, and XLA:CPU writes one layer's slice into a 16-bit
      float stack by converting the whole stack to fp32 and back, every layer; an integer
      stack it updates in place (`small` in bf16: 5 % less memory, 1.03-1.09x).
    - In pairs: XLA may otherwise keep x.T as x in a column-major layout (where no loop or
      call boundary asks for rows), and the weight gradient then upcasts both operands to fp32.
      Pairs along N need N contiguous: x.T is written out in rows. (32-bit values stay
      single: a 64-bit word needs jax_enable_x64; fp32 has no upcast to avoid.)"""
    x_t = x.T
    width = 8 * x.dtype.itemsize
    if x_t.shape[1] % 2 or width > 16:
        return jax.lax.bitcast_convert_type(x_t, jnp.dtype(f"uint{width}"))
    pairs = x_t.reshape(x_t.shape[0], -1, 2)
    return jax.lax.bitcast_convert_type(pairs, jnp.dtype(f"uint{2 * width}"))


def _from_bits(bits, dtype):
    """Inverse of `_transposed_bits`: x.T [K, N] in `dtype`."""
    x_t = jax.lax.bitcast_convert_type(bits, dtype)  # [K, N / 2, 2] from pairs
    return x_t.reshape(x_t.shape[0], -1)


_matmuls_wide_sum.defvjp(_matmuls_wide_sum_fwd, _matmuls_wide_sum_bwd)


def zeros(shape, names) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, jnp.float32), out_sharding=names)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, name: str = "embed"):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=(name,))
        self.eps = eps

    def __call__(self, x):
        # Statistics in fp32 whatever the compute dtype: bf16 variance loses too many bits.
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rotary(x, positions, freq):
    """Rotate pairs (i, i + D/2) of `x` [batch, length, heads, D] by position-dependent angles."""
    angle = positions[:, :, None, None].astype(jnp.float32) * freq
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# ---------------------------------------------------------------- attention kernels


def xla_attention(q, k, v, visible=None, segments=None):
    """Grouped-query attention as einsums; q [B,T,H,D], k/v [B,S,K,D] with H a multiple of K.
    Causal (S = T) and, with `segments` [B,T], within a document only; or keys where
    `visible` [B,T,S] is True (decoding from a cache).
    Causal attention runs in blocks of query rows (`causal_block_rows`), each against the keys
    up to its last row only: the masked blocks above the diagonal are never computed."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    # [B, K, G, T, D]: the query heads of a kv head side by side, so that each block's rows
    # stack into [B, K, G*rows, D] and both einsums and their gradients are matmuls batched
    # over (batch, kv head) with no operand to transpose (on 2 CPU cores 1.2-1.3x faster than
    # [B, T, K, G, D] einsums: block_kernels.py).
    q = q.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if visible is not None:
        out = _attend(q, k, v, visible[:, None])
    else:
        rows, blocks = causal_block_rows(t, q.dtype), []
        for start in range(0, t, rows):
            end = min(start + rows, t)
            mask = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
            if segments is not None:
                same = segments[:, start:end, None] == segments[:, None, :end]
                mask = (mask & same)[:, None]
            blocks.append(_attend(q[:, :, :, start:end], k[:, :, :end], v[:, :, :end], mask))
        out = jnp.concatenate(blocks, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _attend(q, k, v, visible):
    """q [B,K,G,T,D] against k/v [B,K,S,D] where `visible` [..., T, S] -> [B,K,G,T,D]."""
    b, kv, groups, t, d = q.shape
    scores = jnp.einsum("bkqd,bksd->bkqs", q.reshape(b, kv, groups * t, d), k)
    scores = scores.astype(jnp.float32) * d**-0.5
    visible = jnp.tile(visible, (groups, 1))  # [..., G*T, S]: the same rows for every group
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkqs,bksd->bkqd", probs, v).reshape(b, kv, groups, t, d)


def causal_block_rows(length: int, dtype) -> int:
    """Query rows per block of causal `xla_attention`: on a CPU at most 16 blocks of 32 rows
    (fp32) or 128 (16 bits), which skip the masked keys (0.6x the work at 4 blocks) and keep
    a block's scores in cache: forward and backward 1.9x (`default`, 128 tokens) to 2.4x
    (`small`'s heads, 256) faster on 2 cores (benchmarks/block_kernels.py). Elsewhere one
    block: measured on CPUs only, and GPUs run cuDNN's fused kernel."""
    if jax.default_backend() != "cpu":
        return length
    return max(length // 16, 32 if jnp.dtype(dtype).itemsize >= 4 else 128)


def cudnn_attention(q, k, v, visible=None, segments=None):
    """jax.nn.dot_product_attention's fused cuDNN kernel (NVIDIA GPUs, 16-bit inputs); decoding
    from a cache (`visible`) falls back to the einsums."""
    if visible is not None:
        return xla_attention(q, k, v, visible, segments)
    mask = None if segments is None else (segments[:, :, None] == segments[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")


def cudnn_masked_attention(q, k, v, visible):
    """cuDNN's fused kernel with an explicit mask `visible` [B,T,S]: a device's queries
    against gathered keys under context parallelism (causal by position, not by index)."""
    return jax.nn.dot_product_attention(q, k, v, mask=visible[:, None], implementation="cudnn")


@jax.custom_vjp
def _fused_shapes(q, k, v):
    return _fused_shapes_fwd(q, k, v)[0]


def _fused_shapes_fwd(q, k, v):
    # Computed from q, as the kernel's are: values that depend on no input would be constants,
    # which remat keeps whatever the policy.
    out = q * 0
    stats = jnp.swapaxes(out[..., 0], 1, 2).astype(jnp.float32)  # [B, H, T]: per head, query
    out, stats = (checkpoint_name(a, _FUSED_ATTENTION) for a in (out, stats))
    return out, (q, k, v, out, stats)


def _fused_shapes_bwd(res, _):
    q, k, v, _, _ = res
    return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)


_fused_shapes.defvjp(_fused_shapes_fwd, _fused_shapes_bwd)


def cudnn_attention_shapes(q, k, v, visible=None, segments=None):
    """cuDNN's kernel as autodiff sees it, traceable on any backend: one op that is not a dot,
    whose backward keeps q, k, v, its output and fp32 softmax statistics (jax's
    fused_attention_stablehlo), the last two kept by the policies that keep the kernel's (see
    _CUDNN_ATTENTION_FORWARD). Shapes only, its values are not attention's:
    the planner counts a GPU step's residuals with it on any machine (`shapes_only`)."""
    if visible is not None:
        return xla_attention(q, k, v, visible, segments)
    return _fused_shapes(q, k, v)


# name -> kernel(q, k, v, visible=None, segments=None).
ATTENTION: dict[str, Callable] = {"xla": xla_attention, "cudnn": cudnn_attention}
# name -> its stand-in under `shapes_only` (kernels that trace only on their own devices).
SHAPE_TWINS: dict[str, Callable] = {"cudnn": cudnn_attention_shapes}
_SHAPES_ONLY = contextvars.ContextVar("shapes_only", default=False)


@contextlib.contextmanager
def shapes_only() -> Iterator[None]:
    """Within it attention traces as its SHAPE_TWINS entry: for `jax.eval_shape` of a step
    whose kernel runs on other devices than these."""
    token = _SHAPES_ONLY.set(True)
    try:
        yield
    finally:
        _SHAPES_ONLY.reset(token)


# name -> kernel(q, k, v, visible) that the `all_gather` context strategy runs on gathered keys
# instead of its own blockwise one (which skips the blocks the causal mask hides).
GATHERED_ATTENTION: dict[str, Callable] = {"cudnn": cudnn_masked_attention}


def attention(q, k, v, impl: str, visible=None, segments=None, positions=None,
              context: str = "all_gather"):  # fmt: skip
    """The kernel registered as `impl`; with the sequence split over devices (and no KV
    cache), attention across the split in the `context` strategy (sharding.context)."""
    if visible is None and positions is not None and context_degree() > 1:
        gathered = GATHERED_ATTENTION.get(impl) if context == "all_gather" else None
        return context_attention(q, k, v, positions, segments, context, gathered)
    if _SHAPES_ONLY.get():
        return SHAPE_TWINS.get(impl, ATTENTION[impl])(q, k, v, visible, segments)
    return ATTENTION[impl](q, k, v, visible, segments)


# ---------------------------------------------------------------- feed-forward blocks


class SwiGLU(nnx.Module):
    """The dense feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        std, out_std = 0.02, 0.02 / (2 * cfg.n_layers) ** 0.5
        self.w_gate = param(rngs, (d, f), ("embed", "mlp"), std)
        self.w_up = param(rngs, (d, f), ("embed", "mlp"), std)
        self.w_down = param(rngs, (f, d), ("mlp", "embed"), out_std)

    def __call__(self, h) -> tuple[jax.Array, Aux]:
        gate, up = dense(h, self.w_gate[...], self.w_up[...])
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        hidden = checkpoint_name(hidden, "mlp_hidden")
        return checkpoint_name(dense(hidden, self.w_down[...]), "mlp_out"), {}


# name -> class(cfg, rngs), called as block(h) -> (y, aux); an MoE block registers here.
FEED_FORWARD: dict[str, Callable] = {"swiglu": SwiGLU}
