"""Device mesh from a `MeshConfig`: one named axis per kind of parallelism."""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor", "pipeline")


class ShardingError(ValueError):
    """A mesh or shape the devices cannot split; the message names the value and the fix."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Devices per parallelism; `-1` fills whatever devices the others leave."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    pipeline: int = 1

    def resolve(self, num_devices: int) -> dict[str, int]:
        """Axis sizes with `-1` filled in; raises ShardingError naming the bad value."""
        sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
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


def mesh_flags(mesh: Mesh, axes) -> str:
    """The command-line flags that set `axes`, e.g. '--mesh.data=2 x --mesh.fsdp=4'."""
    return " x ".join(f"--mesh.{a}={mesh.shape[a]}" for a in axes)


def describe_mesh(mesh: Mesh) -> str:
    """The axes that split anything, e.g. 'data=2 x tensor=4', or '1 device'."""
    return " x ".join(f"{a}={s}" for a, s in mesh.shape.items() if s > 1) or "1 device"


def make_mesh(config: MeshConfig, devices: list | None = None) -> Mesh:
    """A `Mesh` over `devices` (default: all) with Auto axes, so GSPMD places collectives."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = config.resolve(len(devices))
    # make_mesh orders devices by physical topology (ICI/NVLink) where it knows it.
    return jax.make_mesh(
        tuple(sizes.values()),
        MESH_AXES,
        axis_types=(AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )
