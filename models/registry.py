"""Model families, keyed by Hugging Face `model_type`: what the trainer, checkpoint export,
generation and Hugging Face interop ask instead of assuming Llama.

A family holds its architecture config class, its module, the config mapping both ways and a
tensor table (Hugging Face name templates indexed by `{layer}` and `{expert}`), and its FLOP
count, which metrics and benchmarks share. Adding a family is one `register` call.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from models import llama_hf
from models.llama import Llama, LlamaConfig
from models.vision import ClassifierConfig, MLPClassifier


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    name: str
    config: type
    """The architecture config dataclass."""
    build: Callable[..., Any]
    """(arch, rngs, *, remat, attention, context, scan_unroll) -> nnx.Module; plan keys a
    family lacks are ignored."""
    flops_per_token: Callable[[Any, int], float]
    """(arch, seq_len) -> training FLOPs per token (per example for classifiers)."""
    from_hf: Callable[[dict, str], Any] | None = None
    """(config.json dict, where) -> arch; raises ValueError naming what is unsupported."""
    to_hf: Callable[[Any, str], dict] | None = None
    """(arch, dtype name) -> config.json dict."""
    tensors: dict[tuple[str, ...], tuple[str, Callable, Callable]] | None = None
    """Our param path -> (HF name template, HF -> ours, ours -> HF)."""
    sequence_model: bool = True
    """Has a stack of layers over a sequence (pipelines, generation, loss chunks)."""
    aux_weights: Callable[[Any], dict[str, float]] = lambda arch: {}
    """(arch) -> {aux name: weight}: the layers' aux values the train step adds to the loss
    (an MoE balance loss, say); every aux value is logged either way."""
    holds: Callable[[Any], bool] = lambda arch: True
    """(arch) -> whether this family's Hugging Face layout holds `arch` exactly (export)."""

    def arch(self, values: dict) -> Any:
        """The architecture config from a dict that may hold other keys too (a run's
        config.json `model` section also holds plan keys)."""
        names = {f.name for f in dataclasses.fields(self.config)}
        return self.config(**{k: v for k, v in values.items() if k in names})


FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily, *aliases: str) -> ModelFamily:
    for key in (family.name, *aliases):
        FAMILIES[key] = family
    return family


def family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise KeyError(
            f"model family '{name}' is not registered; registered: {', '.join(sorted(FAMILIES))}."
        )
    return FAMILIES[name]


def _llama_aux_weights(arch: LlamaConfig) -> dict[str, float]:
    moe = arch.moe
    return (
        {"moe_aux_loss": moe.aux_loss_weight, "moe_z_loss": moe.z_loss_weight}
        if moe.experts
        else {}
    )


def _llama(arch: LlamaConfig, rngs, **plan) -> Llama:
    return Llama(arch, rngs, **plan)


def _classifier(arch: ClassifierConfig, rngs, **plan) -> MLPClassifier:
    return MLPClassifier(arch, rngs)


def _llama_kind(kind: str, *aliases: str) -> ModelFamily:
    return register(
        ModelFamily(
            kind,
            LlamaConfig,
            _llama,
            LlamaConfig.flops_per_token,
            llama_hf.config_from_hf,
            functools.partial(llama_hf.config_to_hf, kind=kind),
            llama_hf.tensors(kind),
            aux_weights=_llama_aux_weights,
            holds=lambda arch: llama_hf.kind_of(arch) == kind,
        ),
        *aliases,
    )


# One module, several Hugging Face layouts: what differs is data (models/llama_hf.py).
LLAMA = _llama_kind("llama")
for _kind in ("mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe"):
    _llama_kind(_kind)
MLP = register(
    ModelFamily(
        "mlp_classifier",
        ClassifierConfig,
        _classifier,
        ClassifierConfig.flops_per_token,
        sequence_model=False,
    )
)
