"""Validation of generated files against the Pegasus 5 YAML schemas in ../shared/pegasus-schemas.

The schemas refer to each other by bare file name, so every file is registered under
its own name (see the README in that folder). Tests skip when the folder is absent.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest
import yaml

SCHEMA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "pegasus-schemas"
SCHEMA_FILES = ("common.yml", "rc-5.0.yml", "tc-5.0.yml", "sc-5.0.yml", "wf-5.0.yml")
# generated file -> schema it must satisfy
SCHEMA_OF = {
    "workflow.yml": "wf-5.0.yml",
    "replicas.yml": "rc-5.0.yml",
    "transformations.yml": "tc-5.0.yml",
    "sites.yml": "sc-5.0.yml",
}


def require_schemas() -> Path:
    if not all((SCHEMA_DIR / name).is_file() for name in SCHEMA_FILES):
        pytest.skip(f"Pegasus schemas not found in {SCHEMA_DIR}")
    return SCHEMA_DIR


@lru_cache(maxsize=None)
def validator(schema_name: str):
    from jsonschema import Draft7Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT7

    schema_dir = require_schemas()
    registry = Registry().with_resources(
        (name, Resource.from_contents(yaml.safe_load((schema_dir / name).read_text()),
                                      default_specification=DRAFT7))
        for name in SCHEMA_FILES)
    return Draft7Validator({"$ref": schema_name}, registry=registry)


def schema_errors(document: dict, schema_name: str) -> list[str]:
    return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
            for error in validator(schema_name).iter_errors(document)]


def validate_run_dir(run_dir: Path) -> dict[str, list[str]]:
    """Schema errors per generated file (an empty list each when all is well)."""
    require_schemas()
    return {name: schema_errors(yaml.safe_load((run_dir / name).read_text()), schema)
            for name, schema in SCHEMA_OF.items()}
