"""Automatic parallelism: the planner (sharding.planner) fed with a config's model and batch,
checked with training's own validation (engine.plan.violations).

`plan_search` ranks every plan for a target; `auto_plan` picks one for the devices present
(`--mesh.auto`), keeping the keys the user set.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engine.config import Config, ConfigError
from engine.data import batch_shapes
from engine.family import build_model, model_arch, model_family
from engine.plan import Plan, apply_plan, violations
from engine.precision import POLICIES
from engine.step import TrainState
from models.layers import remat_policy, shapes_only
from sharding import PipelineConfig, ShardingError
from sharding.devices import DEVICES, KINDS, device_kind, measure_cpu
from sharding.mesh import resolve
from sharding.planner import (
    Candidate,
    Estimate,
    Leaf,
    Target,
    Workload,
    failed_checks,
    search,
)
from sharding.rules import named_leaves

REMATS = ("none", "dots_no_batch", "dots", "full")
# Config keys the planner chooses, by the name `sharding.planner.candidates` pins them with.
PLAN_KEYS = {
    "model.remat": "remat",
    "optim.microbatches": "microbatches",
    "pipeline.microbatches": "pipeline_microbatches",
    "pipeline.repeats": "repeats",
    "model.loss_chunks": "loss_chunks",
}


def workload(cfg: Config, plan: Plan) -> Workload:
    """The planner's view of `cfg`'s model and batch: state shapes, FLOPs and the bytes each
    remat policy saves per token and layer (autodiff's residuals, read from shapes only)."""
    family, arch = model_family(cfg), model_arch(cfg)
    policy = POLICIES[plan.precision]
    if plan.attention == "auto":  # no platform to resolve it for: the einsums keep the most
        plan = dataclasses.replace(plan, attention="xla")
    seq = cfg.data.seq_len if family.sequence_model else 1

    @functools.cache
    def state(stages: int) -> tuple[Leaf, ...]:
        return _state_leaves(cfg, plan, stages)

    model = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0), plan))
    # cuDNN's kernel traces only where it runs: its shape twin keeps what it keeps (q, k, v,
    # output, statistics), where the einsums would keep [T, T] scores.
    with shapes_only():
        layer_bytes = {r: _saved_bytes(cfg, model, policy.compute_dtype, r) for r in REMATS}
    layers = getattr(arch, "n_layers", 1)
    return Workload(
        state=state,
        batch=cfg.batch_size,
        seq_len=seq,
        layers=layers,
        width=getattr(arch, "d_model", getattr(arch, "hidden", 1)),
        vocab=getattr(arch, "vocab_size", getattr(arch, "num_classes", 1)),
        flops_per_token=family.flops_per_token(arch, seq),
        layer_bytes=layer_bytes,
        compute_bytes=jnp.dtype(policy.compute_dtype).itemsize,
        split_name="heads" if family.sequence_model else "mlp",
        sequence_model=family.sequence_model,
        kv_width=getattr(arch, "n_kv_heads", 0) * getattr(arch, "head_dim", 0),
        batch_dots=plan.attention == "xla",
        **_routing(arch),
    )


# --mesh.auto keeps the configured plan unless another is predicted this much faster: the
# step-time model ranked two GPU plans up to 20 % wrong (benchmarks/RESULTS.md, 2026-11-27).
KEEP_CONFIGURED = 0.2

# Below this length the batch axes split a step's tokens more cheaply than `context`, which
# exchanges keys and values every layer: the search leaves it at 1 (a pinned size still counts).
CONTEXT_FROM_LENGTH = 8192


def _searched(axis: str, work: Workload) -> bool:
    """Whether the search varies `axis`: an expert axis only for a model with experts, a
    context axis only for long sequences."""
    if axis == "expert":
        return work.moe_layers > 0
    if axis == "context":
        return work.sequence_model and work.seq_len >= CONTEXT_FROM_LENGTH
    return True


def _routing(arch) -> dict:
    """The Workload's MoE fields for an architecture with `moe` (models.MoEConfig)."""
    moe = getattr(arch, "moe", None)
    if moe is None or not moe.experts:
        return {}
    factor = moe.capacity_factor
    return dict(
        moe_layers=arch.moe_layers,
        routed=moe.top_k * (factor or 1.0),
        dropless=factor is None,
    )


def _state_leaves(cfg: Config, plan: Plan, stages: int) -> tuple[Leaf, ...]:
    from engine.optim import make_optimizer

    tx, _ = make_optimizer(cfg.optim, cfg.steps)

    def init():
        params = nnx.state(build_model(cfg, nnx.Rngs(0), plan, stages))
        return TrainState(jnp.int32(0), params, tx.init(params), None, {})

    abstract = jax.eval_shape(init)
    others = dataclasses.replace(abstract, params=None)
    return tuple(
        Leaf(shape, names, jnp.dtype(dtype).itemsize, param=tree is abstract.params)
        for tree in (abstract.params, others)
        for shape, dtype, names in named_leaves(tree)
    )


def _saved_bytes(cfg: Config, model: nnx.Module, dtype, remat: str) -> tuple[float, float]:
    """Bytes per token (per example) one layer saves for the backward pass under `remat`:
    (arrays as wide as the layer's input, the rest), from two batch sizes so weights cancel."""
    family = model_family(cfg)
    stacked = hasattr(model, "layers") and family.sequence_model
    graphdef, params = nnx.split(model.layers if stacked else model)

    def cast(x):
        floating = jnp.issubdtype(x.dtype, jnp.floating)
        shape = x.shape[1:] if stacked else x.shape
        return jax.ShapeDtypeStruct(shape, dtype if floating else x.dtype)

    params = jax.tree.map(cast, params)
    width = getattr(model_arch(cfg), "d_model", None)
    seq = cfg.data.seq_len if family.sequence_model else 1

    def residuals(batch: int):
        if stacked:
            x = jax.ShapeDtypeStruct((batch, seq, width), dtype)

            def fn(p, x):
                positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
                return nnx.merge(graphdef, p)(x, positions)[0]
        else:
            shape, _ = batch_shapes(cfg.task, cfg.data, batch)["inputs"]
            x = jax.ShapeDtypeStruct(shape, dtype)

            def fn(p, x):
                return nnx.merge(graphdef, p)(x)

        rule = remat_policy(remat)
        fn = fn if rule is None else jax.checkpoint(fn, policy=rule)
        return jax.tree.leaves(jax.eval_shape(lambda p, x: jax.vjp(fn, p, x)[1], params, x))

    one, two = residuals(1), residuals(2)
    whole = parted = 0.0
    for a, b in zip(one, two, strict=True):
        grown = math.prod(b.shape) * b.dtype.itemsize - math.prod(a.shape) * a.dtype.itemsize
        # As wide as the layer's input (the residual stream, kept transposed by bf16 matmuls on
        # a CPU): not split by tensor parallelism.
        wide = width is not None and width in b.shape[:1] + b.shape[-1:]
        if wide and math.prod(b.shape) == 2 * seq * width:
            whole += grown
        else:
            parted += grown
    return whole / seq, parted / seq


def to_plan(c: Candidate, base: Plan, platform: str = "cpu") -> Plan:
    """The plan of candidate `c`, with `base`'s other keys. On a CPU a rematerializing plan
    runs the layer loop: unrolled, XLA:CPU schedules the recomputation early, and `default`
    under dots_no_batch on data=2 x fsdp=4 needed 1.7x the memory the estimate (the loop's)
    predicts. On a GPU `1b` under dots_no_batch took the same 42.4 GB either way and ran 1.09x
    faster unrolled (benchmarks/RESULTS.md, 2026-11-26 and 11-27), so it keeps `base`'s."""
    loop = platform == "cpu" and c.remat != "none"
    return dataclasses.replace(
        base,
        mesh={a.name: c.mesh.get(a.name, 1) for a in base.axes},  # unsearched axes: 1
        remat=c.remat,
        microbatches=c.microbatches,
        pipeline=PipelineConfig(c.pipeline_microbatches, c.repeats),
        loss_chunks=c.loss_chunks,
        scan_unroll=1 if loop else base.scan_unroll,
    )


def target_for(
    kind: str, devices: int, hosts: int = 1, memory_gb: float | None = None, **overrides
) -> Target:
    """A `Target` from the device table (`cpu`: measured here), with fields overridden."""
    if kind == "cpu":
        spec = measure_cpu(devices)
    elif kind in DEVICES:
        spec = DEVICES[kind]
    else:
        raise ConfigError(
            f"--target.kind={kind} is not in the device table; use one of {', '.join(KINDS)} "
            "(or the nearest kind with --target.* overrides of its figures)."
        )
    if devices < 1:
        raise ConfigError(f"--target.devices={devices} must be at least 1.")
    if hosts < 1 or devices % hosts:
        raise ConfigError(
            f"--target.hosts={hosts} does not split --target.devices={devices} evenly; use a "
            f"divisor of {devices}."
        )
    spec = dataclasses.replace(spec, **{k: v for k, v in overrides.items() if v is not None})
    return Target(spec, devices, hosts, memory_gb)


def plan_search(
    cfg: Config, target: Target, fixed: Mapping[str, object] = {}, platform: str = "gpu"
) -> tuple[list[tuple[Plan, Estimate]], list[tuple[Plan, Estimate]]]:
    """(plans that train and fit, fastest first; rejected ones, nearest to fitting first).
    `fixed` pins mesh axes by name and the PLAN_KEYS values; `platform` is what training's
    checks assume the devices are."""
    base = Plan.from_config(cfg).on(cfg, platform)
    work = workload(cfg, base)
    cache: dict = {}
    states: dict[int, object] = {}

    def model_state(stages: int):
        if stages not in states:
            try:
                states[stages] = nnx.state(
                    nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0), base, stages))
                )
            except Exception:  # layers that do not split into these stages: violations() says
                states[stages] = None
        return states[stages]

    def feasible(c: Candidate) -> list[str]:
        plan = to_plan(c, base, platform)
        # Remat and loss chunks change no shape that violations() checks (every REMATS entry
        # is valid, and candidates() offers only chunk counts that divide the sequence).
        key = (tuple(c.mesh.items()), c.microbatches, c.pipeline_microbatches, c.repeats)
        if key not in cache:
            stages = c.mesh.get("pipeline", 1)
            problems = violations(apply_plan(cfg, plan), plan, target.devices, platform,
                                  state=model_state(stages))  # fmt: skip
            cache[key] = [str(p) for p in problems]
        return cache[key]

    axes = [a.name for a in base.axes if a.name in fixed or _searched(a.name, work)]
    # Without batch dots (a fused attention kernel) dots is dots_no_batch's program.
    remats = REMATS if work.batch_dots else tuple(r for r in REMATS if r != "dots")
    fits, rejected = search(
        work, target, base.rules, base.precision, axes, remats, feasible, fixed
    )  # fmt: skip
    return [(to_plan(e.candidate, base, platform), e) for e in fits], [
        (to_plan(e.candidate, base, platform), e) for e in rejected
    ]


def no_plan_error(cfg: Config, target: Target, rejected, fixed) -> ConfigError:
    """One sentence for a search that found nothing: the nearest plan and what would help."""
    pinned = ", ".join(f"{k}={v}" for k, v in fixed.items())
    if not rejected:
        return ConfigError(
            f"No mesh over {target.devices} devices can split this model"
            + (f" with {pinned} fixed" if pinned else "")
            + "; use a device count that divides its dimensions (or fewer fixed keys)."
        )
    plan, best = min(rejected, key=lambda r: (failed_checks(r[1]), r[1].memory_gb["total"]))
    if failed_checks(best):
        return ConfigError(
            f"No plan over {target.devices} devices passes training's checks"
            + (f" with {pinned} fixed" if pinned else "")
            + f"; the nearest ({best.candidate.describe()}) fails with: {best.problems[0]}"
        )
    return ConfigError(
        f"No plan fits {target.budget_gb:.2f} GB per device: the smallest "
        f"({best.candidate.describe()}) needs {best.memory_gb['total']:.2f} GB; use more "
        "devices, a smaller --batch_size, or --model.remat=full"
        + (f" (or fix fewer of {pinned})" if pinned else "")
        + "."
    )


def local_target(devices: Sequence[jax.Device]) -> Target:
    """The devices present: their kind's row, with the memory JAX reports when it does."""
    first = devices[0]
    kind = "cpu" if first.platform == "cpu" else device_kind(first.device_kind)
    limit = (first.memory_stats() or {}).get("bytes_limit") if first.platform != "cpu" else None
    if kind is None:
        raise ConfigError(
            f"--mesh.auto does not know device kind '{first.device_kind}'; set the mesh by hand "
            f"(--mesh.*) or plan for a known kind with python -m engine.plan --target.kind "
            f"({', '.join(KINDS)})."
        )
    hosts = len({d.process_index for d in devices})
    memory = limit / 1e9 * 0.95 if limit else None
    return target_for(kind, len(devices), hosts, memory)


def auto_plan(
    cfg: Config, devices: Sequence[jax.Device] | None = None, fixed_keys: set[str] = frozenset()
) -> tuple[Config, Plan, Estimate, Estimate]:
    """The fastest plan that fits `devices` (default all), keeping the config keys named in
    `fixed_keys` ('mesh.tensor', 'model.remat', ...) as the user set them, and the configured
    plan unless another is predicted KEEP_CONFIGURED faster. Returns the config with the
    plan's keys filled in, the plan, its estimate and the fastest plan's estimate."""
    devices = list(jax.devices() if devices is None else devices)
    target = local_target(devices)
    base = Plan.from_config(cfg).on(cfg, devices[0].platform)
    fixed: dict[str, object] = {}
    for axis, size in base.mesh.items():
        if f"mesh.{axis}" in fixed_keys:
            fixed[axis] = size
    values = {"remat": base.remat, "microbatches": base.microbatches,
              "pipeline_microbatches": base.pipeline.microbatches,
              "repeats": base.pipeline.repeats, "loss_chunks": base.loss_chunks}  # fmt: skip
    for key, name in PLAN_KEYS.items():
        if key in fixed_keys:
            fixed[name] = values[name]
    if any(v == -1 for v in fixed.values()):
        raise ConfigError(
            "--mesh.auto fills the mesh itself; give fixed axes explicit sizes, not -1."
        )
    platform = devices[0].platform
    fits, rejected = plan_search(cfg, target, fixed, platform)
    if not fits:
        raise no_plan_error(cfg, target, rejected, fixed)
    fastest = fits[0][1]
    fits = _configured_first(fits, base, len(devices))
    plan, chosen = _agreed(fits, base, platform)
    return apply_plan(cfg, plan), plan, chosen, fastest


def _configured_first(fits, base: Plan, devices: int) -> list[tuple[Plan, Estimate]]:
    """`fits` with the configured plan first when it fits and the fastest is predicted less
    than KEEP_CONFIGURED faster: a preset's plan was measured, the estimate was not."""
    try:
        mesh = resolve(base.mesh, devices)
    except ShardingError:  # a configured mesh for other devices: nothing to keep
        return fits
    configured = dataclasses.replace(base, mesh=mesh)
    fastest = fits[0][1].times_s["step"]
    for i, (plan, e) in enumerate(fits):
        if plan == configured:
            if e.times_s["step"] <= fastest * (1 + KEEP_CONFIGURED):
                return [fits[i], *fits[:i], *fits[i + 1 :]]
            break
    return fits


def _agreed(fits, base: Plan, platform: str) -> tuple[Plan, Estimate]:
    """Process 0's choice on every process: a measured cpu row may differ between them."""
    plan, chosen = fits[0]
    if jax.process_count() == 1:
        return plan, chosen
    from jax.experimental import multihost_utils

    c = chosen.candidate
    code = [*c.mesh.values(), REMATS.index(c.remat), c.microbatches, c.pipeline_microbatches,
            c.repeats, c.loss_chunks]  # fmt: skip
    code = [int(v) for v in multihost_utils.broadcast_one_to_all(np.asarray(code, np.int32))]
    mesh = dict(zip(c.mesh, code[: len(c.mesh)], strict=True))
    remat, accum, pmb, repeats, chunks = code[len(c.mesh) :]
    agreed = Candidate(mesh, REMATS[remat], accum, pmb, repeats, chunks)
    for plan, est in fits:
        if est.candidate == agreed:
            return plan, est
    return to_plan(agreed, base, platform), dataclasses.replace(chosen, candidate=agreed)


def describe_choice(e: Estimate, fastest: Estimate | None = None) -> str:
    """The start-up line of a --mesh.auto run (`fastest`: the top plan, if not `e`)."""
    from engine.metrics import format_bytes

    line = (
        f"--mesh.auto chose {e.candidate.describe()}: predicted "
        f"{format_bytes(e.memory_gb['total'] * 1e9)}/device, "
        f"{e.times_s['step'] * 1e3:.1f} ms/step, "
        f"{e.tokens_per_s:,.0f} tokens/s, bound by {e.dominant}"
    )
    if fastest is not None and fastest.candidate != e.candidate:
        line += (
            f" (the configured plan: the fastest predicted, {fastest.candidate.describe()} at "
            f"{fastest.times_s['step'] * 1e3:.1f} ms/step, is within the estimate's error)"
        )
    return line
