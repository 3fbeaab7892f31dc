"""AdamW with linear warmup and cosine decay (optax); global-norm clipping lives in the step."""

from __future__ import annotations

import dataclasses

import jax
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


def make_optimizer(cfg: OptimConfig, total_steps: int):
    """AdamW and its learning-rate schedule (for logging).

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
    # Decay matrices only: norms and biases keep their scale.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    adamw = optax.adamw(
        schedule,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    return adamw, schedule
