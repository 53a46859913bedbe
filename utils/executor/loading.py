"""Reading a run directory that workflow.py wrote: the DAG, the catalogs and the properties.

load_workflow() turns workflow.yml, replicas.yml, transformations.yml, sites.yml and
pegasus.properties into plain data for the local executor: one JobSpec per job with
its files, merged profiles and dependencies (explicit ones plus producer -> consumer
from the files), the replica and transformation paths, and a topological order.
Anything the executor could not run locally is a WorkflowError with a one-line message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import yaml

from .. import safe_yaml
from ..errors import shown


class WorkflowError(ValueError):
    """The run directory does not hold a workflow the executor can run (one-line message)."""


@dataclass
class JobSpec:
    id: str
    transformation: str
    arguments: list[str]
    inputs: list[str]
    outputs: list[tuple[str, bool]]       # (lfn, stage_out)
    checkpoints: list[tuple[str, bool]]   # (lfn, stage_out)
    profiles: dict[str, dict]
    parents: set[str] = field(default_factory=set)
    children: set[str] = field(default_factory=set)
    definition: dict = field(default_factory=dict)

    def profile(self, namespace: str, key: str, default=None):
        return self.profiles.get(namespace, {}).get(key, default)

    def profile_number(self, namespace: str, key: str) -> float | None:
        """A numeric profile (cores, runtime, minutes); None when unset or not a number."""
        try:
            return float(self.profile(namespace, key))
        except (TypeError, ValueError):
            return None


@dataclass
class LoadedWorkflow:
    name: str
    run_dir: Path
    jobs: dict[str, JobSpec]
    replicas: dict[str, Path]
    transformations: dict[str, Path]
    properties: dict[str, str]
    output_dir: Path
    topological_order: list[str]
    producers: dict[str, str] = field(default_factory=dict)  # lfn -> the job that writes it

    # Where the local executor runs each job (its inputs linked in by name) and keeps the logs.
    @property
    def scratch_dir(self) -> Path:
        return self.run_dir / "scratch"

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / "logs"

    def job_dir(self, job_id: str) -> Path:
        return self.scratch_dir / job_id


def read_properties(path: Path) -> dict[str, str]:
    """Java-style properties as Pegasus writes them ("key = value"; # and ! comments)."""
    properties = {}
    if not path.is_file():
        return properties
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line[0] in "#!" or line.startswith("["):
            continue
        separators = [i for i in (line.find("="), line.find(":")) if i > 0]
        if not separators:
            continue
        cut = min(separators)
        properties[line[:cut].strip()] = line[cut + 1:].strip()
    return properties


def _load_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise WorkflowError(f"{path}: {what} not found (run workflow.py first)")
    try:
        # Bounded like every YAML a user can edit (utils/safe_yaml.py), not libyaml's CSafeLoader: that one
        # crashes the process on brackets nested 100,000 deep and expands alias bombs unchecked.
        data = safe_yaml.load(path.read_text(encoding="utf-8"), generated=True)
    except UnicodeDecodeError as error:
        raise WorkflowError(f"{path}: not UTF-8 text ({error})") from None
    except yaml.YAMLError as error:
        raise WorkflowError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise WorkflowError(f"{path}: expected a mapping")
    return data


def url_to_path(url: str) -> Path:
    """file:///abs/path or /abs/path -> Path (other schemes cannot be used locally)."""
    if url.startswith("file://"):
        return Path(unquote(urlparse(url).path))
    if "://" in url:
        raise WorkflowError(f"{url}: only file:// URLs and absolute paths can be used by the local executor")
    return Path(url)


def _merge_profiles(*layers: dict) -> dict[str, dict]:
    merged: dict[str, dict] = {}
    for layer in layers:
        for namespace, values in (layer or {}).items():
            merged.setdefault(namespace, {}).update(values or {})
    return merged


def load_workflow(run_dir, workflow_file: str = "workflow.yml") -> LoadedWorkflow:
    run_dir = Path(run_dir).resolve()
    properties = read_properties(run_dir / "pegasus.properties")
    wf = _load_yaml(run_dir / workflow_file, "workflow")
    rc_path = Path(properties.get("pegasus.catalog.replica.file", run_dir / "replicas.yml"))
    tc_path = Path(properties.get("pegasus.catalog.transformation.file", run_dir / "transformations.yml"))
    sc_path = Path(properties.get("pegasus.catalog.site.file", run_dir / "sites.yml"))
    rc = wf.get("replicaCatalog") or _load_yaml(rc_path, "replica catalog")
    tc = wf.get("transformationCatalog") or _load_yaml(tc_path, "transformation catalog")

    replicas = {}
    for entry in rc.get("replicas", []):
        if entry.get("regex"):
            raise WorkflowError(f"{rc_path}: regex replicas are not supported by the local executor")
        pfns = entry.get("pfns", [])
        chosen = next((p for p in pfns if p.get("site") == "local"), pfns[0] if pfns else None)
        if chosen:
            replicas[entry["lfn"]] = url_to_path(chosen["pfn"])

    transformations, tc_profiles = {}, {}
    for transformation in tc.get("transformations", []):
        sites = transformation.get("sites", [])
        chosen = next((s for s in sites if s.get("name") == "local"), sites[0] if sites else None)
        if not chosen:
            raise WorkflowError(f"{tc_path}: transformation {shown(transformation.get('name'))} has no site")
        transformations[transformation["name"]] = url_to_path(chosen["pfn"])
        tc_profiles[transformation["name"]] = _merge_profiles(transformation.get("profiles"),
                                                              chosen.get("profiles"))

    output_dir = run_dir / "outputs"
    if sc_path.is_file():
        sc = _load_yaml(sc_path, "site catalog")
        for site in sc.get("sites", []):
            if site.get("name") == "local":
                for directory in site.get("directories", []):
                    if directory.get("type") == "localStorage":
                        output_dir = Path(directory["path"])

    jobs: dict[str, JobSpec] = {}
    for job in wf.get("jobs", []):
        if job.get("type", "job") != "job":
            raise WorkflowError(f"{run_dir / workflow_file}: job {shown(job.get('id'))}: "
                                f"type {shown(job.get('type'))} is not supported locally")
        name = job["name"]
        if name not in transformations:
            raise WorkflowError(f"{run_dir / workflow_file}: job {shown(job['id'])} uses transformation {shown(name)}, "
                                f"which is not in {tc_path}")
        uses = job.get("uses", [])
        spec = JobSpec(
            id=job["id"], transformation=name,
            arguments=[str(a) for a in job.get("arguments", [])],
            inputs=sorted(u["lfn"] for u in uses if u.get("type") == "input"),
            outputs=sorted((u["lfn"], bool(u.get("stageOut", True))) for u in uses if u.get("type") == "output"),
            checkpoints=sorted((u["lfn"], bool(u.get("stageOut", True)))
                               for u in uses if u.get("type") == "checkpoint"),
            profiles=_merge_profiles(tc_profiles[name], job.get("profiles")),
            definition={k: v for k, v in job.items() if k != "uses"} | {
                "uses": sorted(uses, key=lambda u: (u.get("type", ""), u["lfn"]))},
        )
        if spec.id in jobs:
            raise WorkflowError(f"{run_dir / workflow_file}: duplicate job id {shown(spec.id)}")
        jobs[spec.id] = spec

    # Dependencies: the explicit ones plus producer -> consumer from the files.
    producers: dict[str, str] = {}
    for spec in jobs.values():
        for lfn, _ in spec.outputs + spec.checkpoints:
            if producers.get(lfn, spec.id) != spec.id:
                raise WorkflowError(f"{run_dir / workflow_file}: {shown(lfn)} is produced by both "
                                    f"{shown(producers[lfn])} and {shown(spec.id)}")
            producers.setdefault(lfn, spec.id)
    for dependency in wf.get("jobDependencies", []):
        parent = dependency["id"]
        for child in dependency.get("children", []):
            if parent not in jobs or child not in jobs:
                raise WorkflowError(f"{run_dir / workflow_file}: dependency {shown(parent)} -> {shown(child)} "
                                    "names an unknown job")
            jobs[child].parents.add(parent)
            jobs[parent].children.add(child)
    for spec in jobs.values():
        for lfn in spec.inputs:
            producer = producers.get(lfn)
            if producer and producer != spec.id:
                spec.parents.add(producer)
                jobs[producer].children.add(spec.id)
            elif producer is None and lfn not in replicas:
                raise WorkflowError(f"job {shown(spec.id)}: input {shown(lfn)} is neither in the replica catalog "
                                    "nor produced by a job")

    return LoadedWorkflow(name=wf.get("name", "workflow"), run_dir=run_dir, jobs=jobs, replicas=replicas,
                          transformations=transformations, properties=properties, output_dir=output_dir,
                          topological_order=_topological_order(jobs), producers=producers)


def _topological_order(jobs: dict[str, JobSpec]) -> list[str]:
    pending = {job_id: len(spec.parents) for job_id, spec in jobs.items()}
    ready = [job_id for job_id, count in pending.items() if count == 0]
    order = []
    while ready:
        job_id = ready.pop(0)
        order.append(job_id)
        for child in sorted(jobs[job_id].children):
            pending[child] -= 1
            if pending[child] == 0:
                ready.append(child)
    if len(order) != len(jobs):
        cycle = sorted(set(jobs) - set(order))
        raise WorkflowError(f"the workflow has a dependency cycle among {len(cycle)} jobs: {shown(cycle)}")
    return order
