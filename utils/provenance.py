"""Run records: every job writes its parameters, package versions and a hash of its inputs."""

from __future__ import annotations

import hashlib
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

from .atomic import write_json

TRACKED_PACKAGES = ("torch", "torchvision", "torchmetrics", "faster-coco-eval", "optuna", "numpy", "pandas",
                    "Pillow", "lxml", "opencv-python", "matplotlib", "scikit-learn", "ImageHash",
                    "pegasus-wms.api")


def file_sha256(path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def inputs_sha256(paths) -> str:
    """One hash over many files: each file's name and content hash, in sorted name order."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        digest.update(path.name.encode())
        digest.update(b"\0")
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def package_versions(names=TRACKED_PACKAGES) -> dict[str, str | None]:
    versions = {"python": sys.version.split()[0]}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_record(job: str, params: dict, inputs=()) -> dict:
    inputs = [Path(p) for p in inputs]
    return {
        "job": job,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in params.items()},
        "packages": package_versions(),
        "num_inputs": len(inputs),
        "inputs_sha256": inputs_sha256(inputs) if inputs else None,
    }


def write_run_record(path, job: str, params: dict, inputs=()) -> dict:
    record = run_record(job, params, inputs)
    write_json(path, record)
    return record
