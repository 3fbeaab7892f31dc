"""Logical axis names -> mesh axes, in one rule table.

A rule table is a tuple of `(logical_name, mesh_axes)`, built from the axes' declarations
(sharding.mesh.AXES) and overridable per name. Each dimension of an array takes the axes of its
name's rule that the dimensions before it left free, so `batch -> (data, fsdp)` and
`embed -> fsdp` coexist: an activation `(batch, length, embed)` shards its batch over data and
fsdp and keeps embed whole, while a weight `(embed, mlp)` shards embed over fsdp (ZeRO-3) and
mlp over tensor. Names without a rule are never split.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sharding.mesh import AXES, MeshAxis, ShardingError, mesh_flags

Rules = tuple[tuple[str, tuple[str, ...]], ...]


def default_rules(axes: Sequence[MeshAxis] = AXES) -> Rules:
    """One rule per logical name: the axes that declare it, leading ones first, then in mesh
    order. A dimension takes those of its axes that the array's other dimensions left free."""
    names: dict[str, list[str]] = {}
    for axis in axes:
        for name in axis.shards:
            names.setdefault(name, [])
            if name in axis.leads:
                names[name].insert(0, axis.name)
            else:
                names[name].append(axis.name)
    return tuple((name, tuple(mesh_axes)) for name, mesh_axes in names.items())


def override_rules(rules: Rules, overrides: Mapping[str, Sequence[str]]) -> Rules:
    """`rules` with the names of `overrides` mapped to the given axes instead (() = never
    split); new names are added."""
    table = dict(rules)
    table.update({name: tuple(axes) for name, axes in overrides.items()})
    return tuple(table.items())


# One table serves every mesh: an axis of size 1 costs nothing, so pure data parallel, FSDP,
# tensor parallel and their products are just mesh shapes.
DEFAULT_RULES: Rules = default_rules()

# Megatron-style: weights replicated over fsdp (no ZeRO-3 gathers), sharded only by tensor.
REPLICATED_WEIGHT_RULES: Rules = override_rules(DEFAULT_RULES, {"embed": ()})

RULE_PRESETS: dict[str, Rules] = {"default": DEFAULT_RULES, "no_zero3": REPLICATED_WEIGHT_RULES}


_current_rules: contextvars.ContextVar[Rules] = contextvars.ContextVar(
    "shardtrain_rules", default=DEFAULT_RULES
)


def current_rules() -> Rules:
    """The table `constrain` uses now (set by `axis_rules`)."""
    return _current_rules.get()


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
    table = dict(rules)
    for name in names:
        chosen = tuple(a for a in table.get(name, ()) if a not in used)
        if mesh is not None:
            chosen = tuple(a for a in chosen if mesh.shape.get(a, 1) > 1 and a not in unusable)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    return P(*spec)


def axes_of(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, an axis, or a tuple of axes)."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def splitting_axes(names: Sequence[str | None], rules: Rules, sizes: Mapping[str, int]):
    """The mesh axes (of size > 1 in `sizes`) that split the last of `names`'s dimensions,
    the dimensions before it taking theirs first."""
    return tuple(a for a in axes_of(logical_to_spec(names, rules)[-1]) if sizes.get(a, 1) > 1)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pin an activation's layout by logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(names, _current_rules.get(), mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, dividing(spec, x.shape, mesh)))


def dividing(spec: P, shape: Sequence[int], mesh) -> P:
    """`spec` keeping, per dimension, the leading axes whose sizes divide it: a small batch
    (generation) is split as far as it goes and replicated beyond, never unevenly (which
    jax 0.11 cannot name on the way out of a jitted function)."""
    out = []
    for entry, size in zip(spec, shape, strict=False):
        kept, ways = [], 1
        for axis in axes_of(entry):
            if size % (ways * mesh.shape[axis]):
                break
            kept.append(axis)
            ways *= mesh.shape[axis]
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*out)


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


def named_leaves(tree) -> list[tuple[tuple[int, ...], jax.numpy.dtype, tuple[str | None, ...]]]:
    """(shape, dtype, logical names) of every array leaf; leaves that are not Variables carry
    no names (never split)."""
    out = []
    for x in jax.tree.leaves(tree, is_leaf=_is_var):
        names = _names(x) if _is_var(x) else (None,) * len(x.shape)
        out.append((tuple(x.shape), x.dtype, names))
    return out


def _dotted_path(path) -> str:
    """'layers.wk' for a tree path (a Variable's own 'value' key left out)."""
    keys = (str(getattr(k, "key", k)) for k in path)
    return ".".join(k for k in keys if k != "value")


def layout(tree) -> str:
    """A table of how each array of `tree` (sharded params or state) lies on its mesh: logical
    names, the mesh axes each dimension is split over, and the shape every device holds."""
    rows = [("array", "shape", "logical names", "split over", "per device")]
    for path, x in jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_var):
        names = _names(x) if _is_var(x) else (None,) * x.ndim
        value = x.get_value() if _is_var(x) else x
        spec = tuple(value.sharding.spec) + (None,) * (value.ndim - len(value.sharding.spec))
        rows.append((
            _dotted_path(path), "x".join(map(str, value.shape)), ", ".join(n or "-" for n in names),
            ", ".join("x".join(axes_of(a)) or "-" for a in spec),
            "x".join(map(str, value.sharding.shard_shape(value.shape))),
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)  # fmt: skip


def divisibility_errors(tree, mesh, rules: Rules) -> list[ShardingError]:
    """One `ShardingError` per parameter dimension its mesh axes cannot split (`mesh` may be
    abstract: only its axis sizes are read)."""
    errors = []
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_var)
    for path, x in flat:
        if not _is_var(x):
            continue
        spec = logical_to_spec(_names(x), rules, mesh)
        for dim, (size, name, axes) in enumerate(zip(x.shape, _names(x), spec, strict=True)):
            if axes is None:
                continue
            axes = axes_of(axes)
            ways = math.prod(mesh.shape[a] for a in axes)
            if size % ways:
                where = _dotted_path(path)
                flags = mesh_flags(mesh, axes)
                errors.append(ShardingError(
                    f"Parameter '{where}' dimension {dim} ('{name}', size {size}) is not "
                    f"divisible by {flags}; choose mesh sizes that divide {size} or change "
                    "the model shape."
                ))  # fmt: skip
    return errors


def check_divisible(tree, mesh, rules: Rules) -> None:
    """Raise the first of `divisibility_errors`."""
    errors = divisibility_errors(tree, mesh, rules)
    if errors:
        raise errors[0]


def batch_sharding(mesh: Mesh, rules: Rules, names: Sequence[str | None]) -> NamedSharding:
    """A batch array's sharding from the logical names of its dimensions, e.g.
    ("batch", "length")."""
    return NamedSharding(mesh, logical_to_spec(names, rules, mesh))


def process_block(sharding: NamedSharding, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The block of a global array of `shape` that this process's devices hold, one slice per
    dimension; it must be one block (devices are laid out process by process along the mesh)."""
    index = sharding.devices_indices_map(shape)
    block = []
    for dim, size in enumerate(shape):
        spans = {index[d][dim].indices(size)[:2] for d in sharding.addressable_devices}
        lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
        if sum(b - a for a, b in spans) != hi - lo:
            raise ShardingError(
                f"This process's devices hold parts {sorted(spans)} of dimension {dim} of the "
                "batch, not one block; order the mesh so that data-parallel axes come before "
                "tensor/pipeline ones."
            )
        block.append(slice(lo, hi))
    return tuple(block)
