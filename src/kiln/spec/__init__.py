"""What users write: ``kiln.toml`` parsed into typed models."""

from kiln.spec.loader import SpecError, find_spec_file, json_schema, load_spec, parse_spec
from kiln.spec.models import (
    CopyStep,
    EnvStep,
    Health,
    Project,
    Recipe,
    Resources,
    RunStep,
    Service,
    Spec,
    Update,
    Volume,
    WorkdirStep,
)

__all__ = [
    "CopyStep",
    "EnvStep",
    "Health",
    "Project",
    "Recipe",
    "Resources",
    "RunStep",
    "Service",
    "Spec",
    "SpecError",
    "Update",
    "Volume",
    "WorkdirStep",
    "find_spec_file",
    "json_schema",
    "load_spec",
    "parse_spec",
]
