"""The mesh axes, declared once as data, and the device mesh built from their sizes.

An axis is a name, its default size, and the logical names it shards by default: the rule table
(sharding.rules) and the `--mesh.*` flags both follow from `AXES`. Adding a kind of parallelism
is one `MeshAxis` entry; nothing outside `sharding/` names an axis unless its meaning requires
it (the pipeline runner).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh


class ShardingError(ValueError):
    """A mesh or shape the devices cannot split; the message names the value and the fix."""


@dataclasses.dataclass(frozen=True)
class MeshAxis:
    name: str
    help: str
    shards: tuple[str, ...] = ()
    """Logical names this axis splits by default, in addition to the axes declared before it."""
    leads: tuple[str, ...] = ()
    """Logical names for which this axis comes first (outermost) among their axes."""
    default: int = 1


# Mesh order: devices are laid out row-major in this order (data-parallel axes first, so that
# each process holds one block of the batch).
AXES: tuple[MeshAxis, ...] = (
    # Whole experts per device; outside the MoE blocks one more data-parallel axis. First in
    # the mesh and the batch, so that an expert shard's rows are one block (shard_map's
    # layout) and each process still holds one block of the batch.
    MeshAxis("expert", "Expert parallel: whole experts per device (E/ep each); the batch "
             "splits over it too.", ("expert", "batch"), leads=("batch",)),
    MeshAxis("data", "Data parallel: replicas that split the batch.", ("batch",), default=-1),
    MeshAxis("fsdp", "ZeRO-3: splits the batch and every weight's embed dimension.",
             ("batch", "embed")),
    # Splits the sequence of every activation (attention: sharding.context); weights are
    # ZeRO-3-split over it too, since its devices hold copies otherwise (measured in
    # benchmarks/context.py). After the batch axes, so a process still holds one block.
    MeshAxis("context", "Context parallel: splits each sequence's length (long context); "
             "weights ZeRO-split over it like fsdp.", ("length", "embed")),
    MeshAxis("tensor", "Tensor (Megatron) parallel: heads, MLP and vocabulary dimensions.",
             ("mlp", "heads", "kv_heads", "vocab")),
    # Outside the pipelined layers the batch splits over the stages first (embedding, logits,
    # loss), so stage p's microbatches are its own rows; weights outside them split over the
    # stages ZeRO-3 style. Inside, `stage` takes the axis.
    MeshAxis("pipeline", "Pipeline parallel: stages of layers.", ("stage", "batch", "embed"),
             leads=("batch",)),
)  # fmt: skip

MESH_AXES = tuple(a.name for a in AXES)


AUTO_HELP = (
    "Let the planner (engine.autoplan) choose the mesh, remat, gradient accumulation, pipeline "
    "microbatches and loss chunks for the devices present; keys set on the command line or in a "
    "--config file stay as given, and so does the configured plan unless another is predicted "
    "over 20 percent faster."
)


def _mesh_config_class(axes: Sequence[MeshAxis]) -> type:
    """A frozen dataclass with one int field per axis (`--mesh.<axis>` on the command line)."""
    import typing

    import tyro

    fields = [
        (
            a.name,
            typing.Annotated[int, tyro.conf.arg(help=a.help)],
            dataclasses.field(default=a.default),
        )
        for a in axes
    ]
    fields.append((
        "auto",
        typing.Annotated[bool, tyro.conf.arg(help=AUTO_HELP)],
        dataclasses.field(default=False),
    ))  # fmt: skip

    def resolve_sizes(self, num_devices: int) -> dict[str, int]:
        """Axis sizes with `-1` filled in; raises ShardingError naming the bad value."""
        return resolve(mesh_sizes(self), num_devices)

    cls = dataclasses.make_dataclass(
        "MeshConfig", fields, frozen=True, namespace={"resolve": resolve_sizes}
    )
    cls.__doc__ = "Devices per parallelism; `-1` fills whatever devices the others leave."
    cls.__module__ = __name__
    return cls


MeshConfig = _mesh_config_class(AXES)


def mesh_sizes(config) -> dict[str, int]:
    """Axis name -> size (maybe -1) of a MeshConfig or a plain mapping."""
    if isinstance(config, Mapping):
        return dict(config)
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "auto"}


def resolve(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Axis sizes with `-1` filled in; raises ShardingError naming the bad value."""
    sizes = dict(sizes)
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise ShardingError(
                f"--mesh.{axis}={size} is not a valid mesh size; use a positive "
                "device count or -1 to fill the remaining devices."
            )
    fill = [axis for axis, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ShardingError(
            f"Only one mesh axis may be -1, got {', '.join(f'--mesh.{a}=-1' for a in fill)}; "
            "give explicit sizes to all but one."
        )
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if num_devices % fixed:
            raise ShardingError(
                f"Cannot fill --mesh.{fill[0]}=-1: the other axes use {fixed} devices, "
                f"which does not divide the {num_devices} available; choose sizes "
                f"whose product divides {num_devices}."
            )
        sizes[fill[0]] = num_devices // fixed
    total = math.prod(sizes.values())
    if total != num_devices:
        shape = " x ".join(f"{a}={s}" for a, s in sizes.items())
        raise ShardingError(
            f"Mesh {shape} needs {total} devices but the run has {num_devices}; "
            f"make the mesh sizes multiply to {num_devices} (or set one axis to -1)."
        )
    return sizes


def with_device_hint(error: ShardingError, platform: str) -> ShardingError:
    """On a CPU, a mesh wanting more devices than there are: say how to get virtual ones."""
    found = re.search(r"needs (\d+) devices but the run has (\d+)", str(error))
    if platform != "cpu" or not found or int(found[1]) <= int(found[2]):
        return error
    return ShardingError(
        f"{error} On a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N (set before "
        "Python starts) gives N virtual devices."
    )


def mesh_flags(mesh: Mesh, axes) -> str:
    """The command-line flags that set `axes`, e.g. '--mesh.data=2 x --mesh.fsdp=4'."""
    return " x ".join(f"--mesh.{a}={mesh.shape[a]}" for a in axes)


def describe_mesh(mesh: Mesh) -> str:
    """The axes that split anything, e.g. 'data=2 x tensor=4', or '1 device'."""
    return " x ".join(f"{a}={s}" for a, s in mesh.shape.items() if s > 1) or "1 device"


def make_mesh(config, devices: list | None = None, axes: Sequence[MeshAxis] = AXES) -> Mesh:
    """A `Mesh` over `devices` (default: all) with Auto axes, so GSPMD places collectives.

    `config`: a MeshConfig, or a mapping of axis sizes (axes it does not name have size 1)."""
    devices = list(jax.devices() if devices is None else devices)
    given = mesh_sizes(config)
    unknown = set(given) - {a.name for a in axes}
    if unknown:
        raise ShardingError(
            f"Unknown mesh axis {', '.join(sorted(unknown))}; the axes are "
            f"{', '.join(a.name for a in axes)}."
        )
    try:
        sizes = resolve({a.name: given.get(a.name, 1) for a in axes}, len(devices))
    except ShardingError as e:
        raise with_device_hint(e, devices[0].platform) from None
    # make_mesh orders devices by physical topology (ICI/NVLink) where it knows it.
    return jax.make_mesh(
        tuple(sizes.values()),
        tuple(sizes),
        axis_types=(AxisType.Auto,) * len(sizes),
        devices=devices,
    )
