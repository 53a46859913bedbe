"""Every use of Pegasus.api internals, in one place, each with the reason.

Pegasus.api (pegasus-wms.api 5.1) builds and writes the catalogs and the DAG; three
things it does not offer publicly, and the generator needs:

- **Determinism.** ``Job.uses`` is a set and ``Workflow.dependencies`` holds sets of
  child ids: both iterate in hash order, which changes between processes, so
  workflow.yml would differ from one generation to the next. We sort them, which
  needs ``Use._type`` and ``Workflow._infer_dependencies()``.
- **Atomic writes.** A catalog is written to a temporary file and renamed; Workflow.plan()
  then reads the file from ``_path``, which must name the final file.
- **The planner's command line**, printed when this machine has no pegasus-plan: the
  same arguments Workflow.plan() would pass, from ``Pegasus.client._client``.
- **The planner's output in a file.** Workflow.plan() streams every planner line to the
  terminal through the ``pegasus.client`` logger's own console handler (it does not
  propagate); ``planner_output_to`` swaps that handler for a file while planning.

If a Pegasus upgrade changes one of these, this module is the one to fix.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from pathlib import Path

from Pegasus.api import Workflow

from ..atomic import atomic_path


class _SortedSet(set):
    """A set that iterates in sorted order, so that jobDependencies are written the same every time."""

    def __iter__(self):
        return iter(sorted(set.__iter__(self)))


def use_type(use) -> str:
    """"input", "output", "checkpoint" or "inout": how a job uses a file."""
    return use._type


def make_deterministic(wf: Workflow) -> None:
    """Sort every job's file uses and the inferred dependencies; call once, after the last job is added."""
    for job in wf.jobs.values():
        job.uses = sorted(job.uses, key=lambda use: (use_type(use), use.file.lfn))
    wf._infer_dependencies()
    for dependency in wf.dependencies.values():
        dependency.children_ids = _SortedSet(dependency.children_ids)


def parent_ids(wf: Workflow) -> dict[str, set[str]]:
    """Parent job ids of each job, inferred from the files as Workflow.write does."""
    wf._infer_dependencies()
    parents = {job_id: set() for job_id in wf.jobs}
    for parent_id, dependency in wf.dependencies.items():
        for child in dependency.children_ids:
            parents[child].add(parent_id)
    return parents


def write_catalogs(catalogs: dict[Path, object]) -> None:
    """Write each catalog (or the workflow) to its path atomically; Workflow.plan() then finds it there."""
    # Serialising builds millions of short-lived containers (JSON round trip, YAML nodes) and
    # no cycles: with the cyclic GC paused, 100,000 images write ~1.5x faster.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for path, catalog in catalogs.items():
            with atomic_path(path) as tmp:
                catalog.write(str(tmp))
            catalog._path = str(path)
    finally:
        if gc_was_enabled:
            gc.enable()


def planner_arguments(**options) -> list[str]:
    """pegasus-plan's arguments for Workflow.plan()'s keyword *options* (conf, sites, dir, submit, ...)."""
    from Pegasus.client._client import get_planner_args

    return get_planner_args(**options)


@contextlib.contextmanager
def planner_output_to(path: Path):
    """While planning, write what Pegasus.api would print (the planner's output) to *path* instead."""
    logger = logging.getLogger("pegasus.client")
    saved, saved_level, saved_propagate = list(logger.handlers), logger.level, logger.propagate
    logger.setLevel(logging.DEBUG)  # the whole output, whatever the terminal's level was
    logger.propagate = False  # else workflow.py's root handler (logging.basicConfig) printed it all on stderr too
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path, mode="w", encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(message)s"))
    for handler in saved:
        logger.removeHandler(handler)
    logger.addHandler(to_file)
    try:
        yield path
    finally:
        logger.removeHandler(to_file)
        to_file.close()
        for handler in saved:
            logger.addHandler(handler)
        logger.setLevel(saved_level)
        logger.propagate = saved_propagate
