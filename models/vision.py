"""A small MLP image classifier (the `digits` preset)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import dense
from sharding import constrain


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    in_features: int = 64
    hidden: int = 256
    num_classes: int = 10

    def matmul_params(self) -> int:
        h = self.hidden
        return self.in_features * h + h * h + h * self.num_classes

    def flops_per_token(self, seq_len: int = 1) -> float:
        """Training FLOPs per example (an example is this model's 'token')."""
        return 6 * self.matmul_params()


class MLPClassifier(nnx.Module):
    def __init__(self, cfg: ClassifierConfig, rngs: nnx.Rngs):
        def linear(n_in, n_out, names):
            value = jax.random.normal(rngs.params(), (n_in, n_out)) * (2.0 / n_in) ** 0.5
            return nnx.Param(value, out_sharding=names), nnx.Param(
                jnp.zeros((n_out,)), out_sharding=names[1:]
            )

        self.w1, self.b1 = linear(cfg.in_features, cfg.hidden, ("embed", "mlp"))
        self.w2, self.b2 = linear(cfg.hidden, cfg.hidden, ("mlp", "embed"))
        self.w3, self.b3 = linear(cfg.hidden, cfg.num_classes, ("embed", "classes"))

    def __call__(self, x):
        """Logits [batch, classes] for flattened images `x` [batch, features]."""
        x = constrain(x, ("batch", None))
        x = jax.nn.gelu(dense(x, self.w1[...]) + self.b1[...])
        x = jax.nn.gelu(dense(x, self.w2[...]) + self.b2[...])
        return dense(x, self.w3[...]) + self.b3[...]
