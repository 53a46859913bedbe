"""Local executor: runs a generated Pegasus workflow (workflow.yml + catalogs) on this machine.

It reads what workflow.py wrote into a run directory (workflow.yml, replicas.yml,
transformations.yml, pegasus.properties) and runs the DAG the way Pegasus and
DAGMan would, without HTCondor:

- each job's transformation resolves to its bin/ script, run with this Python;
- each job runs in RUN_DIR/scratch/<job>, where its inputs are linked by logical
  file name, from the replica catalog or from the job that produced them (Pegasus
  stages files flat into the job's directory the same way);
- up to --jobs jobs at once, in dependency order, longest remaining path first;
- stdout and stderr per try in RUN_DIR/logs/<job>.out.NNN / .err.NNN;
- a failed job is retried as dagman.retry says (a dagman "retry" profile wins);
  checkpoint files stay in the job's directory between tries and across reruns;
- pegasus checkpoint.time / maxwalltime profiles: SIGTERM at checkpoint.time, so
  the job saves its checkpoint, SIGKILL at maxwalltime (pegasus-kickstart semantics);
- when a job fails for good its dependents are skipped and everything else runs;
- each final output (stageOut) is copied atomically to the output folder as soon
  as its job succeeds;
- completed jobs are recorded in RUN_DIR/executor_state.json; a rerun skips them
  (like a rescue DAG) unless the job, its script or its input files changed;
- a live status line (on a terminal; plain periodic lines otherwise) and, at the
  end, statistics.txt / statistics.json in the spirit of pegasus-statistics.

    python -m utils.pegasus.executor RUN_DIR [--jobs N]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import yaml

from ..atomic import atomic_path, write_json, write_text
from ..provenance import file_sha256

STATE_FILE = "executor_state.json"
STATE_VERSION = 1
TERM_GRACE_S = 10.0  # after SIGTERM, how long a job may take to exit before SIGKILL


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


@dataclass
class JobResult:
    job_id: str
    status: str = "pending"   # succeeded | failed | skipped | reused | interrupted
    tries: int = 0
    wall_time_s: float = 0.0
    exit_code: int | None = None
    started: float | None = None
    finished: float | None = None
    message: str = ""
    log: str = ""


# -- reading the run directory -----------------------------------------------

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
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
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
            raise WorkflowError(f"{tc_path}: transformation {transformation.get('name')} has no site")
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
            raise WorkflowError(f"{run_dir / workflow_file}: job {job.get('id')}: "
                                f"type {job.get('type')} is not supported locally")
        name = job["name"]
        if name not in transformations:
            raise WorkflowError(f"{run_dir / workflow_file}: job {job['id']} uses transformation {name!r}, "
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
            raise WorkflowError(f"{run_dir / workflow_file}: duplicate job id {spec.id}")
        jobs[spec.id] = spec

    # Dependencies: the explicit ones plus producer -> consumer from the files.
    producers: dict[str, str] = {}
    for spec in jobs.values():
        for lfn, _ in spec.outputs + spec.checkpoints:
            if producers.get(lfn, spec.id) != spec.id:
                raise WorkflowError(f"{run_dir / workflow_file}: {lfn} is produced by both "
                                    f"{producers[lfn]} and {spec.id}")
            producers.setdefault(lfn, spec.id)
    for dependency in wf.get("jobDependencies", []):
        parent = dependency["id"]
        for child in dependency.get("children", []):
            if parent not in jobs or child not in jobs:
                raise WorkflowError(f"{run_dir / workflow_file}: dependency {parent} -> {child} names an unknown job")
            jobs[child].parents.add(parent)
            jobs[parent].children.add(child)
    for spec in jobs.values():
        for lfn in spec.inputs:
            producer = producers.get(lfn)
            if producer and producer != spec.id:
                spec.parents.add(producer)
                jobs[producer].children.add(spec.id)
            elif producer is None and lfn not in replicas:
                raise WorkflowError(f"job {spec.id}: input {lfn} is neither in the replica catalog "
                                    "nor produced by a job")

    return LoadedWorkflow(name=wf.get("name", "workflow"), run_dir=run_dir, jobs=jobs, replicas=replicas,
                          transformations=transformations, properties=properties, output_dir=output_dir,
                          topological_order=_topological_order(jobs))


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
        raise WorkflowError(f"the workflow has a dependency cycle among: {', '.join(cycle)}")
    return order


# -- the executor ------------------------------------------------------------

def _seconds(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Executor:
    def __init__(self, workflow: LoadedWorkflow, jobs: int = 2, retries: int | None = None,
                 status_interval: float | None = None, out=None, python: str = sys.executable,
                 cpu_count: int | None = None):
        self.wf = workflow
        self.run_dir = workflow.run_dir
        self.slots = max(1, int(jobs))
        self.default_retries = retries if retries is not None else int(workflow.properties.get("dagman.retry", 0) or 0)
        self.out = out or sys.stdout
        self.is_tty = hasattr(self.out, "isatty") and self.out.isatty()
        self.status_interval = status_interval if status_interval is not None else (0.5 if self.is_tty else 30.0)
        self.python = python
        if cpu_count is None:
            cpu_count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.cpu_count = max(1, cpu_count or 1)
        self.scratch = self.run_dir / "scratch"
        self.logs = self.run_dir / "logs"
        self.output_dir = workflow.output_dir
        self.results: dict[str, JobResult] = {job_id: JobResult(job_id) for job_id in workflow.jobs}
        self.events: queue.Queue = queue.Queue()
        self.lock = threading.RLock()
        self.running: dict[str, subprocess.Popen | None] = {}
        self.stopping = threading.Event()
        self.state = self._load_state()
        self.priority = self._bottom_levels()
        self._status_width = 0

    # -- state (rescue) ----------------------------------------------------
    def _state_path(self) -> Path:
        return self.run_dir / STATE_FILE

    def _load_state(self) -> dict:
        path = self._state_path()
        if path.is_file():
            try:
                state = json.loads(path.read_text(encoding="utf-8"))
                if state.get("version") == STATE_VERSION:
                    return state
            except (OSError, json.JSONDecodeError):
                pass
        return {"version": STATE_VERSION, "workflow": self.wf.name, "jobs": {}}

    def _save_state(self) -> None:
        with self.lock:
            write_json(self._state_path(), self.state)

    def signature(self, spec: JobSpec) -> str:
        """What makes a finished job reusable: its definition, its script and its input files' content."""
        digest = hashlib.sha256()
        digest.update(json.dumps(spec.definition, sort_keys=True, default=str).encode())
        script = self.wf.transformations[spec.transformation]
        files = [script] + [self.wf.replicas[lfn] for lfn in spec.inputs
                            if lfn in self.wf.replicas and not self._producer(lfn)]
        for path in files:
            digest.update(f"{path}|{self._content_hash(path)}\n".encode())
        return digest.hexdigest()

    def _content_hash(self, path: Path) -> str:
        """sha256 of a file, cached in the state by (size, mtime) so that reruns hash only what changed."""
        try:
            stat = path.stat()
        except OSError:
            return "missing"
        key = str(path)
        cache = self.state.setdefault("file_hashes", {})
        cached = cache.get(key)
        if cached and cached[0] == stat.st_size and cached[1] == stat.st_mtime_ns:
            return cached[2]
        digest = file_sha256(path)
        with self.lock:
            cache[key] = [stat.st_size, stat.st_mtime_ns, digest]
        return digest

    def _producer(self, lfn: str) -> str | None:
        return self._producers.get(lfn)

    @property
    def _producers(self) -> dict[str, str]:
        if not hasattr(self, "_producer_map"):
            self._producer_map = {}
            for spec in self.wf.jobs.values():
                for lfn, _ in spec.outputs + spec.checkpoints:
                    self._producer_map.setdefault(lfn, spec.id)
        return self._producer_map

    def _reusable(self) -> set[str]:
        """Jobs finished by an earlier run whose definition, inputs and outputs are unchanged."""
        reusable: set[str] = set()
        recorded = self.state.get("jobs", {})
        for job_id in self.wf.topological_order:
            spec = self.wf.jobs[job_id]
            record = recorded.get(job_id)
            if not record or record.get("status") != "succeeded":
                continue
            if record.get("signature") != self.signature(spec):
                continue
            if not all(parent in reusable for parent in spec.parents):
                continue
            job_dir = self.scratch / job_id
            if not all((job_dir / lfn).is_file() for lfn, _ in spec.outputs):
                continue
            reusable.add(job_id)
        return reusable

    # -- scheduling --------------------------------------------------------
    def _bottom_levels(self) -> dict[str, float]:
        """Longest path (expected runtime) from each job to the end: run the critical path first."""
        levels: dict[str, float] = {}
        for job_id in reversed(self.wf.topological_order):
            spec = self.wf.jobs[job_id]
            runtime = _seconds(spec.profile("pegasus", "runtime")) or 1.0
            levels[job_id] = runtime + max((levels[c] for c in spec.children), default=0.0)
        return levels

    def run(self) -> int:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        reusable = self._reusable()
        for job_id in reusable:
            record = self.state["jobs"][job_id]
            result = self.results[job_id]
            result.status, result.tries = "reused", record.get("tries", 1)
            result.wall_time_s, result.exit_code = record.get("wall_time_s", 0.0), record.get("exit_code", 0)
            result.message = "finished in an earlier run"
            self._stage_out(self.wf.jobs[job_id])  # outputs/ may have been cleaned since
        if reusable:
            self._print(f"Resuming: {len(reusable)} of {len(self.wf.jobs)} jobs finished in an earlier run "
                        f"({', '.join(sorted(reusable))})")
        self._print(f"Running {len(self.wf.jobs) - len(reusable)} jobs of workflow {self.wf.name} "
                    f"with up to {self.slots} at once (retries: {self.default_retries}); logs in {self.logs}")

        done = {job_id for job_id in reusable}
        blocked: set[str] = set()
        previous_handlers = self._install_signal_handlers()
        last_status = 0.0
        try:
            while True:
                ready = [job_id for job_id in self.wf.topological_order
                         if self.results[job_id].status == "pending" and job_id not in self.running
                         and all(self.results[p].status in ("succeeded", "reused")
                                 for p in self.wf.jobs[job_id].parents)]
                ready.sort(key=lambda j: -self.priority[j])
                free = self.slots - len(self.running)
                if not self.stopping.is_set() and free > 0 and ready:
                    batch = ready[:free]
                    threads = max(1, self.cpu_count // (len(self.running) + len(batch)))
                    for job_id in batch:
                        self._launch(job_id, threads)
                if not self.running:
                    break
                try:
                    job_id = self.events.get(timeout=self.status_interval)
                except queue.Empty:
                    job_id = None
                if job_id is not None:
                    self.running.pop(job_id, None)
                    result = self.results[job_id]
                    done.add(job_id)
                    if result.status == "failed":
                        skipped = self._skip_descendants(job_id)
                        blocked |= skipped
                    self._report_job(job_id, result)
                now = time.time()
                if now - last_status >= self.status_interval:
                    self._status_line()
                    last_status = now
        finally:
            self._restore_signal_handlers(previous_handlers)
            self._clear_status()
        self.finished = time.time()
        for job_id, result in self.results.items():
            if result.status == "pending":
                result.status = "interrupted" if self.stopping.is_set() else "skipped"
        stats = self.statistics()
        self._write_statistics(stats)
        self._print(self._summary_line(stats))
        self._print(f"Statistics: {self.run_dir / 'statistics.txt'}")
        if self.stopping.is_set():
            return 130
        return 0 if all(r.status in ("succeeded", "reused") for r in self.results.values()) else 1

    def _launch(self, job_id: str, threads: int) -> None:
        self.running[job_id] = None
        result = self.results[job_id]
        result.status = "running"
        result.started = time.time()
        thread = threading.Thread(target=self._run_job, args=(job_id, threads), name=f"job-{job_id}",
                                  daemon=True)
        thread.start()
        self._print(f"[{_format_duration(time.time() - self.started):>6}] start  {job_id}")

    def _skip_descendants(self, job_id: str) -> set[str]:
        skipped, stack = set(), list(self.wf.jobs[job_id].children)
        while stack:
            child = stack.pop()
            if child in skipped:
                continue
            skipped.add(child)
            result = self.results[child]
            if result.status == "pending":
                result.status = "skipped"
                result.message = f"depends on failed job {job_id}"
            stack.extend(self.wf.jobs[child].children)
        return skipped

    # -- one job -------------------------------------------------------------
    def _retries(self, spec: JobSpec) -> int:
        value = spec.profile("dagman", "RETRY", spec.profile("dagman", "retry"))
        try:
            return int(value) if value is not None else self.default_retries
        except ValueError:
            return self.default_retries

    def _prepare(self, spec: JobSpec, job_dir: Path) -> str | None:
        """Link inputs, seed checkpoints, clear stale outputs. Returns an error message or None."""
        job_dir.mkdir(parents=True, exist_ok=True)
        for lfn in spec.inputs:
            producer = self._producer(lfn)
            source = (self.scratch / producer / lfn) if producer else self.wf.replicas.get(lfn)
            if source is None or not source.exists():
                return f"input {lfn} not found at {source}"
            target = job_dir / lfn
            if target.is_symlink() or target.exists():
                if target.is_symlink() and os.readlink(target) == str(source):
                    continue
                target.unlink()
            os.symlink(source, target)
        for lfn, _ in spec.checkpoints:
            target = job_dir / lfn
            initial = self.wf.replicas.get(lfn)
            # First try: the initial checkpoint from the replica catalog (an empty file, which
            # the jobs read as "no checkpoint yet"), as Pegasus stages it in with condorio.
            # A copy, never a link: the job rewrites its checkpoint.
            if not target.exists() and initial is not None and initial.is_file():
                shutil.copyfile(initial, target)
        for lfn, _ in spec.outputs:
            with contextlib.suppress(FileNotFoundError):
                (job_dir / lfn).unlink()
        return None

    def _environment(self, spec: JobSpec, threads: int) -> dict[str, str]:
        env = dict(os.environ)
        cores = _seconds(spec.profile("pegasus", "cores"))
        threads = max(1, min(threads, int(cores) if cores else threads))
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                    "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg",
                    "PEGASUS_JOB_ID": spec.id, "PEGASUS_CORES": str(threads)})
        project_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [project_root, env.get("PYTHONPATH")]))
        env.update({str(k): str(v) for k, v in spec.profiles.get("env", {}).items()})
        return env

    def _command(self, spec: JobSpec) -> list[str]:
        script = self.wf.transformations[spec.transformation]
        if script.suffix == ".py":
            return [self.python, "-u", str(script), *spec.arguments]
        return [str(script), *spec.arguments]

    def _run_job(self, job_id: str, threads: int) -> None:
        spec = self.wf.jobs[job_id]
        result = self.results[job_id]
        job_dir = self.scratch / job_id
        tries_allowed = 1 + max(0, self._retries(spec))
        checkpoint_s = (_seconds(spec.profile("pegasus", "checkpoint.time")) or 0) * 60 or None
        walltime_s = (_seconds(spec.profile("pegasus", "maxwalltime")) or 0) * 60 or None
        try:
            script = self.wf.transformations[spec.transformation]
            while result.tries < tries_allowed and not self.stopping.is_set():
                attempt = result.tries
                result.tries += 1
                if not script.is_file():
                    result.exit_code, result.message = None, f"script {script} not found"
                    break
                problem = self._prepare(spec, job_dir)
                if problem:
                    result.exit_code, result.message = None, problem
                    continue
                out_path = self.logs / f"{job_id}.out.{attempt:03d}"
                err_path = self.logs / f"{job_id}.err.{attempt:03d}"
                result.log = str(err_path)
                began = time.time()
                with open(out_path, "wb") as out, open(err_path, "wb") as err:
                    process = subprocess.Popen(self._command(spec), cwd=job_dir, stdout=out, stderr=err,
                                               env=self._environment(spec, threads))
                    with self.lock:
                        self.running[job_id] = process
                    exit_code, reason = self._wait(process, checkpoint_s, walltime_s)
                result.wall_time_s += time.time() - began
                result.exit_code = exit_code
                if self.stopping.is_set():
                    result.message = "interrupted"
                    break
                if exit_code != 0:
                    result.message = reason or f"exit code {exit_code} (see {err_path})"
                    if result.tries < tries_allowed:
                        self._print(f"[{_format_duration(time.time() - self.started):>6}] retry  {job_id}: "
                                    f"{result.message}; try {result.tries + 1} of {tries_allowed}")
                    continue
                missing = [lfn for lfn, _ in spec.outputs if not (job_dir / lfn).is_file()]
                if missing:
                    result.message = f"exit 0 but declared outputs missing: {', '.join(missing[:5])}"
                    result.exit_code = exit_code
                    continue
                self._stage_out(spec)
                result.status, result.message = "succeeded", ""
                break
            if result.status != "succeeded":
                result.status = "interrupted" if self.stopping.is_set() else "failed"
        except Exception as error:  # a bug or an OS error must not hang the scheduler
            result.status, result.message = "failed", f"executor error: {error!r}"
        finally:
            result.finished = time.time()
            try:
                self._record(spec, result)
            except Exception as error:  # the scheduler must hear about the job whatever happens
                result.status, result.message = "failed", f"executor error recording the job: {error!r}"
            self.events.put(job_id)

    def _record(self, spec: JobSpec, result: JobResult) -> None:
        """Remember a finished job in the state file (what a rerun may skip)."""
        jobs = self.state.setdefault("jobs", {})
        if result.status == "succeeded":
            record = {"status": "succeeded", "signature": self.signature(spec), "tries": result.tries,
                      "wall_time_s": round(result.wall_time_s, 3), "exit_code": result.exit_code,
                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(result.finished))}
            with self.lock:
                jobs[spec.id] = record
        else:
            with self.lock:
                jobs.pop(spec.id, None)
        self._save_state()

    def _wait(self, process: subprocess.Popen, checkpoint_s, walltime_s) -> tuple[int, str]:
        """Wait for the job; SIGTERM at checkpoint.time, SIGKILL at maxwalltime or on interrupt."""
        began = time.monotonic()
        reason, termed = "", False
        while True:
            now = time.monotonic() - began
            deadlines = [d for d in (checkpoint_s if not termed else None, walltime_s) if d]
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            if self.stopping.is_set():
                timeout = TERM_GRACE_S
            try:
                return process.wait(timeout=timeout if timeout is None else min(timeout, 1.0)), reason
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic() - began
            if self.stopping.is_set():
                process.terminate()
                try:
                    return process.wait(timeout=TERM_GRACE_S), "interrupted"
                except subprocess.TimeoutExpired:
                    process.kill()
                    return process.wait(), "interrupted"
            if walltime_s and now >= walltime_s:
                process.kill()
                return process.wait(), f"killed at maxwalltime ({walltime_s / 60:g} min)"
            if checkpoint_s and not termed and now >= checkpoint_s:
                process.terminate()
                termed = True
                reason = f"sent SIGTERM at checkpoint.time ({checkpoint_s / 60:g} min) to save a checkpoint"

    def _stage_out(self, spec: JobSpec) -> None:
        """Copy the job's final outputs (stageOut) into the output folder, each atomically."""
        job_dir = self.scratch / spec.id
        for lfn, stage_out in spec.outputs + spec.checkpoints:
            source = job_dir / lfn
            if stage_out and source.is_file():
                with atomic_path(self.output_dir / lfn) as tmp:
                    shutil.copyfile(source, tmp)

    # -- interrupts --------------------------------------------------------
    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return None

        def stop(signum, _frame):
            if not self.stopping.is_set():
                self._print(f"\nReceived {signal.Signals(signum).name}: stopping the running jobs "
                            "(rerun to resume)")
            self.stopping.set()

        return {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}

    @staticmethod
    def _restore_signal_handlers(previous) -> None:
        for sig, handler in (previous or {}).items():
            signal.signal(sig, handler)

    # -- reporting ---------------------------------------------------------
    def _print(self, message: str) -> None:
        self._clear_status()
        print(message, file=self.out, flush=True)

    def _clear_status(self) -> None:
        if self.is_tty and self._status_width:
            self.out.write("\r" + " " * self._status_width + "\r")
            self.out.flush()
            self._status_width = 0

    def _status_line(self) -> None:
        counts = {}
        for result in self.results.values():
            counts[result.status] = counts.get(result.status, 0) + 1
        finished = counts.get("succeeded", 0) + counts.get("reused", 0)
        now = time.time()
        running = ", ".join(f"{job_id} {_format_duration(now - (self.results[job_id].started or now))}"
                            for job_id in sorted(self.running))
        line = (f"[{_format_duration(now - self.started):>6}] {finished}/{len(self.results)} done, "
                f"{counts.get('failed', 0)} failed, {counts.get('skipped', 0)} skipped; running: {running or '-'}")
        if self.is_tty:
            width = shutil.get_terminal_size((120, 20)).columns - 1
            line = line[:width]
            self.out.write("\r" + line.ljust(self._status_width))
            self.out.flush()
            self._status_width = len(line)
        else:
            print(line, file=self.out, flush=True)

    def _report_job(self, job_id: str, result: JobResult) -> None:
        elapsed = _format_duration(time.time() - self.started)
        if result.status == "succeeded":
            extra = f" after {result.tries} tries" if result.tries > 1 else ""
            self._print(f"[{elapsed:>6}] done   {job_id} in {_format_duration(result.wall_time_s)}{extra}")
        elif result.status == "failed":
            skipped = sorted(j for j, r in self.results.items() if r.status == "skipped"
                             and r.message.endswith(f" {job_id}"))
            self._print(f"[{elapsed:>6}] FAILED {job_id} after {result.tries} tries: {result.message}"
                        + (f"; skipping {', '.join(skipped)}" if skipped else ""))

    def critical_path(self) -> tuple[list[str], float]:
        """The chain of jobs with the largest summed wall time in this run (reused jobs count 0)."""
        best: dict[str, tuple[float, str | None]] = {}
        for job_id in self.wf.topological_order:
            result = self.results[job_id]
            own = result.wall_time_s if result.status not in ("reused", "skipped", "pending") else 0.0
            parent = max(self.wf.jobs[job_id].parents, key=lambda p: best[p][0], default=None)
            best[job_id] = (own + (best[parent][0] if parent else 0.0), parent)
        if not best:
            return [], 0.0
        end = max(best, key=lambda j: best[j][0])
        total, path, node = best[end][0], [], end
        while node is not None:
            path.append(node)
            node = best[node][1]
        return path[::-1], total

    def statistics(self) -> dict:
        path, path_time = self.critical_path()
        wall = self.finished - self.started
        results = list(self.results.values())
        ran = [r for r in results if r.status not in ("reused",)]
        jobs = []
        for job_id in self.wf.topological_order:
            r = self.results[job_id]
            jobs.append({"id": job_id, "transformation": self.wf.jobs[job_id].transformation, "status": r.status,
                         "tries": r.tries, "wall_time_s": round(r.wall_time_s, 3), "exit_code": r.exit_code,
                         "message": r.message, "log": r.log})
        count = lambda status: sum(1 for r in results if r.status == status)  # noqa: E731
        return {
            "workflow": self.wf.name,
            "run_dir": str(self.run_dir),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "wall_time_s": round(wall, 3),
            "slots": self.slots,
            "totals": {
                "jobs": len(results), "succeeded": count("succeeded"), "failed": count("failed"),
                "skipped": count("skipped"), "reused": count("reused"), "interrupted": count("interrupted"),
                "tries": sum(r.tries for r in ran), "retries": sum(max(0, r.tries - 1) for r in ran),
                "cumulative_job_wall_time_s": round(sum(r.wall_time_s for r in ran), 3),
            },
            "critical_path": {"jobs": path, "job_time_s": round(path_time, 3),
                              "wall_over_critical_path": round(wall / path_time, 4) if path_time > 0 else None},
            "jobs": jobs,
        }

    def _summary_line(self, stats: dict) -> str:
        t = stats["totals"]
        parts = [f"{t['succeeded']} succeeded"]
        for key in ("reused", "failed", "skipped", "interrupted"):
            if t[key]:
                parts.append(f"{t[key]} {key}")
        return (f"Workflow {stats['workflow']}: {', '.join(parts)} of {t['jobs']} jobs in "
                f"{_format_duration(stats['wall_time_s'])} ({t['retries']} retries)")

    def _write_statistics(self, stats: dict) -> None:
        t, cp = stats["totals"], stats["critical_path"]
        lines = [
            f"Workflow statistics: {stats['workflow']}  ({stats['run_dir']})",
            f"Started {stats['started']}, up to {stats['slots']} jobs at once",
            "",
            f"{'Type':<8}{'Succeeded':>10}{'Failed':>8}{'Skipped':>9}{'Reused':>8}{'Total':>7}"
            f"{'Tries':>7}{'Retries':>9}",
            f"{'Jobs':<8}{t['succeeded']:>10}{t['failed']:>8}{t['skipped'] + t['interrupted']:>9}"
            f"{t['reused']:>8}{t['jobs']:>7}{t['tries']:>7}{t['retries']:>9}",
            "",
            f"Workflow wall time:        {_format_duration(stats['wall_time_s'])} ({stats['wall_time_s']:.1f} s)",
            f"Cumulative job wall time:  {_format_duration(t['cumulative_job_wall_time_s'])} "
            f"({t['cumulative_job_wall_time_s']:.1f} s)",
            f"Critical path job time:    {_format_duration(cp['job_time_s'])} ({cp['job_time_s']:.1f} s): "
            + " -> ".join(cp["jobs"]),
        ]
        if cp["wall_over_critical_path"]:
            lines.append(f"Wall time / critical path: {cp['wall_over_critical_path']:.3f}")
        lines += ["", f"{'Job':<26}{'Transformation':<25}{'Status':<12}{'Tries':>6}{'Wall time':>11}{'Exit':>6}  Note"]
        for job in stats["jobs"]:
            exit_code = "-" if job["exit_code"] is None else str(job["exit_code"])
            lines.append(f"{job['id']:<26}{job['transformation']:<25}{job['status']:<12}{job['tries']:>6}"
                         f"{job['wall_time_s']:>10.1f}s{exit_code:>6}  {job['message']}")
        write_text(self.run_dir / "statistics.txt", "\n".join(lines) + "\n")
        write_json(self.run_dir / "statistics.json", stats)


@contextlib.contextmanager
def _run_lock(run_dir: Path):
    """One executor per run directory at a time."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".executor.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkflowError(f"{run_dir}: another executor is running this workflow") from None
        yield


def run_workflow(run_dir, jobs: int = 2, retries: int | None = None, out=None,
                 status_interval: float | None = None) -> int:
    """Run (or resume) the workflow in *run_dir*. Returns 0 when every job succeeded."""
    run_dir = Path(run_dir).resolve()
    try:
        with _run_lock(run_dir):
            workflow = load_workflow(run_dir)
            return Executor(workflow, jobs=jobs, retries=retries, out=out,
                            status_interval=status_interval).run()
    except WorkflowError as error:
        print(f"executor: {error}", file=sys.stderr)
        return 2


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="run directory written by workflow.py")
    parser.add_argument("--jobs", type=int, default=2, help="jobs at once")
    parser.add_argument("--retries", type=int, default=None, help="override dagman.retry from pegasus.properties")
    parser.add_argument("--status-interval", type=float, default=None,
                        help="seconds between status lines (default: 0.5 on a terminal, 30 otherwise)")
    return parser


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    return run_workflow(args.run_dir, jobs=args.jobs, retries=args.retries, status_interval=args.status_interval)


if __name__ == "__main__":
    sys.exit(main())
