"""Run records: every job writes its parameters, package versions, the version of its own code and a hash of its
inputs."""

from __future__ import annotations

import functools
import hashlib
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

from . import safe_yaml
from .atomic import write_json
from .errors import InputError

TRACKED_PACKAGES = ("torch", "torchvision", "torchmetrics", "faster-coco-eval", "optuna", "numpy", "pandas",
                    "Pillow", "lxml", "opencv-python", "matplotlib", "scikit-learn", "ImageHash",
                    "pegasus-wms.api")
# A workflow hands every job its run's settings under this name (utils/pegasus/experiment.py writes it).
EXPERIMENT_CONFIG_FILE = "experiment_config.yml"


def file_sha256(path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()  # read in blocks, never held whole


def inputs_sha256(paths, known: dict | None = None) -> str:
    """One hash over many files: each file's name and content hash, in (name, hash) order, so that it follows the
    files alone: a sort on full paths put the files of two archives unpacked into randomly named folders (a train
    job's training and validation sets) in a random order, and two runs on the same data recorded two hashes. The
    folders are not in it: two files of one name swapped between two folders hash alike (sets_sha256 tells sets apart).
    *known* maps paths to the file_sha256 a job took as it read them (predict's decode), so they are not read again."""
    known = known or {}
    named = sorted((path.name, known.get(path) or file_sha256(path)) for path in (Path(p) for p in paths))
    digest = hashlib.sha256()
    for name, sha256 in named:
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(sha256.encode())
    return digest.hexdigest()


def sets_sha256(*sets, known: dict | None = None) -> str:
    """One hash over sets of files in their roles' order (training, then validation), each set by inputs_sha256
    (a set's files sit in one folder). The folders archives unpack into have random names, so one sort over two
    sets' full paths put the files of two archives of one name (train/set.tar, val/set.tar) in a random order.
    *known*: as inputs_sha256's."""
    digest = hashlib.sha256()
    for files in sets:
        digest.update(inputs_sha256(files, known).encode())
    return digest.hexdigest()


# The project's own sources, wherever the code runs from (a checkout, the image's copy): workflow.py, bin/, utils/.
SOURCE_ROOT = Path(__file__).resolve().parents[1]
SOURCE_SUFFIXES = (".py", ".html")  # the service's page is code too


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """The project's code as run: its package version and one sha256 over its sources (each file's path and
    content), so two records say whether the same code made them; the version alone stays 0.1.0 through every
    edit of a checkout."""
    try:
        version = metadata.version("mask-detection-workflow")
    except metadata.PackageNotFoundError:  # run from a copy that was not installed
        version = None
    files = sorted(path for folder in ("bin", "utils") for path in (SOURCE_ROOT / folder).rglob("*")
                   if path.suffix in SOURCE_SUFFIXES and "__pycache__" not in path.parts)
    digest = hashlib.sha256()
    for path in [SOURCE_ROOT / "workflow.py", *files]:
        if path.is_file():
            digest.update(path.relative_to(SOURCE_ROOT).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).hexdigest().encode())
    return {"version": version, "sources_sha256": digest.hexdigest()}


def files_named(*flags) -> list[Path]:
    """The files among flags that may name one (--params; hpo's weights_file_given), for a run record's inputs: a
    job's hyperparameters and starting weights shape its model as its images do."""
    return [Path(flag) for flag in flags if flag and Path(flag).is_file()]


def package_versions(names=TRACKED_PACKAGES) -> dict[str, str | None]:
    versions = {"python": sys.version.split()[0]}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def experiment_config(folder=".") -> dict | None:
    """The workflow run's settings when the job was handed them (EXPERIMENT_CONFIG_FILE in its working
    directory: the local executor and Pegasus both stage inputs there), else None (a by-hand run)."""
    path = Path(folder) / EXPERIMENT_CONFIG_FILE
    if not path.is_file():
        return None
    import yaml

    try:
        settings = safe_yaml.load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        reason = " ".join(str(error).split())
        raise InputError(f"{path}: the workflow's settings are not valid YAML ({reason})") from None
    if not isinstance(settings, dict):
        raise InputError(f"{path}: the workflow's settings must be a mapping, got {type(settings).__name__}")
    return settings


def compute_threads() -> int | None:
    """The threads torch computes with (OMP_NUM_THREADS: under the local executor, the cores the job's cores profile
    asks for): on a CPU the same seed gives bit-identical results only at the same count, as its parallel sums split
    the work by thread (an HPO trial's loss 1.33770 on one thread, 1.33128 on two). None where the job does not use
    torch."""
    torch = sys.modules.get("torch")  # not imported for a job that does not use it
    return torch.get_num_threads() if torch is not None else None


def run_record(job: str, params: dict, inputs=(), known_sha256: dict | None = None) -> dict:
    """The record of a job run on *inputs*; *known_sha256*: the hashes of inputs the job took as it read them
    (inputs_sha256). An input that cannot be read now (gone or unreadable since the job listed it: a listed skip)
    is hashed as 'unreadable' and named in inputs_unreadable: the record of a job that has done its work never
    ends it in a traceback."""
    inputs = [Path(p) for p in inputs]
    known, unreadable = dict(known_sha256 or {}), []
    for path in inputs:
        if path not in known:
            try:
                known[path] = file_sha256(path)
            except OSError as error:
                known[path] = "unreadable"
                unreadable.append({"file": str(path), "problem": error.strerror or str(error)})
    record = {
        "job": job,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in params.items()},
        "packages": package_versions(),
        "code": code_version(),
        "threads": compute_threads(),
        "num_inputs": len(inputs),
        "inputs_sha256": inputs_sha256(inputs, known) if inputs else None,
    }
    if unreadable:
        record["inputs_unreadable"] = unreadable
    settings = experiment_config()
    if settings is not None:
        record["experiment_config"] = settings
    return record


def write_run_record(path, job: str, params: dict, inputs=(), known_sha256: dict | None = None) -> dict:
    record = run_record(job, params, inputs, known_sha256)
    write_json(path, record)
    return record
