"""The execution plan: everything about *how* a model runs, nothing about *what* it is.

A `Plan` holds the mesh sizes and rule table, remat, gradient-accumulation and pipeline
microbatches, the attention kernel, loss chunks, layer unrolling and precision.
`Plan.from_config` assembles one from the command-line keys (`--mesh.*`, `--rules`,
`--model.remat`, ...); the planner produces them; `engine.trainer.setup` takes one.
`violations` lists every reason a model + plan + device count cannot train, without compiling
or opening data.

`python -m engine.plan` runs the planner (engine.autoplan, engine.plan_main).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from engine.config import Config, ConfigError, config_errors
from engine.family import build_model, model_arch, model_family
from engine.precision import POLICIES
from sharding import (
    AXES,
    RULE_PRESETS,
    MeshAxis,
    PipelineConfig,
    Rules,
    ShardingError,
    divisibility_errors,
    mesh_sizes,
    override_rules,
)
from sharding.mesh import resolve, with_device_hint
from sharding.pipeline import AXIS as PIPELINE_AXIS, check_pipeline
from sharding.rules import splitting_axes


@dataclasses.dataclass(frozen=True)
class Plan:
    mesh: Mapping[str, int]
    """Axis name -> devices (-1 fills); axes not named have size 1."""
    rules: Rules
    remat: str = "none"
    microbatches: int = 1
    """Gradient accumulation: sequential microbatches per optimizer step."""
    pipeline: PipelineConfig = PipelineConfig()
    attention: str = "xla"
    context_strategy: str = "all_gather"
    context_load_balance: bool = True
    loss_chunks: int = 1
    scan_unroll: int = 1
    precision: str = "fp32"
    axes: tuple[MeshAxis, ...] = AXES
    """The mesh axes this plan may use: sharding.AXES, or more declared by the caller."""

    @classmethod
    def from_config(cls, cfg: Config, **changes) -> Plan:
        plan = cls(
            mesh=mesh_sizes(cfg.mesh),
            rules=rule_table(cfg.rules, cfg.rule_overrides),
            remat=cfg.model.remat,
            microbatches=cfg.optim.microbatches,
            pipeline=cfg.pipeline,
            attention=cfg.model.attention,
            context_strategy=cfg.model.context_strategy,
            context_load_balance=cfg.model.context_load_balance,
            loss_chunks=cfg.model.loss_chunks,
            scan_unroll=cfg.model.scan_unroll,
            precision=cfg.precision,
        )
        return dataclasses.replace(plan, **changes)

    def on(self, cfg: Config, platform: str | None) -> Plan:
        """This plan with `--model.attention=auto` made concrete for `platform`'s devices:
        cuDNN's fused kernel where it runs and has run here (NVIDIA GPUs, 16-bit compute, head
        dims a multiple of 8 up to 128, causal masking alone: no sequence split over devices,
        no document mask), the einsums everywhere else. On one H100 the `1b` preset trains at
        2.9x the speed with cuDNN (benchmarks/RESULTS.md, 2026-11-26)."""
        if self.attention != "auto":
            return self
        head_dim = getattr(model_arch(cfg), "head_dim", 0)
        cudnn = (
            platform in ("gpu", "cuda")  # jax names CUDA devices "gpu"
            and POLICIES[self.precision].compute_dtype != jnp.float32
            and head_dim % 8 == 0
            and 0 < head_dim <= 128
            and self.mesh.get("context", 1) == 1
            and not cfg.data.document_mask
        )
        return dataclasses.replace(self, attention="cudnn" if cudnn else "xla")

    def flags(self) -> list[str]:
        """Command-line keys that give this plan (rules as overrides of the default table)."""
        flags = [f"--mesh.{a}={s}" for a, s in self.mesh.items()]
        flags += [
            f"--model.remat={self.remat}",
            f"--optim.microbatches={self.microbatches}",
            f"--pipeline.microbatches={self.pipeline.microbatches}",
            f"--pipeline.repeats={self.pipeline.repeats}",
            f"--model.attention={self.attention}",
            f"--model.context_strategy={self.context_strategy}",
            f"--model.context_load_balance={self.context_load_balance}",
            f"--model.loss_chunks={self.loss_chunks}",
            f"--model.scan_unroll={self.scan_unroll}",
            f"--precision={self.precision}",
        ]
        default = dict(RULE_PRESETS["default"])
        changed = [f"{n}={','.join(a)}" for n, a in self.rules if default.get(n) != tuple(a)]
        return flags + (["--rule_overrides", *changed] if changed else [])


def rule_table(rules: str, overrides: tuple[str, ...] = ()) -> Rules:
    """A preset's (or a JSON/YAML file's) rule table with `NAME=AXIS,AXIS` overrides on top."""
    if rules in RULE_PRESETS:
        table = RULE_PRESETS[rules]
    elif Path(rules).suffix in (".json", ".yaml", ".yml") and Path(rules).is_file():
        import yaml

        loaded = yaml.safe_load(Path(rules).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"--rules={rules} must map logical names to lists of mesh axes.")
        table = override_rules(RULE_PRESETS["default"], _axes_lists(loaded, f"--rules={rules}"))
    else:
        raise ConfigError(
            f"--rules={rules} is neither a rule preset ({', '.join(RULE_PRESETS)}) nor an "
            "existing .json/.yaml file of logical name -> mesh axes."
        )
    parsed = {}
    for item in overrides:
        name, sep, axes = item.partition("=")
        if not sep or not name:
            raise ConfigError(
                f"--rule_overrides entry '{item}' is not NAME=AXIS,AXIS; e.g. embed=fsdp or "
                "embed= (never split)."
            )
        parsed[name] = [a for a in axes.split(",") if a]
    return override_rules(table, _axes_lists(parsed, "--rule_overrides"))


def _axes_lists(table: dict, where: str) -> dict[str, tuple[str, ...]]:
    known = {a.name for a in AXES}
    out = {}
    for name, axes in table.items():
        axes = [axes] if isinstance(axes, str) else list(axes or [])
        unknown = [a for a in axes if a not in known]
        if unknown:
            raise ConfigError(
                f"{where}: '{name}' maps to unknown mesh axis {', '.join(unknown)}; the axes "
                f"are {', '.join(sorted(known))}."
            )
        out[str(name)] = tuple(axes)
    return out


def apply_plan(cfg: Config, plan: Plan) -> Config:
    """`cfg` with its execution-plan keys set to `plan`'s (what config.json records)."""
    mesh = dataclasses.replace(cfg.mesh, **{a.name: plan.mesh.get(a.name, 1) for a in AXES})
    model = dataclasses.replace(
        cfg.model, remat=plan.remat, attention=plan.attention, loss_chunks=plan.loss_chunks,
        context_strategy=plan.context_strategy, context_load_balance=plan.context_load_balance,
        scan_unroll=plan.scan_unroll,
    )  # fmt: skip
    optim = dataclasses.replace(cfg.optim, microbatches=plan.microbatches)
    return dataclasses.replace(
        cfg, mesh=mesh, model=model, optim=optim, pipeline=plan.pipeline, precision=plan.precision
    )


def violations(
    cfg: Config,
    plan: Plan,
    devices: int | Sequence,
    platform: str | None = None,
    state=None,
):
    """Every reason `cfg`'s model cannot train with `plan` on `devices` (a device list, or a
    count with `platform`), each the one-sentence error a run would raise; [] when it can.
    Reads only shapes: nothing is compiled, allocated or opened. `state`: the model's
    abstract params for this plan's stage count, when the caller already has them."""
    if not isinstance(devices, int):
        platform = platform or devices[0].platform
        devices = len(devices)
    plan = plan.on(cfg, platform)
    errors: list[Exception] = list(config_errors(cfg))
    sequence_model = model_family(cfg).sequence_model
    try:
        sizes = resolve({a.name: plan.mesh.get(a.name, 1) for a in plan.axes}, devices)
    except ShardingError as e:
        return [*errors, with_device_hint(e, platform)]
    stages = sizes.get(PIPELINE_AXIS, 1)
    if stages > 1 and not sequence_model:
        errors.append(ConfigError(
            f"--mesh.pipeline={stages} needs a model with a stack of layers (--task=lm); "
            f"--task={cfg.task} has none to split, so use --mesh.pipeline=1."
        ))  # fmt: skip
        stages = 1
    errors += _attention_errors(plan, platform if sequence_model else None)
    arch = model_arch(cfg)
    if stages > 1:
        try:
            check_pipeline(arch.stacked_layers, stages, plan.pipeline)
        except ShardingError as e:
            errors.append(e)
            stages = 1
    errors += _batch_errors(cfg, plan, sizes, stages)
    errors += _context_errors(cfg, plan, sizes, stages, sequence_model)
    experts, ep = getattr(arch, "moe", None), sizes.get("expert", 1)
    if ep > 1 and (experts is None or not experts.experts):
        errors.append(ConfigError(
            f"--mesh.expert={ep} splits experts, and this model has none; set "
            "--model.moe.experts, or use --mesh.data for more data parallelism."
        ))  # fmt: skip
    elif ep > 1 and experts.experts % ep:
        errors.append(ConfigError(
            f"--model.moe.experts={experts.experts} is not divisible by --mesh.expert={ep}; "
            f"use an expert-parallel degree that divides {experts.experts}."
        ))  # fmt: skip
    mesh = AbstractMesh(
        tuple(sizes.values()), tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes)
    )
    try:
        if state is None:
            state = nnx.state(nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0), plan, stages)))
        errors += divisibility_errors(state, mesh, plan.rules)
    except (ConfigError, ShardingError, ValueError) as e:
        errors.append(e)
    return errors


def _attention_errors(plan: Plan, platform: str | None) -> list[ConfigError]:
    if platform is None or plan.attention != "cudnn":
        return []
    if platform not in ("gpu", "cuda"):  # jax names CUDA devices "gpu"
        return [ConfigError(
            f"--model.attention=cudnn runs on NVIDIA GPUs only, and these devices are "
            f"{platform}; use --model.attention=xla."
        )]  # fmt: skip
    if POLICIES[plan.precision].compute_dtype == jnp.float32:
        return [ConfigError(
            f"--model.attention=cudnn takes 16-bit inputs, and --precision={plan.precision} "
            "computes in float32; use --precision=bf16 (or --model.attention=xla)."
        )]  # fmt: skip
    return []


def _context_errors(cfg: Config, plan: Plan, sizes, stages: int, sequence_model: bool):
    """The sequence must split over the context axes (into 2N chunks when load-balanced), and
    only a sequence model has one."""
    axes = splitting_axes(("batch", "length"), plan.rules, sizes)
    n = math.prod(sizes[a] for a in axes)
    if n == 1:
        return []
    flags = " x ".join(f"--mesh.{a}={sizes[a]}" for a in axes)
    if not sequence_model:
        return [ConfigError(
            f"{flags} splits sequences, and --task={cfg.task} has none; use --mesh.data for "
            "these devices instead."
        )]  # fmt: skip
    errors = []
    seq, balance = cfg.data.seq_len, plan.context_load_balance
    if seq % (2 * n if balance else n):
        fix = (f"a multiple of {2 * n}, or --model.context_load_balance=False (a multiple of {n})"
               if balance else f"a multiple of {n}")  # fmt: skip
        what = f"2 x {n} load-balanced chunks" if balance else f"{n} pieces"
        errors.append(ConfigError(
            f"--data.seq_len={seq} does not split into {what} ({flags}); use {fix}."
        ))  # fmt: skip
    chunks = plan.loss_chunks
    if not errors and chunks > 1 and seq % (n * chunks):
        errors.append(ConfigError(
            f"--model.loss_chunks={chunks} cuts each device's share of the sequence ({flags}) "
            f"into pieces, and --data.seq_len={seq} is not a multiple of {n * chunks}; use a "
            f"chunk count that divides {seq // n}."
        ))  # fmt: skip
    if plan.context_strategy == "ring" and plan.attention == "cudnn":
        errors.append(ConfigError(
            "--model.context_strategy=ring runs its own blockwise attention and cannot use "
            "--model.attention=cudnn; use --model.context_strategy=all_gather with cuDNN, or "
            "--model.attention=xla."
        ))  # fmt: skip
    moe = getattr(model_arch(cfg), "moe", None)
    if moe is not None and moe.experts and moe.capacity_factor is not None and balance:
        errors.append(ConfigError(
            f"--model.moe.capacity_factor={moe.capacity_factor} gives experts' slots in token "
            "order, and --model.context_load_balance reorders each sequence, so other tokens "
            "would be dropped; use --model.context_load_balance=False, or dropless routing "
            "(--model.moe.capacity_factor=None)."
        ))  # fmt: skip
    if moe is not None and moe.experts and stages > 1:
        errors.append(ConfigError(
            f"MoE layers in pipeline stages cannot also split sequences ({flags}): a stage "
            "routes only its own tokens, so the balance losses would differ; use "
            "--mesh.pipeline=1 or --mesh.context=1 with --model.moe.experts."
        ))  # fmt: skip
    return errors


def _batch_errors(cfg: Config, plan: Plan, sizes: Mapping[str, int], stages: int):
    """The global batch must split into accumulation steps, those into pipeline microbatches,
    and each of those over the devices that split the batch inside a stage."""
    names = ("stage", "batch") if stages > 1 else ("batch",)
    axes = splitting_axes(names, plan.rules, sizes)
    ways = math.prod(sizes[a] for a in axes)
    accum = plan.microbatches
    pipe = plan.pipeline.microbatches_for(stages) if stages > 1 else 1
    if accum <= 0 or cfg.batch_size <= 0 or cfg.batch_size % (accum * pipe * ways) == 0:
        return []
    shards = " x ".join(f"--mesh.{a}={sizes[a]}" for a in axes) or "1 device"
    splits = [f"{ways} data-parallel shards ({shards})"]
    if pipe > 1:
        splits.insert(0, f"{pipe} pipeline microbatches (--pipeline.microbatches={pipe})")
    if accum > 1:
        splits.insert(0, f"{accum} accumulation steps (--optim.microbatches={accum})")
    return [ConfigError(
        f"--batch_size={cfg.batch_size} does not split into {' x '.join(splits)}; use a batch "
        f"size that is a multiple of {accum * pipe * ways}."
    )]  # fmt: skip


if __name__ == "__main__":  # python -m engine.plan: the planner's command line
    import sys

    from engine.plan_main import main

    sys.exit(main())
