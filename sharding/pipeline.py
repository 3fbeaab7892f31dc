"""Pipeline parallelism as one SPMD program: stage-sharded weights and a collective permute.

A model opts in by keeping its repeated layers as one stacked module (`model.layers`, leading
`layers` axis) run by a layer runner (`model.layer_runner(layers, x, *args) -> (x, aux)`).
`apply_pipeline` reshapes the stack [L, ...] to [R, S, L/(S*R), ...] under the logical names
("repeat", "stage", "layers") — the rule table maps `stage` to the `pipeline` mesh axis — and
swaps in a `Pipeline` runner. Nothing else in the model changes, and the train step stays one
jitted function.

Schedule (circular, GPipe when R = 1): microbatches enter in groups of S. Stage s at iteration t
works on u = t - s; within a group, u walks repeat r = 0..R-1 over the group's S microbatches, so
what stage S-1 sends round the ring is exactly what stage 0 needs next. R*M + S - 1 iterations
run, S - 1 of them idle per stage: the bubble is (S - 1) / (R*M + S - 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from sharding.context import context_axes
from sharding.mesh import ShardingError
from sharding.rules import constrain

AXIS = "pipeline"  # the mesh axis the rule table maps `stage` to


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    microbatches: int = 0
    """Microbatches in flight through the stages per step (a multiple of --mesh.pipeline);
    0 = one per stage. More shrink the bubble, at smaller matmuls."""
    repeats: int = 1
    """Circular schedule: each stage holds this many non-adjacent chunks of layers and every
    microbatch loops the ring this many times; the bubble shrinks by this factor."""

    def microbatches_for(self, stages: int) -> int:
        return self.microbatches or stages


def stages_of(mesh) -> int:
    """Pipeline stages of a mesh (1 when it has no pipeline axis)."""
    return dict(mesh.shape).get(AXIS, 1)


def bubble(stages: int, repeats: int, microbatches: int) -> float:
    """Share of each stage's iterations spent idle."""
    return (stages - 1) / (repeats * microbatches + stages - 1)


def check_pipeline(n_layers: int, stages: int, cfg: PipelineConfig) -> int:
    """Raise ShardingError for a layer count or microbatch count the schedule cannot use;
    return the number of microbatches."""
    repeats, micro = cfg.repeats, cfg.microbatches_for(stages)
    if repeats < 1:
        raise ShardingError(f"--pipeline.repeats={repeats} must be at least 1.")
    if n_layers % (stages * repeats):
        raise ShardingError(
            f"The model's {n_layers} layers do not split into --mesh.pipeline={stages} stages x "
            f"--pipeline.repeats={repeats}; use stages x repeats that divide {n_layers}."
        )
    if micro < stages:
        raise ShardingError(
            f"--pipeline.microbatches={micro} is fewer than the {stages} stages "
            f"(--mesh.pipeline={stages}); use at least {stages} so every stage has work."
        )
    if micro % stages:
        raise ShardingError(
            f"--pipeline.microbatches={micro} is not a multiple of --mesh.pipeline={stages}; "
            f"use a multiple of {stages} (microbatches enter the ring in groups of {stages})."
        )
    return micro


def _variables(module: nnx.Module):
    return [v for _, v in nnx.iter_graph(module) if isinstance(v, nnx.Variable)]


def stage_layers(layers: nnx.Module, stages: int, repeats: int) -> None:
    """Reshape every stacked variable [L, ...] to [R, S, L/(S*R), ...] in place.

    A plain row-major reshape: layer (r*S + s)*k + j lands at [r, s, j], so stage s holds
    chunks s, S + s, 2S + s, ... as the circular schedule needs, and the layer order is kept.
    """
    for var in _variables(layers):
        names = var.get_metadata().get("out_sharding") or (None,) * var.ndim
        if names[0] != "layers":
            raise ValueError(f"expected a stacked 'layers' variable, got names {names}")
        n = var.shape[0]
        var.set_value(
            var.get_value().reshape(repeats, stages, n // (stages * repeats), *var.shape[1:])
        )
        var.set_metadata(out_sharding=("repeat", "stage", *names))


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """Layer runner: `inner` runs one stage's chunk of layers; this moves microbatches between
    stages. `args` are per-example (leading batch axis), like the activations."""

    stages: int
    repeats: int
    microbatches: int
    inner: Any  # a layer runner, e.g. the model's own scan over layers

    def __call__(self, layers: nnx.Module, x: jax.Array, *args):
        """Like the inner runner: (output, aux values averaged over layers and microbatches)."""
        S, R, M = self.stages, self.repeats, self.microbatches
        # The stage is per device over the axes that split the sequence too: activations keep
        # their length split, attention meets across it (sharding.context), the stage's
        # weights are gathered over those axes on the way in.
        context = context_axes() or None
        graphdef, state = nnx.split(layers)
        leaves, treedef = jax.tree.flatten(state)
        micro = lambda a: _to_microbatches(a, S, M)  # noqa: E731
        xs, args = micro(x), jax.tree.map(micro, args)

        def stage_fn(chunks, r, x, m, args):
            """One stage's chunk r of layers on microbatch m (`args`: this device's)."""
            weights = [jax.lax.dynamic_index_in_dim(c, r, keepdims=False) for c in chunks]
            module = nnx.merge(graphdef, jax.tree.unflatten(treedef, weights))
            return self.inner(module, x, *jax.tree.map(lambda a: a[m], args))

        # Remat per iteration: a stage keeps only its input per iteration for the backward pass,
        # so activation memory does not grow with the number of microbatches.
        stage_fn = jax.checkpoint(stage_fn, policy=jax.checkpoint_policies.nothing_saveable)

        def run(leaves, xs, args):
            # Each stage brings its own M/S microbatches; stage 0 needs them all. Gathering
            # here (not by an unsharded in_spec) makes the backward a reduce-scatter. It runs
            # in fp32: XLA:CPU aborts compiling a bf16 one (AllReducePromotion, jax 0.10).
            xs = jax.lax.all_gather(xs.astype(jnp.float32), AXIS, tiled=True)
            stage = jax.lax.axis_index(AXIS)
            chunks = [leaf[:, 0] for leaf in leaves]  # [R, layers per chunk, ...]
            x0 = xs[0].astype(x.dtype)
            _, aux_shape = jax.eval_shape(stage_fn, chunks, 0, x0, 0, args)

            def iteration(carry, t):
                received, outputs, aux_sum = carry
                u = t - stage
                last_u = R * M - 1
                group, within = jnp.divmod(jnp.clip(u, 0, last_u), R * S)
                r, k = jnp.divmod(within, S)
                m = group * S + k
                x_in = jnp.where((stage == 0) & (r == 0), xs[m].astype(x.dtype), received)
                y, aux = stage_fn(chunks, r, x_in, m, args)
                working = (u >= 0) & (u <= last_u)
                done = (stage == S - 1) & (r == R - 1) & working
                outputs = outputs.at[m].set(jnp.where(done, y, outputs[m]))
                aux_sum = jax.tree.map(lambda a, b: a + jnp.where(working, b, 0), aux_sum, aux)
                # Stage s -> s + 1, and S - 1 -> 0 for the next repeat: one collective permute.
                received = jax.lax.ppermute(y, AXIS, [(s, (s + 1) % S) for s in range(S)])
                return (received, outputs, aux_sum), None

            # Stage-varying zeros, like xs (adding the stage index makes them vary).
            varying = lambda a: jnp.zeros(a.shape, a.dtype) + (stage * 0).astype(a.dtype)  # noqa: E731
            zeros = jax.tree.map(varying, aux_shape)
            carry = (jnp.zeros_like(xs[0], x.dtype), jnp.zeros_like(xs, x.dtype), zeros)
            (_, outputs, aux_sum), _ = jax.lax.scan(iteration, carry, jnp.arange(R * M + S - 1))
            # Every (chunk, microbatch) pair ran once somewhere: the mean over all of them.
            aux = jax.tree.map(lambda a: jax.lax.psum(a, AXIS) / (S * R * M), aux_sum)
            if context:
                aux = jax.lax.pmean(aux, context)
            return outputs[None], aux

        stage_specs = [P(None, AXIS)] * len(leaves)  # [R, S, ...]: S over the pipeline axis
        # [M, rows, length, ...]; outputs [1, M, rows, length, ...] per stage.
        xs_spec, args_spec = P(AXIS, None, context), P(None, None, context)
        out, aux = jax.shard_map(
            run,
            in_specs=(stage_specs, xs_spec, args_spec),
            out_specs=(P(AXIS, None, None, context), P()),
            axis_names={AXIS, *(context or ())},
        )(leaves, xs, args)
        # Only the last stage's buffer holds results: XLA sends each stage its M/S of them
        # (one all-to-all), the layout the batch had on the way in.
        return _from_microbatches(out[S - 1], S), aux


def _to_microbatches(a: jax.Array, stages: int, micro: int) -> jax.Array:
    """[B, ...] -> [M, B/M, ...] moving no data: the batch arrives split over (pipeline, data,
    fsdp), so each stage's block of rows is cut into M/S microbatches by a strided split
    (which keeps every row on its data-parallel device), and stage p starts with microbatches
    p*M/S ... (p+1)*M/S - 1."""
    rows = a.shape[0] // micro
    a = a.reshape(stages, rows, micro // stages, *a.shape[1:]).swapaxes(1, 2)
    a = a.reshape(micro, rows, *a.shape[3:])
    return constrain(a, ("stage", "batch") + (None,) * (a.ndim - 2))


def _from_microbatches(a: jax.Array, stages: int) -> jax.Array:
    """Inverse of `_to_microbatches`."""
    micro, rows = a.shape[:2]
    a = a.reshape(stages, micro // stages, rows, *a.shape[2:]).swapaxes(1, 2)
    a = a.reshape(micro * rows, *a.shape[3:])
    return constrain(a, ("batch",) + (None,) * (a.ndim - 1))


def _names(var: nnx.Variable) -> tuple:
    return tuple(var.get_metadata().get("out_sharding") or ())


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def unstage(tree):
    """Staged layer variables [R, S, k, ...] (params or optimizer state) back to the canonical
    [L, ...] layout, so checkpoints do not depend on the pipeline split."""

    def one(var):
        if not _is_var(var) or _names(var)[:2] != ("repeat", "stage"):
            return var
        value = var.get_value()
        return var.replace(value.reshape(-1, *value.shape[3:]), out_sharding=_names(var)[2:])

    return jax.tree.map(one, tree, is_leaf=_is_var)


def restage(tree, stages: int, repeats: int):
    """Inverse of `unstage`: canonical [L, ...] layer variables to [R, S, L/(S*R), ...]."""

    def one(var):
        if not _is_var(var) or _names(var)[:1] != ("layers",):
            return var
        value = var.get_value()
        shape = (repeats, stages, value.shape[0] // (stages * repeats), *value.shape[1:])
        return var.replace(value.reshape(shape), out_sharding=("repeat", "stage", *_names(var)))

    return jax.tree.map(one, tree, is_leaf=_is_var)


def apply_pipeline(model: nnx.Module, stages: int, cfg: PipelineConfig) -> None:
    """Split `model.layers` into `stages` pipeline stages and run them with `Pipeline`."""
    n_layers = _variables(model.layers)[0].shape[0]
    micro = check_pipeline(n_layers, stages, cfg)
    stage_layers(model.layers, stages, cfg.repeats)
    model.layer_runner = Pipeline(stages, cfg.repeats, micro, inner=model.layer_runner)
