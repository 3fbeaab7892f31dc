"""The run's model: its registered family (models.registry), architecture, module and FLOPs."""

from __future__ import annotations

from flax import nnx

from engine.config import Config
from models.registry import ModelFamily, family
from sharding import apply_pipeline

# The model family each task trains (models.registry).
TASK_FAMILY = {"lm": "llama", "digits": "mlp_classifier"}


def model_family(cfg: Config) -> ModelFamily:
    return family(TASK_FAMILY[cfg.task])


def model_arch(cfg: Config):
    """The architecture config of the run's model (no execution-plan keys)."""
    return cfg.model.arch if cfg.task == "lm" else cfg.classifier


def flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token (per example for classifiers): the family's one count."""
    return model_family(cfg).flops_per_token(model_arch(cfg), cfg.data.seq_len)


def build_model(cfg: Config, rngs: nnx.Rngs, plan, stages: int = 1) -> nnx.Module:
    """The model, with its layers split into `stages` pipeline stages when there are several."""
    model = model_family(cfg).build(
        model_arch(cfg), rngs, remat=plan.remat, attention=plan.attention,
        context=plan.context_strategy, scan_unroll=plan.scan_unroll,
    )  # fmt: skip
    if stages > 1:
        apply_pipeline(model, stages, plan.pipeline)
    return model
