"""RUN_DIR/executor_state.json: which jobs earlier runs finished, so that a rerun can skip them.

Like a rescue DAG, but checked: a finished job is reused only while its definition,
its script and its input files from the replica catalog (by content) are unchanged,
all its parents are reused too, the outputs of theirs it read are the ones it read (a
parent rerun by hand in place has made others), and its outputs are still in its scratch
directory.
The run's settings file (experiment_config.yml) is left out of that check: jobs only copy it into their
run records, and every setting that changes a job's work is in its arguments, so a changed setting
reruns the jobs it reaches, not all of them.

A job's checkpoint in its scratch directory belongs to the work it was written for: the job's
signature and the content of every input it read, its parents' outputs too (``checkpoint_key``).
A job about to run whose key has changed since its checkpoint was written (a setting or the data
changed) must not resume from it: the scheduler sets it aside and the job starts afresh.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

from ..atomic import write_json
from ..naming import TENSORBOARD_FOLDER
from ..provenance import EXPERIMENT_CONFIG_FILE, file_sha256
from .loading import JobSpec, LoadedWorkflow
from .progress import JobResult, timestamp

STATE_FILE = "executor_state.json"
STATE_VERSION = 1


def staged_out(spec: JobSpec) -> list[str]:
    """The names of the files the job copies into the output folder."""
    return sorted(lfn for lfn, stage_out in spec.outputs + spec.checkpoints if stage_out)


class ResumeState:
    def __init__(self, workflow: LoadedWorkflow):
        self.wf = workflow
        self.path = workflow.run_dir / STATE_FILE
        # Job threads record results and fill the hash cache while others save the file.
        self._lock = threading.RLock()
        self.data = self._load()

    def _load(self) -> dict:
        if self.path.is_file():
            try:
                state = json.loads(self.path.read_text(encoding="utf-8"))
                if state.get("version") == STATE_VERSION:
                    return state
            except (OSError, json.JSONDecodeError):
                pass
        return {"version": STATE_VERSION, "workflow": self.wf.name, "jobs": {}}

    def save(self) -> None:
        with self._lock:
            write_json(self.path, self.data)

    def signature(self, spec: JobSpec) -> str:
        """What makes a finished job reusable: its definition, its script and its input files' content."""
        digest = hashlib.sha256()
        digest.update(json.dumps(spec.definition, sort_keys=True, default=str).encode())
        script = self.wf.transformations[spec.transformation]
        # Inputs made by other jobs are covered by those jobs' signatures (a rerun parent reruns its children).
        files = [script] + [self.wf.replicas[lfn] for lfn in spec.inputs
                            if lfn in self.wf.replicas and lfn not in self.wf.producers
                            and lfn != EXPERIMENT_CONFIG_FILE]
        for path in files:
            digest.update(f"{path}|{self._content_hash(path)}\n".encode())
        return digest.hexdigest()

    def _made_inputs(self, spec: JobSpec) -> list[bytes]:
        """One line per input made by another job: its name and the content of that job's output."""
        return [f"{lfn}|{self._content_hash(self.wf.job_dir(self.wf.producers[lfn]) / lfn)}\n".encode()
                for lfn in spec.inputs if lfn in self.wf.producers]

    def made_inputs_key(self, spec: JobSpec) -> str:
        """The content of the job's inputs made by other jobs, as it read them: a parent reused but rerun by hand
        in place (docs/troubleshooting.md) has other outputs, and what the job made from the old ones is stale."""
        digest = hashlib.sha256()
        for line in self._made_inputs(spec):
            digest.update(line)
        return digest.hexdigest()

    def checkpoint_key(self, spec: JobSpec) -> str:
        """What a job's checkpoint was written for: its signature and the content of its inputs made by other
        jobs (a parent that reran with other settings may have made other data)."""
        digest = hashlib.sha256(self.signature(spec).encode())
        for line in self._made_inputs(spec):
            digest.update(line)
        return digest.hexdigest()

    def stale_checkpoint(self, spec: JobSpec, key: str) -> bool:
        """True when the job's checkpoint in scratch was written for other work than *key*. A checkpoint with no
        key recorded (a state file from before keys were kept) is trusted, as it was then."""
        with self._lock:
            recorded = self.data.get("checkpoints", {}).get(spec.id)
        return recorded is not None and recorded != key

    def claim_checkpoint(self, spec: JobSpec, key: str) -> None:
        """Record that the job's checkpoint from now on is written for *key*."""
        with self._lock:
            self.data.setdefault("checkpoints", {})[spec.id] = key
        self.save()

    def _content_hash(self, path: Path) -> str:
        """sha256 of a file, cached in the state by (size, mtime) so that reruns hash only what changed."""
        try:
            stat = path.stat()
        except OSError:
            return "missing"
        key = str(path)
        with self._lock:
            cached = self.data.setdefault("file_hashes", {}).get(key)
        if cached and cached[0] == stat.st_size and cached[1] == stat.st_mtime_ns:
            return cached[2]
        digest = file_sha256(path)
        with self._lock:
            self.data["file_hashes"][key] = [stat.st_size, stat.st_mtime_ns, digest]
        return digest

    def reusable(self) -> set[str]:
        """Jobs finished by an earlier run whose definition, inputs and outputs are unchanged."""
        reusable: set[str] = set()
        recorded = self.data.get("jobs", {})
        for job_id in self.wf.topological_order:
            spec = self.wf.jobs[job_id]
            record = recorded.get(job_id)
            if not record or record.get("status") != "succeeded":
                continue
            if record.get("signature") != self.signature(spec):
                continue
            if not all(parent in reusable for parent in spec.parents):
                continue
            # A record from before this key was kept is trusted, as it was then.
            if "made_inputs" in record and record["made_inputs"] != self.made_inputs_key(spec):
                continue
            job_dir = self.wf.job_dir(job_id)
            if not all((job_dir / lfn).is_file() for lfn, _ in spec.outputs):
                continue
            reusable.add(job_id)
        return reusable

    def remove_dropped_outputs(self) -> list[str]:
        """Remove from the output folder what earlier runs' jobs staged out there and no job of this workflow
        stages out (the outputs of a shard, a fold or an HPO job that a rerun with other settings dropped), so
        that the folder never holds two configurations' outputs; forget the jobs no longer in the workflow.
        Returns the names removed. Records from before the staged-out names were kept name none. A job that
        delivered into another folder (sites.yml's local_storage changed since) removes nothing: the files of its
        names here are not its own (another run's outputs, the user's)."""
        kept = {lfn for spec in self.wf.jobs.values() for lfn in staged_out(spec)}
        removed = []
        with self._lock:
            jobs = self.data.setdefault("jobs", {})
            for job_id in list(jobs):
                delivered = jobs[job_id].get("output_dir", str(self.wf.output_dir))
                for lfn in jobs[job_id].get("staged_out", []) if delivered == str(self.wf.output_dir) else []:
                    path = self.wf.output_dir / lfn
                    if lfn not in kept and lfn not in removed and path.is_file():
                        path.unlink()
                        removed.append(lfn)
                        if lfn.startswith(f"{TENSORBOARD_FOLDER}_") and lfn.endswith(".tar"):  # and what it unpacked
                            shutil.rmtree(self.wf.output_dir / TENSORBOARD_FOLDER / lfn[len(TENSORBOARD_FOLDER) + 1:-4],
                                          ignore_errors=True)
                if job_id not in self.wf.jobs:
                    del jobs[job_id]
        self.save()
        return sorted(removed)

    def restore(self, result: JobResult) -> None:
        """Fill in a reused job's result from what the earlier run recorded."""
        record = self.data["jobs"][result.job_id]
        result.status, result.tries = "reused", record.get("tries", 1)
        result.wall_time_s, result.exit_code = record.get("wall_time_s", 0.0), record.get("exit_code", 0)
        result.message = "finished in an earlier run"

    def record(self, spec: JobSpec, result: JobResult) -> None:
        """Remember a finished job (what a rerun may skip), or forget it when it did not succeed."""
        if result.status == "succeeded":
            record = {"status": "succeeded", "signature": self.signature(spec),
                      "made_inputs": self.made_inputs_key(spec), "staged_out": staged_out(spec),
                      "output_dir": str(self.wf.output_dir), "tries": result.tries,
                      "wall_time_s": round(result.wall_time_s, 3), "exit_code": result.exit_code,
                      "finished": timestamp(result.finished)}
            with self._lock:
                self.data.setdefault("jobs", {})[spec.id] = record
        else:
            with self._lock:
                self.data.setdefault("jobs", {}).pop(spec.id, None)
        self.save()
