"""The pure train and eval steps, and the train state they carry.

`train_step(state, batch) -> (state, metrics)` is one pure function of pytrees: the model's
graph definition is closed over, its parameters travel in `state`. `engine.trainer.setup` jits
both steps once, with explicit in/out shardings and donated state.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec as P

from engine.optim import adamw, learning_rate
from engine.precision import LossScale, Policy
from sharding.context import context_degree, reorder

Batch = dict[str, jax.Array]


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # nnx.State of nnx.Param, each carrying its logical axis names
    opt_state: Any
    loss_scale: LossScale | None  # only under the fp16 policy
    hyperparams: dict[str, jax.Array]  # engine.optim.hyperparams: runtime, never compiled in


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
    exist at a time. With the sequence split over n devices, piece i is the i-th of each
    device's `chunks` parts, so every piece stays split n ways (the loss is a sum: any order)."""
    b, t = targets.shape
    n = context_degree()

    def pieces(a):
        a = a.reshape(b, n, chunks, t // (n * chunks), *a.shape[2:])
        return jnp.moveaxis(a, 2, 0).reshape(chunks, b, t // chunks, *a.shape[4:])

    @jax.checkpoint
    def piece(totals, xs):
        x, targets, mask = xs
        return jax.tree.map(jnp.add, totals, cross_entropy(logits_fn(x), targets, mask)), None

    zero = jnp.zeros((), jnp.float32)
    totals, _ = jax.lax.scan(piece, (zero, zero, zero), (pieces(x), pieces(targets), pieces(mask)))
    return totals


SUMS = ("loss_sum", "count", "correct")


def make_losses_fn(
    graphdef: nnx.GraphDef, policy: Policy, loss_chunks: int = 1, load_balance: bool = False
):
    """`(params, batch) -> named values`: `loss_sum`, `count` (counted tokens) and `correct`
    (argmax predictions), summed over the batch; then each named aux value the layers report
    (averaged over layers), e.g. an MoE balance loss.

    A sequence model (`features(inputs, segments, positions) -> (x, aux)`, then `logits(x)`)
    may run its output layer in `loss_chunks` pieces; any other model is `model(inputs)`.
    With `load_balance` and the sequence split over devices, each sequence is first reordered
    (sharding.context.reorder): the sums are unchanged, the causal work evens out."""

    def losses_fn(params, batch: Batch) -> dict[str, jax.Array]:
        model = nnx.merge(graphdef, policy.cast_to_compute(params))
        if not hasattr(model, "features"):
            logits = policy.cast_to_output(model(policy.cast_to_compute(batch["inputs"])))
            return dict(
                zip(SUMS, cross_entropy(logits, batch["targets"], batch["mask"]), strict=True)
            )
        split = context_degree()
        if load_balance and split > 1:
            batch = reorder(batch, split)
        inputs = policy.cast_to_compute(batch["inputs"])
        features, aux = model.features(inputs, batch.get("segments"), batch.get("positions"))
        logits_fn = lambda x: policy.cast_to_output(model.logits(x))  # noqa: E731
        targets, mask = batch["targets"], batch["mask"]
        if loss_chunks == 1:
            sums = cross_entropy(logits_fn(features), targets, mask)
        else:
            sums = chunked_cross_entropy(logits_fn, features, targets, mask, loss_chunks)
        clash = set(aux) & set(SUMS)
        if clash:
            raise ValueError(f"a layer reports aux value(s) {sorted(clash)}, names the loss uses")
        return {
            **dict(zip(SUMS, sums, strict=True)),
            **{k: v.astype(jnp.float32) for k, v in aux.items()},
        }

    return losses_fn


def make_loss_fn(graphdef: nnx.GraphDef, policy: Policy, loss_chunks: int = 1, **kwargs):
    """`(params, batch) -> (loss_sum, count, correct)`: make_losses_fn without the aux values."""
    losses_fn = make_losses_fn(graphdef, policy, loss_chunks, **kwargs)

    def loss_fn(params, batch: Batch):
        values = losses_fn(params, batch)
        return tuple(values[k] for k in SUMS)

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
    policy: Policy,
    microbatches: int = 1,
    batch_sharding: NamedSharding | None = None,
    skip_nonfinite: bool = False,
    loss_chunks: int = 1,
    aux_weights: dict[str, float] | None = None,
    load_balance: bool = False,
):
    """AdamW (engine.optim) with the state's runtime hyperparameters; the step itself clips
    the global gradient norm. An aux value named in `aux_weights` is added to the loss with
    that weight; every aux value is reported as a metric under its name. With
    `skip_nonfinite` (always under loss scaling) a step whose loss or gradient is not finite
    keeps the old params and optimizer state and reports `skipped: 1`."""
    skip_nonfinite = skip_nonfinite or policy.loss_scaling
    losses_fn = make_losses_fn(graphdef, policy, loss_chunks, load_balance)
    aux_weights = aux_weights or {}

    def scaled_loss(params, batch, scale):
        values = losses_fn(params, batch)
        aux = {k: v for k, v in values.items() if k not in SUMS}
        # Divide by the (static) number of positions, not the counted tokens: a count would
        # need an all-reduce before the backward pass could start. The exact mean is restored
        # by one scalar below, folded into the clipping multiply.
        objective = values["loss_sum"] / batch["mask"].size
        if aux_weights:  # weighted so that the mean-restoring multiply leaves them as given
            tokens = jax.lax.stop_gradient(jnp.sum(batch["mask"])) / batch["mask"].size
            objective += tokens * sum(w * aux[name] for name, w in aux_weights.items())
        return objective * scale, (values["loss_sum"], aux)

    grad_fn = jax.grad(scaled_loss, has_aux=True)

    def train_step(state: TrainState, batch: Batch):
        h = state.hyperparams
        scale = state.loss_scale.scale if state.loss_scale is not None else jnp.float32(1)
        if microbatches == 1:
            grads, (loss_sum, aux) = grad_fn(state.params, batch, scale)
        else:
            # Accumulate gradients over microbatches; one optimizer update at the end.
            def accumulate(carry, micro):
                return jax.tree.map(jnp.add, carry, grad_fn(state.params, micro, scale)), None

            micro = split_microbatches(batch, microbatches, batch_sharding)
            shapes = jax.eval_shape(
                grad_fn, state.params, jax.tree.map(lambda x: x[0], micro), scale
            )
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            (grads, (loss_sum, aux)), _ = jax.lax.scan(accumulate, zeros, micro)
            aux = jax.tree.map(lambda a: a / microbatches, aux)

        # One multiply turns the summed, scaled gradients into the clipped mean over counted
        # tokens of the global batch.
        count = jnp.sum(batch["mask"])
        to_mean = batch["mask"].size / (microbatches * count * scale)
        grad_norm = optax.tree.norm(grads) * to_mean
        clip = jnp.where(h["clip_norm"] > 0, jnp.minimum(1.0, h["clip_norm"] / grad_norm), 1.0)
        factor = to_mean * clip
        grads = jax.tree.map(lambda g: g * factor.astype(g.dtype), grads)

        lr = learning_rate(h, state.step)
        updates, opt_state = adamw(h, lr).update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        loss_scale = state.loss_scale
        metrics = {"loss": loss_sum / count, "grad_norm": grad_norm, "lr": lr, **aux}
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
        return TrainState(state.step + 1, params, opt_state, loss_scale, h), metrics

    return train_step


def make_eval_step(graphdef, policy: Policy, loss_chunks: int = 1, load_balance: bool = False):
    """`(params, batch) -> named values`: loss_sum, count, correct, and each aux value."""
    return make_losses_fn(graphdef, policy, loss_chunks, load_balance)
