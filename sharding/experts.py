"""Expert parallelism: moving tokens to their experts and back.

`route_to_experts` runs per device (a `shard_map` over the mesh): each device sorts its own
tokens by expert, so sorting never crosses devices. When the rule table splits the `expert`
dimension of the weights over mesh axes, each device holds E/ep whole experts and the tokens
travel to them and back by an all-to-all over those axes; dimensions the rules split by other
axes (an expert's hidden dimension over `tensor`) stay split, and the partial results are
summed. Two ways to run the experts:

- dropless (capacity None): one grouped matmul (`lax.ragged_dot`) per weight over the rows
  sorted by expert. Across `ep` devices each device's send buffer has room for all its rows to
  go to one peer ([ep, rows, D]): static shapes without `ragged_all_to_all` (not on XLA:CPU).
- capacity C: each sequence gives every expert C slots, first choices claiming slots before
  second choices (GShard); a (token, expert) pair without a slot is dropped and the token keeps
  only its residual. Experts run as batched dense matmuls over [E, slots, D].

Nothing here knows a model: the expert computation comes in as functions of the weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sharding.rules import axes_of, current_rules, dividing, logical_to_spec


def route_to_experts(
    x: jax.Array,
    experts: jax.Array,
    gates: jax.Array,
    weights: Sequence[jax.Array],
    weight_names: Sequence[Sequence[str | None]],
    grouped: Callable,
    batched: Callable,
    capacity: int | None = None,
    hidden: str = "mlp",
):
    """The gate-weighted sum of each token's experts: x [B,T,D], experts and gates [B,T,k];
    `weights` [E, ...] with logical `weight_names`. `grouped(weights, rows [M,D], sizes [E])`
    and `batched(weights, slots [E,C,D])` run the experts; both must end with a contraction
    over the `hidden` dimension. Returns (y [B,T,D], dropped (token, expert) pairs)."""
    num_experts = weights[0].shape[0]
    mesh = jax.sharding.get_abstract_mesh()
    manual = () if mesh.empty else tuple(
        a for a, n in mesh.shape.items() if n > 1 and a not in mesh.manual_axes
    )  # fmt: skip
    if not manual or mesh.manual_axes:
        # Inside another shard_map (a pipeline stage) a nested one fails to lower on jax 0.10
        # and 0.11 once differentiated under remat (its residuals' layouts name the outer
        # axes). There the rules' automatic partitioning runs the same computation, gathering
        # each layer's experts instead of moving tokens.
        return _per_device(x, experts, gates, weights, grouped, batched, num_experts, capacity)

    rules = current_rules()
    # The batch (and, dropless, length) axes that divide these tokens (a small generation batch
    # may not split at all; tokens replicated over an expert axis still reach every expert,
    # each copy once). Capacity is counted per whole sequence, so its length stays whole.
    names = ("batch", "length" if capacity is None else None, None)
    token_spec = dividing(logical_to_spec(names, rules, mesh), x.shape, mesh)
    token_axes = tuple(a for entry in token_spec for a in axes_of(entry))
    kept = lambda names: tuple(  # noqa: E731
        s if n in ("expert", hidden) else None
        for n, s in zip(names, logical_to_spec(names, rules, mesh), strict=True)
    )
    weight_specs = tuple(P(*kept(names)) for names in weight_names)
    expert_axes = axes_of(weight_specs[0][0])
    reduce_axes = tuple(
        dict.fromkeys(
            a for names, spec in zip(weight_names, weight_specs, strict=True)
            for n, s in zip(names, spec, strict=False) if n == hidden for a in axes_of(s)
        )
    )  # fmt: skip
    ep = math.prod(mesh.shape[a] for a in expert_axes)
    copies = tuple(a for a in expert_axes if a not in token_axes)

    def body(x, experts, gates, weights):
        y, dropped = _per_device(
            x, experts, gates, weights, grouped, batched, num_experts, capacity,
            expert_axes or None, ep,
        )  # fmt: skip
        if reduce_axes:
            y = jax.lax.psum(y, reduce_axes)
        if copies:  # identical copies on these axes: their mean says so to shard_map
            y, dropped = jax.lax.pmean((y, dropped), copies)
        return y, jax.lax.psum(dropped, token_axes) if token_axes else dropped

    dtype, weights = x.dtype, tuple(weights)
    if jax.default_backend() == "cpu":
        # XLA:CPU aborts compiling the bf16 all-reduces this implies (AllReducePromotion,
        # jax 0.10): on a CPU the block's collectives and gradients reduce in fp32.
        x, gates, weights = jax.tree.map(lambda a: a.astype(jnp.float32), (x, gates, weights))
    y, dropped = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(token_spec, token_spec, token_spec, weight_specs),
        out_specs=(token_spec, P()),
        axis_names=set(manual),
        check_vma=True,
    )(x, experts, gates, weights)
    return y.astype(dtype), dropped


def _per_device(x, experts, gates, weights, grouped, batched, num_experts, capacity,
                axis=None, ep=1):  # fmt: skip
    b, t, d = x.shape
    k = experts.shape[-1]
    if capacity is None:
        out = _dropless(x.reshape(b * t, d), experts.reshape(-1), weights, grouped,
                        num_experts, axis, ep)  # fmt: skip
        y = jnp.sum(out.reshape(b, t, k, d) * gates[..., None], axis=2)
        return y, jnp.zeros((), jnp.float32)
    return _with_capacity(x, experts, gates, weights, batched, num_experts, capacity, axis, ep)


def _dropless(tokens, assigned, weights, grouped, num_experts, axis, ep):
    """tokens [N, D], assigned [N*k] expert ids (token-major) -> each assignment's expert
    output [N*k, D]."""
    n, d = tokens.shape
    k = assigned.size // n
    order = jnp.argsort(assigned, stable=True)
    # Each token's k copies, then a permutation: the backward sums the copies and scatters
    # without atomics (`tokens[order // k]` scatter-adds k rows into each, contended atomics
    # on a GPU, compare-and-swap loops in bf16).
    rows = jnp.take(jnp.repeat(tokens, k, axis=0), order, axis=0, unique_indices=True)
    counts = jnp.bincount(assigned, length=num_experts)
    if ep == 1:
        out = grouped(weights, rows, counts)
    else:
        local = num_experts // ep
        per_peer = counts.reshape(ep, local)
        peer_start = jnp.cumsum(per_peer.sum(1)) - per_peer.sum(1)
        peer = assigned[order] // local
        slot = jnp.arange(n * k) - peer_start[peer]
        send = jnp.zeros((ep, n * k, d), rows.dtype).at[peer, slot].set(rows)
        received = jax.lax.all_to_all(send, axis, 0, 0)  # [source, n*k, D]
        received_counts = jax.lax.all_to_all(per_peer, axis, 0, 0)  # [source, local]
        # Each source's rows arrive sorted by local expert, then padding: regroup by expert.
        # One sorted search over all sources: source s's expert ends, offset by s * n*k.
        offset = jnp.arange(ep)[:, None] * (n * k)
        ends = (jnp.cumsum(received_counts, axis=1) + offset).reshape(-1)
        position = jnp.arange(ep * n * k).reshape(ep, n * k)
        expert_of = (
            jnp.searchsorted(ends, position, side="right", method="sort")
            - offset // (n * k) * local
        )
        regroup = jnp.argsort(expert_of.reshape(-1), stable=True)
        received = jnp.take(received.reshape(-1, d), regroup, axis=0, unique_indices=True)
        computed = grouped(weights, received, received_counts.sum(0))
        back = jnp.zeros_like(computed).at[regroup].set(computed, unique_indices=True)
        back = back.reshape(ep, n * k, d)
        out = jax.lax.all_to_all(back, axis, 0, 0)[peer, slot]
    return jnp.zeros_like(out).at[order].set(out, unique_indices=True)


def _with_capacity(x, experts, gates, weights, batched, num_experts, capacity, axis, ep):
    b, t, d = x.shape
    k = experts.shape[-1]
    # Choice-major within each sequence: every first choice claims a slot before any second.
    chosen = experts.swapaxes(1, 2).reshape(b, k * t)
    one_hot = jax.nn.one_hot(chosen, num_experts, dtype=jnp.int32)
    position = jnp.sum(jnp.cumsum(one_hot, axis=1) * one_hot, axis=-1) - 1  # [b, k*t]
    kept = position < capacity
    slot = jnp.where(kept, position, capacity)  # out of range: dropped by the scatter
    rows = jnp.arange(b)[:, None]
    slots = jnp.zeros((b, num_experts, capacity, d), x.dtype)
    # Each sequence k times over, choice-major (x[rows, tile(arange(t), k)] without a gather,
    # whose backward would scatter-add k rows into each token).
    slots = slots.at[rows, chosen, slot].set(jnp.tile(x, (1, k, 1)), mode="drop")
    slots = slots.swapaxes(0, 1).reshape(num_experts, b * capacity, d)
    if ep == 1:
        out = batched(weights, slots)
    else:
        local = num_experts // ep
        received = jax.lax.all_to_all(slots.reshape(ep, local, b * capacity, d), axis, 0, 0)
        received = received.swapaxes(0, 1).reshape(local, ep * b * capacity, d)
        out = batched(weights, received).reshape(local, ep, b * capacity, d).swapaxes(0, 1)
        out = jax.lax.all_to_all(out, axis, 0, 0).reshape(num_experts, b * capacity, d)
    out = out.reshape(num_experts, b, capacity, d).swapaxes(0, 1)
    picked = out.at[rows, chosen, slot].get(mode="fill", fill_value=0)  # [b, k*t, D]
    picked = picked.reshape(b, k, t, d).swapaxes(1, 2)
    y = jnp.sum(picked * gates[..., None], axis=2)
    return y, jnp.sum(1 - kept).astype(jnp.float32)
