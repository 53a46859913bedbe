"""Output file names of a tagged job (one of several of its kind in a workflow: a fold, a shard)."""

from __future__ import annotations

from pathlib import PurePosixPath

# Suffixes that say what a file is to its job: the tag goes before them, so that the file still ends in them.
ROLE_SUFFIXES = ("_run.json", "_checkpoint.pt")


def tagged_name(name: str, tag: str | None) -> str:
    """*name* with *tag* before its role suffix or extension: model.pt -> model_fold0.pt, evaluate_run.json ->
    evaluate_fold0_run.json, train_checkpoint.pt -> train_fold0_checkpoint.pt; *name* itself without a tag."""
    if not tag:
        return name
    for suffix in ROLE_SUFFIXES:
        if name.endswith(suffix):
            return f"{name[:-len(suffix)]}_{tag}{suffix}"
    path = PurePosixPath(name)
    return f"{path.stem}_{tag}{path.suffix}"
