"""Helpers shared by several test modules (imported like tests/pegasus_schemas.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(root, name):
    """Import bin/<name>.py as a module so tests call its get_args_parser() and main() in-process."""
    spec = importlib.util.spec_from_file_location(f"bin_{name}", Path(root) / "bin" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(root, name, argv) -> int:
    """Run bin/<name>.py in-process as its __main__ does, through the job runner; return the exit code."""
    from utils.cli import run_job

    script = load_script(root, name)
    return run_job(script.main, script.get_args_parser(), [str(arg) for arg in argv])


def make_train_val(root, num_train: int = 4, num_val: int = 3, size: int = 96):
    """root/train and root/val of tiny synthetic images (seeds 21 and 22): the small sets of the hpo and
    train tests; returns *root*."""
    from utils.data.sample_data import make_sample_dataset

    make_sample_dataset(root / "train", num_images=num_train, seed=21, image_size=(size, size))
    make_sample_dataset(root / "val", num_images=num_val, seed=22, image_size=(size, size))
    return root
