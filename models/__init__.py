"""Model families. Parameters and key activations carry logical axis names only."""

import flax

# Parameters are placed on devices at the jit boundary from their logical names (see sharding/),
# so creating one must not need a mesh: switch off Flax's eager per-variable sharding.
flax.config.update("flax_always_shard_variable", False)

from models.llama import LLAMA_PRESETS, Llama, LlamaConfig  # noqa: E402
from models.moe import MoEConfig  # noqa: E402
from models.vision import ClassifierConfig, MLPClassifier  # noqa: E402

__all__ = [
    "LLAMA_PRESETS",
    "ClassifierConfig",
    "Llama",
    "LlamaConfig",
    "MLPClassifier",
    "MoEConfig",
]
