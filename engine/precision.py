"""Precision policy: compute and output dtypes over fp32 storage, and fp16 dynamic loss scaling.

Casts happen once, at the model boundary (params and floating inputs to the compute dtype,
logits to the output dtype), never inside layers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct


@dataclasses.dataclass(frozen=True)
class Policy:
    """Parameters and optimizer state are always stored in fp32; this says how they compute."""

    compute_dtype: jnp.dtype
    output_dtype: jnp.dtype
    loss_scaling: bool = False

    def cast_to_compute(self, tree):
        return _cast_floating(tree, self.compute_dtype)

    def cast_to_output(self, tree):
        return _cast_floating(tree, self.output_dtype)


def _cast_floating(tree, dtype):
    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(cast, tree)


POLICIES = {
    "fp32": Policy(jnp.float32, jnp.float32),
    # fp32 master weights and optimizer state, bf16 matmuls, fp32 logits and loss.
    "bf16": Policy(jnp.bfloat16, jnp.float32),
    # fp16's narrow exponent underflows small gradients: scale the loss up, check, scale back.
    "fp16": Policy(jnp.float16, jnp.float32, loss_scaling=True),
}


@struct.dataclass
class LossScale:
    """Dynamic loss scale: halve on overflow (and skip the step); double after `period` good."""

    scale: jax.Array
    good_steps: jax.Array
    period: int = struct.field(pytree_node=False, default=2000)

    @classmethod
    def create(cls, initial: float = 2.0**15, period: int = 2000) -> LossScale:
        return cls(jnp.float32(initial), jnp.int32(0), period)

    def update(self, grads_finite: jax.Array) -> LossScale:
        grown = self.good_steps + 1 >= self.period
        scale = jnp.where(
            grads_finite,
            jnp.where(grown, self.scale * 2, self.scale),
            jnp.maximum(self.scale / 2, 1.0),
        )
        good = jnp.where(grads_finite & ~grown, self.good_steps + 1, 0)
        return self.replace(scale=scale, good_steps=good)
