"""Context parallelism: the sequence split over mesh axes, and attention across the split.

The rule table maps the logical `length` dimension to the `context` mesh axis, so every
per-token computation (projections, MLPs, norms, the loss) runs on a device's own tokens with no
change to the model. Attention is the one place tokens meet; `context_attention` runs it per
device (a `shard_map` over the context axes) in one of two strategies:

- `all_gather`: a device's queries stay put; keys and values are gathered from the others.
  Cheap with grouped-query attention (K heads, not H); the gathered keys grow with the length.
- `ring`: keys and values travel round the ring of devices (`ppermute`) while each device keeps
  an online softmax over the blocks it has seen; its backward pass sends the keys' gradients
  round with them. A device's memory grows with its own shard, never with the full length.

Both walk the key blocks in the same order with one blockwise kernel (fp32 softmax statistics,
a custom VJP that recomputes scores from the saved log-sum-exp), and skip a block that the
causal mask hides entirely. The mask comes from positions, not from array indices: causal is
"key position <= query position" (and, with segment ids, "same document"), so the load-balancing
reorder below needs no change to attention.

Load balancing. With a causal mask a contiguous split gives the last device the most visible
keys. `load_balance_order` cuts the sequence into 2N chunks and gives device r chunks r and
2N-1-r (the dual-chunk swap): every device then holds one early and one late chunk, and as
blocks start on chunk boundaries, every device computes the same number of visible blocks.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from sharding.rules import current_rules, splitting_axes

STRATEGIES = ("all_gather", "ring")
LENGTH = "length"  # the logical name context parallelism splits
_NEG = float(np.finfo(np.float32).min)


def context_axes(mesh=None) -> tuple[str, ...]:
    """The mesh axes (size > 1) that split the `length` of a [batch, length] activation, even
    inside a shard_map over them (a pipeline stage)."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return () if mesh.empty else splitting_axes(("batch", LENGTH), current_rules(), mesh.shape)


def context_degree(mesh=None) -> int:
    """Devices the sequence is split over (1: none)."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return math.prod(mesh.shape[a] for a in context_axes(mesh))


# ---------------------------------------------------------------- load balancing


def load_balance_order(length: int, n: int) -> np.ndarray:
    """Index permutation: device r of `n` holds chunks r and 2n-1-r of 2n equal chunks."""
    chunks = np.arange(length).reshape(2 * n, length // (2 * n))
    return np.concatenate([np.concatenate([chunks[r], chunks[2 * n - 1 - r]]) for r in range(n)])


def reorder(batch: dict, n: int) -> dict:
    """A [batch, length] batch in load-balanced order, with the `positions` that rotary and
    the causal mask follow (original indices, unless the batch brings its own). The loss is a
    sum over tokens, so it is unchanged."""
    length = batch["inputs"].shape[1]
    order = load_balance_order(length, n)
    out = {k: jnp.take(v, order, axis=1) if v.ndim >= 2 else v for k, v in batch.items()}
    if "positions" not in batch:
        out["positions"] = jnp.broadcast_to(jnp.asarray(order, jnp.int32), batch["inputs"].shape)
    return out


def restore(x: jax.Array, n: int, axis: int = 1) -> jax.Array:
    """Undo `reorder` along `axis` (e.g. logits back to the original token order)."""
    return jnp.take(x, np.argsort(load_balance_order(x.shape[axis], n)), axis=axis)


# ---------------------------------------------------------------- the blockwise kernel


def _visible(q_pos, k_pos, q_seg, k_seg):
    """[B, 1, 1, Tq, Tk] causal-by-position (and same-document) mask."""
    vis = k_pos[:, None, :] <= q_pos[:, :, None]
    if q_seg is not None:
        vis &= k_seg[:, None, :] == q_seg[:, :, None]
    return vis[:, None, None]


def _scores(q, k, scale):
    """q [B,Tq,K,G,D], k [B,Tk,K,D] -> fp32 scores [B,K,G,Tq,Tk]."""
    return jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale


def _any_visible(q_pos, k_pos):
    """Whether any key of a block can be visible to any query (a cheap, conservative test)."""
    return jnp.min(k_pos) <= jnp.max(q_pos)


BLOCK = 1024
"""Most positions in one block of queries or keys: a block pair's fp32 scores are
[batch, kv_heads, group, BLOCK, BLOCK], whatever the length."""


def _parts(t: int) -> int:
    """Blocks per device shard: the fewest of at most BLOCK positions each, an even number when
    `t` is (so the load-balanced order's two chunks start on block boundaries)."""
    step = 2 if t % 2 == 0 else 1
    parts = step
    while t % parts or t // parts > BLOCK:
        parts += step
    return parts


def _split(a, parts: int, axis: int = 1):
    """Split a length dimension into `parts` blocks stacked first: [parts, ...]."""
    return None if a is None else jnp.stack(jnp.split(a, parts, axis=axis))


def _at(tree, i):
    """Block i of each stacked array (None stays None)."""
    return tuple(None if a is None else jax.lax.dynamic_index_in_dim(a, i, 0, False) for a in tree)


def _put(tree, i, values):
    return tuple(
        jax.lax.dynamic_update_index_in_dim(a, v, i, 0) for a, v in zip(tree, values, strict=True)
    )


def _loop(body, carry, n: int):
    """`carry = body(i, carry)` for i < n, as a while loop: the kernel is never differentiated
    (its VJP is ours), and a remat policy around it (dots) cannot stack per-step scores out of
    a while loop the way it would out of a scan."""

    def step(state):
        i, carry = state
        return i + 1, body(i, carry)

    return jax.lax.while_loop(lambda state: state[0] < n, step, (jnp.int32(0), carry))[1]


def _forward_block(stats, q, q_pos, q_seg, k, v, k_pos, k_seg, scale):
    """Fold one key block into the running (max, sum, unnormalized output) of a query block."""
    m, denom, acc = stats
    s = _scores(q, k, scale)
    vis = _visible(q_pos, k_pos, q_seg, k_seg)
    m_new = jnp.maximum(m, jnp.max(jnp.where(vis, s, _NEG), axis=-1))
    p = jnp.exp(jnp.where(vis, s - m_new[..., None], _NEG))
    correction = jnp.exp(m - m_new)
    denom = denom * correction + jnp.sum(p, axis=-1)
    pv = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    acc = acc * jnp.moveaxis(correction, -1, 1)[..., None] + pv
    return m_new, denom, acc


def _backward_block(grads, q, q_pos, q_seg, do, lse, delta, k, v, k_pos, k_seg, scale):
    """Add one key block's share to (dq, dk, dv) from the saved log-sum-exp."""
    dq, dk, dv = grads
    s = _scores(q, k, scale)
    vis = _visible(q_pos, k_pos, q_seg, k_seg)
    p = jnp.exp(jnp.where(vis, s - lse[..., None], _NEG))
    f32 = dict(preferred_element_type=jnp.float32)
    dv = dv + jnp.einsum("bkgts,btkgd->bskd", p.astype(do.dtype), do, **f32)
    dp = jnp.einsum("btkgd,bskd->bkgts", do, v, **f32)
    ds = p * (dp - delta[..., None]) * scale
    dq = dq + jnp.einsum("bkgts,bskd->btkgd", ds.astype(k.dtype), k, **f32)
    dk = dk + jnp.einsum("bkgts,btkgd->bskd", ds.astype(q.dtype), q, **f32)
    return dq, dk, dv


def _each_pair(fn, queries, keys, carry_q, carry_k, parts: int):
    """`(cq, ck) = fn(cq, ck, query block, key block)` over every pair of a step's blocks,
    skipping (a `cond`) each pair the causal mask hides. queries: stacked (q, positions,
    segments, ...), keys: stacked (k, v, positions, segments); carry_q / carry_k: stacked
    per query / key block. Returns both carries."""

    def over_queries(a, carries):
        cq, ck = carries
        qa, cqa = _at(queries, a), _at(cq, a)

        def over_keys(b, inner):
            cqa, ck = inner
            kb = _at(keys, b)
            cqa, ckb = jax.lax.cond(
                _any_visible(qa[1], kb[2]),
                lambda cqa, ckb: fn(cqa, ckb, qa, kb),
                lambda cqa, ckb: (cqa, ckb),
                cqa,
                _at(ck, b),
            )
            return cqa, _put(ck, b, ckb) if ck else ck

        cqa, ck = _loop(over_keys, (cqa, ck), parts)
        return _put(cq, a, cqa), ck

    return _loop(over_queries, (carry_q, carry_k), parts)


class _Blocks:
    """Where step i's key block comes from: the ring (ppermute) or the gathered keys."""

    def __init__(self, strategy: str, axes: tuple[str, ...], n: int):
        self.strategy, self.axes, self.n = strategy, axes, n
        self.perm = [(j, (j + 1) % n) for j in range(n)]

    def gather(self, kv):
        if self.strategy == "ring":
            return kv
        return jax.tree.map(
            lambda a: None if a is None else jax.lax.all_gather(a, self.axes, axis=1, tiled=True),
            kv,
        )

    def at(self, gathered, current, i):
        """Step i's block: this device's own at i = 0, then the one from i devices before."""
        if self.strategy == "ring":
            return current
        r = jax.lax.axis_index(self.axes)
        j = (r - i) % self.n
        return jax.tree.map(
            lambda a: None if a is None else jax.lax.dynamic_slice_in_dim(
                a, j * (a.shape[1] // self.n), a.shape[1] // self.n, axis=1
            ),
            gathered,
        )  # fmt: skip

    def rotate(self, tree):
        return jax.tree.map(
            lambda a: None if a is None else jax.lax.ppermute(a, self.axes, self.perm), tree
        )


def _prepare(q, k):
    b, t, h, d = q.shape
    kv = k.shape[2]
    return q.reshape(b, t, kv, h // kv, d), d**-0.5


def _forward(strategy, axes, n, q, k, v, q_pos, q_seg):
    """Per device: this device's queries against every key block -> (out, lse [B,K,G,T])."""
    b, t, h, d = q.shape
    qg, scale = _prepare(q, k)
    kvh, g = k.shape[2], qg.shape[3]
    blocks = _Blocks(strategy, axes, n)
    kv = (k, v, q_pos, q_seg)
    gathered = blocks.gather(kv)
    parts = _parts(t)
    bs = t // parts
    queries = tuple(_split(a, parts) for a in (qg, q_pos, q_seg))
    stats = (
        _full((parts, b, kvh, g, bs), _NEG, q),
        _full((parts, b, kvh, g, bs), 0.0, q),
        _full((parts, b, bs, kvh, g, d), 0.0, q),
    )

    def fold(stats, _, qa, kb):
        return _forward_block(stats, *qa, *kb, scale), ()

    def step(i, carry):
        stats, current = carry
        keys = tuple(_split(a, parts) for a in blocks.at(gathered, current, i))
        stats, _ = _each_pair(fold, queries, keys, stats, (), parts)
        return stats, blocks.rotate(current) if strategy == "ring" else current

    (m, denom, acc), _ = _loop(step, (stats, kv), n)
    out = acc / jnp.moveaxis(denom, -1, 2)[..., None]  # [parts, B, bs, K, G, D]
    out = jnp.moveaxis(out, 0, 1).reshape(b, t, h, d).astype(q.dtype)
    lse = jnp.moveaxis(m + jnp.log(denom), 0, -2).reshape(b, kvh, g, t)
    return out, lse


def _backward(strategy, axes, n, q, k, v, q_pos, q_seg, out, lse, d_out):
    """Per device: (dq, dk, dv) of this device's queries and keys."""
    b, t, h, d = q.shape
    qg, scale = _prepare(q, k)
    kvh, g = k.shape[2], qg.shape[3]
    do = d_out.reshape(qg.shape)
    # delta = rowsum(dO * O): the softmax-gradient term, [B, K, G, T].
    delta = jnp.einsum("btkgd,btkgd->bkgt", do.astype(jnp.float32),
                       out.reshape(qg.shape).astype(jnp.float32))  # fmt: skip
    blocks = _Blocks(strategy, axes, n)
    kv = (k, v, q_pos, q_seg)
    gathered = blocks.gather(kv)
    parts = _parts(t)
    bs = t // parts
    queries = (*(_split(a, parts) for a in (qg, q_pos, q_seg, do)),
               _split(lse, parts, -1), _split(delta, parts, -1))  # fmt: skip
    zeros = lambda *shape: _full(shape, 0.0, q)  # noqa: E731

    def fold(dqa, dkb, qa, kb):
        dqa, dk, dv = _backward_block((*dqa, *dkb), *qa, *kb, scale)
        return (dqa,), (dk, dv)

    def step(i, carry):
        dq, current, d_current, d_gathered = carry
        keys = tuple(_split(a, parts) for a in blocks.at(gathered, current, i))
        if strategy == "ring":
            dkv = tuple(_split(a, parts) for a in d_current)
        else:
            dkv = (zeros(parts, b, bs, kvh, d), zeros(parts, b, bs, kvh, d))
        dq, dkv = _each_pair(fold, queries, keys, dq, dkv, parts)
        d_block = tuple(jnp.moveaxis(a, 0, 1).reshape(b, t, kvh, d) for a in dkv)
        if strategy == "ring":
            # The keys' gradients travel with them and are home after n rotations.
            return dq, blocks.rotate(current), blocks.rotate(d_block), d_gathered
        j = (jax.lax.axis_index(axes) - i) % n
        d_gathered = tuple(
            jax.lax.dynamic_update_slice_in_dim(
                a, jax.lax.dynamic_slice_in_dim(a, j * t, t, axis=1) + x, j * t, axis=1
            )
            for a, x in zip(d_gathered, d_block, strict=True)
        )
        return dq, current, d_current, d_gathered

    dq = (zeros(parts, b, bs, kvh, g, d),)
    ring = strategy == "ring"
    d_current = (zeros(b, t, kvh, d), zeros(b, t, kvh, d)) if ring else ()
    d_gathered = () if ring else (zeros(b, t * n, kvh, d), zeros(b, t * n, kvh, d))
    (dq,), _, d_current, d_gathered = _loop(step, (dq, kv, d_current, d_gathered), n)
    if not ring:
        d_current = tuple(
            jax.lax.psum_scatter(a, axes, scatter_dimension=1, tiled=True) for a in d_gathered
        )
    dq = jnp.moveaxis(dq, 0, 1).reshape(q.shape)
    dq, dk, dv = (_like(x, y) for x, y in zip((dq, *d_current), (q, k, v), strict=True))
    return dq, dk, dv


def _full(shape, value, ref):
    """An fp32 accumulator that varies over the manual axes `ref` does (carries of a scan or
    `cond` must keep one type)."""
    return _like(jnp.full(shape, value, jnp.float32), ref, jnp.float32)


def _like(x, ref, dtype=None):
    """`x` in `ref`'s dtype, varying over the same manual axes (inside a pipeline stage the
    inputs vary over `pipeline`; gradients built from zeros would not say so)."""
    missing = tuple(_varying(ref) - _varying(x))
    x = x.astype(dtype or ref.dtype)
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _varying(x) -> set[str]:
    """The manual mesh axes `x` varies over (`.mat.varying` on jax 0.10 and 0.11)."""
    aval = jax.typeof(x)
    return set(aval.mat.varying if hasattr(aval, "mat") else aval.vma)


# Inside a shard_map over the context axes (a pipeline stage): the per-device functions.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _local_attention(strategy, axes, n, q, k, v, q_pos, q_seg):
    return _local_fwd(strategy, axes, n, q, k, v, q_pos, q_seg)[0]


def _local_fwd(strategy, axes, n, q, k, v, q_pos, q_seg):
    out, lse = _forward(strategy, axes, n, q, k, v, q_pos, q_seg)
    return out, (q, k, v, q_pos, q_seg, out, lse)


def _local_bwd(strategy, axes, n, residuals, d_out):
    return (*_backward(strategy, axes, n, *residuals, d_out), None, None)


_local_attention.defvjp(_local_fwd, _local_bwd)


# On global arrays: one shard_map for the forward, one for the backward, the VJP taken
# outside them (the log-sum-exp is all the backward needs).
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(strategy, mesh, q, k, v, q_pos, q_seg):
    return _attention_fwd(strategy, mesh, q, k, v, q_pos, q_seg)[0]


def _per_device(fn, strategy, mesh, args, in_specs, out_specs):
    axes = context_axes(mesh)
    n = math.prod(mesh.shape[a] for a in axes)
    return jax.shard_map(
        functools.partial(fn, strategy, axes, n),
        mesh=mesh,
        in_specs=in_specs,
        out_specs=out_specs,
        axis_names=set(axes),
        check_vma=True,
    )(*args)


def _specs(mesh, q_seg):
    axes = context_axes(mesh)
    tokens, stats = P(None, axes), P(None, None, None, axes)
    return tokens, stats, None if q_seg is None else tokens


def _attention_fwd(strategy, mesh, q, k, v, q_pos, q_seg):
    tokens, stats, seg = _specs(mesh, q_seg)
    args = (q, k, v, q_pos, q_seg)
    out, lse = _per_device(
        _forward, strategy, mesh, args, (tokens, tokens, tokens, tokens, seg), (tokens, stats)
    )
    return out, (q, k, v, q_pos, q_seg, out, lse)


def _attention_bwd(strategy, mesh, residuals, d_out):
    tokens, stats, seg = _specs(mesh, residuals[4])
    in_specs = (tokens, tokens, tokens, tokens, seg, tokens, stats, tokens)
    dq, dk, dv = _per_device(
        _backward, strategy, mesh, (*residuals, d_out), in_specs, (tokens, tokens, tokens)
    )
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _on_gathered_keys(kernel, axes, n, q, k, v, q_pos, q_seg):
    """Per device: `kernel(q, k, v, visible)` on this device's queries and every device's keys
    (autodiff through the gather: its transpose reduce-scatters the keys' gradients)."""
    k_all, v_all, k_pos, k_seg = _Blocks("all_gather", axes, n).gather((k, v, q_pos, q_seg))
    return kernel(q, k_all, v_all, _visible(q_pos, k_pos, q_seg, k_seg)[:, 0, 0])


def context_attention(q, k, v, positions, segments=None, strategy="all_gather", gathered=None):
    """Causal grouped-query attention with the length split over the context axes: q [B,T,H,D],
    k/v [B,T,K,D], positions and segments [B,T] (global arrays, split by the rule table).
    `gathered(q, k, v, visible [B,T,S])`: with `all_gather`, a kernel to run on the gathered
    keys in place of the blockwise one (cuDNN's)."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = context_axes(mesh)
    n = math.prod(mesh.shape[a] for a in axes)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown context strategy {strategy!r}; use one of {STRATEGIES}")
    if gathered is not None and strategy != "all_gather":
        raise ValueError("a gathered-keys kernel runs only with the all_gather strategy")
    if q.shape[1] % n:
        raise ValueError(f"context attention needs a length divisible by {n}, got {q.shape[1]}")
    positions = positions.astype(jnp.int32)
    segments = None if segments is None else segments.astype(jnp.int32)
    if set(axes) <= set(mesh.manual_axes):
        # Already per device: a pipeline stage is manual over the context axes too, since a
        # shard_map nested in its remat fails to lower (jax 0.10, 0.11).
        if gathered is None:
            return _local_attention(strategy, axes, n, q, k, v, positions, segments)
        return _on_gathered_keys(gathered, axes, n, q, k, v, positions, segments)
    if gathered is None:
        return _attention(strategy, mesh, q, k, v, positions, segments)

    def body(_, axes, n, *args):
        return _on_gathered_keys(gathered, axes, n, *args)

    tokens, _, seg = _specs(mesh, segments)
    args = (q, k, v, positions, segments)
    return _per_device(body, strategy, mesh, args, (tokens,) * 4 + (seg,), tokens)
