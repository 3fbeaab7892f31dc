"""AdamW with linear warmup and cosine decay (optax); global-norm clipping lives in the step.

Every scalar here is a runtime input of the compiled step (`hyperparams`, carried in the train
state), not a constant compiled into it: runs that differ only in learning rate, warmup, betas,
weight decay or clipping share one executable and the persistent compilation cache, which is
what a hyper-parameter search needs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate, reached after the linear warmup."""
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    """The schedule decays to lr * min_lr_ratio at the last step."""
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    microbatches: int = 1
    """Gradient accumulation: split the global batch into this many sequential microbatches."""


def hyperparams(cfg: OptimConfig, total_steps: int) -> dict[str, jax.Array]:
    """The runtime scalars of the optimizer and its schedule, as float32 arrays."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    end = cfg.lr * cfg.min_lr_ratio
    values = {
        "lr": cfg.lr,
        "warmup_steps": warmup,
        "decay_steps": max(total_steps, warmup + 1),
        # As optax derives it (end / peak in float64), so the schedule matches it bit for bit.
        "min_lr_ratio": end / cfg.lr if cfg.lr else 0.0,
        "b1": cfg.b1,
        "b2": cfg.b2,
        "eps": cfg.eps,
        "weight_decay": cfg.weight_decay,
        "clip_norm": cfg.clip_norm,
    }
    return {k: jnp.float32(v) for k, v in values.items()}


def learning_rate(h: dict, step: jax.Array) -> jax.Array:
    """optax.warmup_cosine_decay_schedule(0, lr, warmup, decay, lr * min_lr_ratio) from runtime
    values. Divisions are written as the reciprocal products XLA turns optax's constant
    divisors into, and products in optax's order (jax 0.12's XLA no longer reassociates them),
    so the rates are the same bit for bit (checked over whole schedules)."""
    step = jnp.asarray(step, jnp.float32)
    warmup, lr, alpha = h["warmup_steps"], h["lr"], h["min_lr_ratio"]
    frac = 1 - jnp.clip(step, 0, warmup) * (1 / jnp.maximum(warmup, 1.0))
    warm = -lr * frac + lr
    decay = h["decay_steps"] - warmup
    count = jnp.minimum(step - warmup, decay)
    cosine = 0.5 * (1 + jnp.cos(jnp.float32(jnp.pi) * count * (1 / decay)))
    return jnp.where(step < warmup, warm, lr * ((1 - alpha) * cosine + alpha))


def _decay_mask(params):
    # Decay matrices only: norms and biases keep their scale.
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def adamw(h: dict, lr) -> optax.GradientTransformation:
    """AdamW whose scalars are (traced) values of `h`; its state has the same structure for
    any values, so the state made by `make_optimizer` serves it."""
    return optax.adamw(
        lr, b1=h["b1"], b2=h["b2"], eps=h["eps"], weight_decay=h["weight_decay"], mask=_decay_mask
    )


def make_optimizer(cfg: OptimConfig, total_steps: int):
    """AdamW with its schedule as plain optax (constants compiled in): the train state's
    initial optimizer state, and the reference the engine's step is tested against.

    Clipping (`cfg.clip_norm`) is applied by the train step, which already holds the norm.
    """
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )
    tx = optax.adamw(
        schedule,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=_decay_mask,
    )
    return tx, schedule
