"""The pure train and eval steps, and the train state they carry.

`train_step(state, batch) -> (state, metrics)` is one pure function of pytrees: the model's
graph definition is closed over, its parameters travel in `state`. `engine.trainer.setup` jits
both steps once, with explicit in/out shardings and donated state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec as P

from engine.precision import LossScale, Policy

Batch = dict[str, jax.Array]


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # nnx.State of nnx.Param, each carrying its logical axis names
    opt_state: Any
    loss_scale: LossScale | None  # only under the fp16 policy


def cross_entropy(logits, targets, mask):
    """Summed token loss, number of counted tokens and number of correct argmax predictions."""
    logits = logits.astype(jnp.float32)
    # XLA partitions this gather over a vocab-sharded axis without gathering the logits.
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    losses = jax.nn.logsumexp(logits, axis=-1) - target_logit
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(mask), jnp.sum(correct * mask)


def chunked_cross_entropy(logits_fn, x, targets, mask, chunks: int):
    """`cross_entropy(logits_fn(x), ...)` over `chunks` pieces of the sequence in turn, each
    piece's logits recomputed in the backward pass: only [batch, length/chunks, vocab] logits
    exist at a time."""
    b, t = targets.shape
    pieces = lambda a: a.reshape(b, chunks, t // chunks, *a.shape[2:]).swapaxes(0, 1)  # noqa: E731

    @jax.checkpoint
    def piece(totals, xs):
        x, targets, mask = xs
        return jax.tree.map(jnp.add, totals, cross_entropy(logits_fn(x), targets, mask)), None

    zero = jnp.zeros((), jnp.float32)
    totals, _ = jax.lax.scan(piece, (zero, zero, zero), (pieces(x), pieces(targets), pieces(mask)))
    return totals


def make_loss_fn(graphdef: nnx.GraphDef, policy: Policy, loss_chunks: int = 1):
    """Summed loss, counted tokens and correct predictions of a batch; with `loss_chunks` > 1
    (a sequence model: `features` then `logits`) the output layer runs in pieces."""

    def loss_fn(params, batch: Batch):
        model = nnx.merge(graphdef, policy.cast_to_compute(params))
        inputs = policy.cast_to_compute(batch["inputs"])
        extra = {"segments": batch["segments"]} if "segments" in batch else {}
        if loss_chunks == 1:
            logits = policy.cast_to_output(model(inputs, **extra))
            return cross_entropy(logits, batch["targets"], batch["mask"])
        logits_fn = lambda x: policy.cast_to_output(model.logits(x))  # noqa: E731
        features = model.features(inputs, **extra)
        return chunked_cross_entropy(
            logits_fn, features, batch["targets"], batch["mask"], loss_chunks
        )

    return loss_fn


def split_microbatches(batch: Batch, n: int, sharding: NamedSharding | None) -> Batch:
    """[B, ...] -> [n, B/n, ...] taking every n-th row, so each microbatch keeps its rows on the
    devices that already hold them (a contiguous split would move data between devices)."""

    def split(x):
        x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
        if sharding is not None:
            spec = P(None, sharding.spec[0])  # rows split as before; the rest as it was
            x = jax.lax.with_sharding_constraint(x, NamedSharding(sharding.mesh, spec))
        return x

    return jax.tree.map(split, batch)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: Callable,
    policy: Policy,
    clip_norm: float = 0.0,
    microbatches: int = 1,
    batch_sharding: NamedSharding | None = None,
    skip_nonfinite: bool = False,
    loss_chunks: int = 1,
):
    """`tx` is the update rule (AdamW); the step itself clips to `clip_norm` (0 = off). With
    `skip_nonfinite` (always under loss scaling) a step whose loss or gradient is not finite
    keeps the old params and optimizer state and reports `skipped: 1`."""
    skip_nonfinite = skip_nonfinite or policy.loss_scaling
    loss_fn = make_loss_fn(graphdef, policy, loss_chunks)

    def scaled_loss(params, batch, scale):
        loss_sum, count, correct = loss_fn(params, batch)
        # Divide by the (static) number of positions, not the counted tokens: a count would
        # need an all-reduce before the backward pass could start. The exact mean is restored
        # by one scalar below, folded into the clipping multiply.
        return loss_sum * scale / batch["mask"].size, loss_sum

    grad_fn = jax.grad(scaled_loss, has_aux=True)

    def train_step(state: TrainState, batch: Batch):
        scale = state.loss_scale.scale if state.loss_scale is not None else jnp.float32(1)
        if microbatches == 1:
            grads, loss_sum = grad_fn(state.params, batch, scale)
        else:
            # Accumulate gradients over microbatches; one optimizer update at the end.
            def accumulate(carry, micro):
                return jax.tree.map(jnp.add, carry, grad_fn(state.params, micro, scale)), None

            zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.float32(0))
            micro = split_microbatches(batch, microbatches, batch_sharding)
            (grads, loss_sum), _ = jax.lax.scan(accumulate, zeros, micro)

        # One multiply turns the summed, scaled gradients into the clipped mean over counted
        # tokens of the global batch.
        count = jnp.sum(batch["mask"])
        to_mean = batch["mask"].size / (microbatches * count * scale)
        grad_norm = optax.tree.norm(grads) * to_mean
        factor = to_mean
        if clip_norm > 0:
            factor = to_mean * jnp.minimum(1.0, clip_norm / grad_norm)
        grads = jax.tree.map(lambda g: g * factor.astype(g.dtype), grads)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        loss_scale = state.loss_scale
        metrics = {"loss": loss_sum / count, "grad_norm": grad_norm, "lr": schedule(state.step)}
        if skip_nonfinite:
            # A non-finite step (an fp16 overflow, a bad batch) keeps the old params and
            # optimizer state; under loss scaling the scale halves.
            finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss_sum)
            keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
            params = jax.tree.map(keep, params, state.params)
            opt_state = jax.tree.map(keep, opt_state, state.opt_state)
            if loss_scale is not None:
                loss_scale = loss_scale.update(finite)
            metrics["skipped"] = 1 - finite.astype(jnp.float32)
        return TrainState(state.step + 1, params, opt_state, loss_scale), metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, policy: Policy, loss_chunks: int = 1):
    loss_fn = make_loss_fn(graphdef, policy, loss_chunks)

    def eval_step(params, batch: Batch):
        loss_sum, count, correct = loss_fn(params, batch)
        return {"loss_sum": loss_sum, "count": count, "correct": correct}

    return eval_step
