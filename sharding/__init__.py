"""Meshes and logical-axis rules: how named array dimensions land on devices.

Nothing here knows a particular model; models know nothing of meshes.
"""

from sharding.mesh import MESH_AXES, MeshConfig, ShardingError, describe_mesh, make_mesh, mesh_flags
from sharding.pipeline import PipelineConfig, apply_pipeline, bubble, restage, unstage
from sharding.rules import (
    DEFAULT_RULES,
    RULE_PRESETS,
    axis_rules,
    batch_sharding,
    check_divisible,
    constrain,
    logical_to_spec,
    tree_shardings,
)

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "RULE_PRESETS",
    "MeshConfig",
    "PipelineConfig",
    "ShardingError",
    "apply_pipeline",
    "axis_rules",
    "batch_sharding",
    "bubble",
    "check_divisible",
    "describe_mesh",
    "constrain",
    "logical_to_spec",
    "make_mesh",
    "mesh_flags",
    "restage",
    "tree_shardings",
    "unstage",
]
