"""A picture of the DAG: workflow.dot (jobs and the files passed between them), workflow.png when `dot` exists."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from Pegasus.api import Workflow

from ..atomic import atomic_path, write_text
from .pegasus_api import parent_ids, use_type

MAX_EDGE_FILES = 3  # file names written on an edge; more are counted


def dot_text(wf: Workflow, num_pairs: int) -> str:
    """The DOT source: one box per job, the replica catalog as one cylinder, edges labelled with files."""
    parents = parent_ids(wf)
    produced = {}
    for job_id, job in wf.jobs.items():
        for use in job.uses:
            if use_type(use) in ("output", "checkpoint"):
                produced[use.file.lfn] = job_id
    lines = [f'digraph "{wf.name}" {{', "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fillcolor="#dbe9f6", fontname="Helvetica"];',
             '  edge [fontname="Helvetica", fontsize=9];',
             f'  inputs [shape=cylinder, fillcolor="#f3e3c3", label="replica catalog\\n{num_pairs} '
             'image/annotation pairs"];']
    for job_id, job in wf.jobs.items():
        label = job_id if job_id == job.transformation else f"{job_id}\\n({job.transformation})"
        lines.append(f'  "{job_id}" [label="{label}"];')
    for job_id, job in wf.jobs.items():
        inputs = {use.file.lfn for use in job.uses if use_type(use) == "input"}
        if any(lfn not in produced for lfn in inputs):
            lines.append(f'  inputs -> "{job_id}";')
        for parent in sorted(parents[job_id]):
            passed = sorted(lfn for lfn in inputs if produced.get(lfn) == parent)
            label = ", ".join(passed[:MAX_EDGE_FILES])
            if len(passed) > MAX_EDGE_FILES:
                label += f" +{len(passed) - MAX_EDGE_FILES}"
            lines.append(f'  "{parent}" -> "{job_id}" [label="{label}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_graph(wf: Workflow, num_pairs: int, dot_path: Path, png_path: Path) -> dict[str, Path]:
    """Write the DOT file, and the PNG when graphviz is installed; returns what was written."""
    write_text(dot_path, dot_text(wf, num_pairs))
    written = {"dot": dot_path}
    dot = shutil.which("dot")
    if dot:
        with atomic_path(png_path) as tmp:
            subprocess.run([dot, "-Tpng", str(dot_path), "-o", str(tmp)], check=True, capture_output=True)
        written["png"] = png_path
    return written
