"""Meshes and logical-axis rules: how named array dimensions land on devices.

Nothing here knows a particular model; models know nothing of meshes.
"""

from sharding.experts import route_to_experts
from sharding.mesh import (
    AXES,
    MESH_AXES,
    MeshAxis,
    MeshConfig,
    ShardingError,
    describe_mesh,
    make_mesh,
    mesh_flags,
    mesh_sizes,
)
from sharding.pipeline import PipelineConfig, apply_pipeline, bubble, restage, stages_of, unstage
from sharding.rules import (
    DEFAULT_RULES,
    RULE_PRESETS,
    Rules,
    axis_rules,
    batch_sharding,
    check_divisible,
    constrain,
    default_rules,
    divisibility_errors,
    layout,
    logical_to_spec,
    override_rules,
    process_block,
    tree_shardings,
)

__all__ = [
    "AXES",
    "DEFAULT_RULES",
    "MESH_AXES",
    "RULE_PRESETS",
    "MeshAxis",
    "MeshConfig",
    "PipelineConfig",
    "Rules",
    "ShardingError",
    "apply_pipeline",
    "axis_rules",
    "batch_sharding",
    "bubble",
    "check_divisible",
    "constrain",
    "default_rules",
    "divisibility_errors",
    "layout",
    "describe_mesh",
    "logical_to_spec",
    "make_mesh",
    "mesh_flags",
    "mesh_sizes",
    "override_rules",
    "process_block",
    "restage",
    "route_to_experts",
    "stages_of",
    "tree_shardings",
    "unstage",
]
