"""Logical axis names -> mesh axes, in one rule table.

A rule table is an ordered tuple of `(logical_name, mesh_axes)`. For each dimension of an array
the first rule for its logical name whose mesh axes are still free in that array is used, so
`batch -> (data, fsdp)` and `embed -> fsdp` coexist: an activation `(batch, length, embed)`
shards its batch over data and fsdp and keeps embed whole, while a weight `(embed, mlp)` shards
embed over fsdp (ZeRO-3) and mlp over tensor.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sharding.mesh import ShardingError, mesh_flags

Rules = tuple[tuple[str, tuple[str, ...]], ...]

# One table serves every mesh: an axis of size 1 costs nothing, so pure data parallel, FSDP,
# tensor parallel and their products are just mesh shapes.
DEFAULT_RULES: Rules = (
    # Outside the pipelined layers the batch splits over the stages too (embedding, logits,
    # loss); inside them `pipeline` is manual and drops out, leaving (data, fsdp).
    ("batch", ("pipeline", "data", "fsdp")),
    ("batch", ("data", "fsdp")),  # when `pipeline` is taken, e.g. by `stage`
    # Weights outside the pipelined layers (embedding, head, final norm) also split over the
    # pipeline axis, ZeRO-3 style; stacked layer weights have `pipeline` taken by `stage`.
    ("embed", ("fsdp", "pipeline")),
    ("embed", ("fsdp",)),
    ("mlp", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("vocab", ("tensor",)),
    ("length", ()),
    ("head_dim", ()),
    ("layers", ()),
    ("stage", ("pipeline",)),
    ("repeat", ()),
    ("classes", ()),
)

# Megatron-style: weights replicated over fsdp (no ZeRO-3 gathers), sharded only by tensor.
REPLICATED_WEIGHT_RULES: Rules = tuple(
    (name, ()) if name == "embed" else (name, axes) for name, axes in DEFAULT_RULES
)

RULE_PRESETS: dict[str, Rules] = {"default": DEFAULT_RULES, "no_zero3": REPLICATED_WEIGHT_RULES}


_current_rules: contextvars.ContextVar[Rules] = contextvars.ContextVar(
    "shardtrain_rules", default=DEFAULT_RULES
)


@contextlib.contextmanager
def axis_rules(rules: Rules) -> Iterator[None]:
    """Make `rules` the table that `constrain` uses while tracing a model."""
    token = _current_rules.set(rules)
    try:
        yield
    finally:
        _current_rules.reset(token)


def logical_to_spec(names: Sequence[str | None], rules: Rules, mesh: Mesh | None = None) -> P:
    """PartitionSpec for an array whose dimensions carry `names` (None = never sharded).

    Mesh axes of size 1 are dropped so specs stay readable, and so are axes a surrounding
    `shard_map` has made manual; unknown names are replicated.
    """
    unusable = set(mesh.manual_axes) if mesh is not None else set()
    used: set[str] = set()
    spec = []
    for name in names:
        chosen: tuple[str, ...] = ()
        for rule_name, axes in rules:
            if rule_name == name and not used.intersection(axes):
                chosen = axes
                break
        if mesh is not None:
            chosen = tuple(a for a in chosen if mesh.shape[a] > 1 and a not in unusable)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    return P(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pin an activation's layout by logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(names, _current_rules.get(), mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _names(variable: nnx.Variable) -> tuple[str | None, ...]:
    names = variable.get_metadata().get("out_sharding")
    return tuple(names) if names else (None,) * variable.ndim


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def tree_shardings(tree, mesh: Mesh, rules: Rules):
    """A `NamedSharding` for every leaf: Variables by their logical names, the rest replicated.

    Works for params and for optimizer state alike, since optax mirrors the params' Variables.
    """

    def one(x):
        if _is_var(x):
            return x.replace(NamedSharding(mesh, logical_to_spec(_names(x), rules, mesh)))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, tree, is_leaf=_is_var)


def check_divisible(tree, mesh: Mesh, rules: Rules) -> None:
    """Raise `ShardingError` naming the first parameter dimension its mesh axes cannot split."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_var)
    for path, x in flat:
        if not _is_var(x):
            continue
        spec = logical_to_spec(_names(x), rules, mesh)
        for dim, (size, name, axes) in enumerate(zip(x.shape, _names(x), spec, strict=True)):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else tuple(axes)
            ways = math.prod(mesh.shape[a] for a in axes)
            if size % ways:
                where = ".".join(str(getattr(k, "key", k)) for k in path)
                flags = mesh_flags(mesh, axes)
                raise ShardingError(
                    f"Parameter '{where}' dimension {dim} ('{name}', size {size}) is not "
                    f"divisible by {flags}; choose mesh sizes that divide {size} or change "
                    "the model shape."
                )


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
    """Batch arrays split their leading dimension over the `batch` rule's axes."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh))
