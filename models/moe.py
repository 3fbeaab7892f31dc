"""Mixture-of-Experts feed-forward: a softmax top-k router and SwiGLU experts.

The block routes in fp32 whatever the precision policy, reports its load-balance and z losses
and its expert load as aux values, and hands the token movement to `sharding.route_to_experts`,
which sorts tokens by expert and, when the rule table splits the `expert` dimension over mesh
axes, exchanges them with an all-to-all. The model names only logical dimensions.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from models.layers import FEED_FORWARD, Aux, SwiGLU, dense, param
from sharding import constrain, route_to_experts


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    experts: int = 0
    """Routed experts per MoE layer; 0 = a dense model."""
    top_k: int = 2
    """Experts each token goes through."""
    d_ff: int = 0
    """Each expert's hidden width; 0 = the model's d_ff."""
    shared_experts: int = 0
    """Experts every token also goes through, unrouted (one SwiGLU of shared_experts x d_ff)."""
    every: int = 1
    """Every N-th layer (layers N-1, 2N-1, ...) is MoE and the others dense, like Qwen's
    decoder_sparse_step; 1 = all layers."""
    norm_topk: bool = True
    """Renormalize the top-k router probabilities to sum to 1 (Mixtral; Qwen3-MoE's
    norm_topk_prob)."""
    capacity_factor: float | None = None
    """None = dropless. Else each expert takes at most ceil(factor x length x top_k / experts)
    tokens of each sequence (first choices first); the rest skip it and keep the residual."""
    aux_loss_weight: float = 0.01
    """Weight of the Switch load-balancing loss E * sum_e f_e * P_e (1.0 when balanced)."""
    z_loss_weight: float = 0.0
    """Weight of the router z-loss, mean(logsumexp(router logits)^2) (ST-MoE)."""

    def expert_d_ff(self, dense_d_ff: int) -> int:
        return self.d_ff or dense_d_ff

    def is_moe(self, layer: int) -> bool:
        return self.experts > 0 and (layer + 1) % self.every == 0

    def capacity(self, length: int) -> int | None:
        """Slots per expert per sequence, or None (dropless)."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * length * self.top_k / self.experts)


# ---------------------------------------------------------------- expert computations


def swiglu_grouped(weights, rows, group_sizes):
    """Rows sorted by expert through their expert's SwiGLU: one grouped matmul per weight.
    rows [M, D]; group_sizes [E] (rows past their sum are padding and come out zero)."""
    gate, up, down = weights
    hidden = jax.nn.silu(jax.lax.ragged_dot(rows, gate, group_sizes))
    hidden = hidden * jax.lax.ragged_dot(rows, up, group_sizes)
    return jax.lax.ragged_dot(hidden, down, group_sizes)


def swiglu_batched(weights, slots):
    """Each expert's slots through its SwiGLU: slots [E, C, D] -> [E, C, D]."""
    gate, up, down = weights
    hidden = jax.nn.silu(jnp.einsum("ecd,edf->ecf", slots, gate))
    hidden = hidden * jnp.einsum("ecd,edf->ecf", slots, up)
    return jnp.einsum("ecf,efd->ecd", hidden, down)


# ---------------------------------------------------------------- the block


def route(logits, top_k: int, norm_topk: bool):
    """Softmax over the experts, then the top k: (probabilities [.., E], top-k weights and
    expert ids [.., k]); all fp32."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return probs, weights, experts


def router_losses(logits, probs, experts, num_experts: int) -> Aux:
    """The Switch load-balancing loss over top-k assignments (f_e: share of assignments to
    expert e, P_e: mean router probability), the z-loss, and the load of the busiest expert
    relative to the mean."""
    counts = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32), axis=(0, 1, 2))
    share = counts / jnp.sum(counts)
    mean_prob = jnp.mean(probs, axis=(0, 1))
    z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return {
        "moe_aux_loss": num_experts * jnp.sum(share * mean_prob),
        "moe_z_loss": jnp.mean(z * z),
        "moe_load_max": jnp.max(share) * num_experts,
    }


# The experts' logical names: whole experts, each an (embed -> mlp -> embed) SwiGLU.
IN_NAMES, OUT_NAMES = ("expert", "embed", "mlp"), ("expert", "mlp", "embed")


class MoE(nnx.Module):
    """Routed SwiGLU experts (plus optional shared ones): h [B,T,D] -> (y, aux)."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        moe = cfg.moe
        d, e, f = cfg.d_model, moe.experts, moe.expert_d_ff(cfg.d_ff)
        std, out_std = 0.02, 0.02 / (2 * cfg.n_layers) ** 0.5
        self.cfg = moe
        self.router = param(rngs, (d, e), ("embed", None), std)
        self.w_gate = param(rngs, (e, d, f), IN_NAMES, std)
        self.w_up = param(rngs, (e, d, f), IN_NAMES, std)
        self.w_down = param(rngs, (e, f, d), OUT_NAMES, out_std)
        if moe.shared_experts:
            shared = dataclasses.replace(cfg, d_ff=moe.shared_experts * f)
            self.shared = SwiGLU(shared, rngs)

    def __call__(self, h) -> tuple[jax.Array, Aux]:
        moe = self.cfg
        # Router in fp32: bf16 logits change which experts win.
        logits = dense(h.astype(jnp.float32), self.router[...].astype(jnp.float32))
        probs, weights, experts = route(logits, moe.top_k, moe.norm_topk)
        aux = router_losses(logits, probs, experts, moe.experts)
        y, dropped = route_to_experts(
            h,
            experts,
            weights.astype(h.dtype),
            (self.w_gate[...], self.w_up[...], self.w_down[...]),
            (IN_NAMES, IN_NAMES, OUT_NAMES),
            swiglu_grouped,
            swiglu_batched,
            capacity=moe.capacity(h.shape[1]),
        )
        aux["moe_dropped"] = dropped / experts.size
        if moe.shared_experts:
            y = y + self.shared(h)[0]
        y = constrain(y, ("batch", "length", "embed"))
        return checkpoint_name(y, "mlp_out"), aux


FEED_FORWARD["moe"] = MoE
