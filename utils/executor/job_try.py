"""One try of one job: its directory, its process, its logs and its final outputs.

A try runs in RUN_DIR/scratch/<job>: the inputs are linked there by logical file
name (from the replica catalog or from the job that produced them, as Pegasus
stages files flat into a job's directory), the checkpoint is seeded from the
replica catalog the first time and kept afterwards, and stale outputs of an
earlier try are removed. Its stdout and stderr go to RUN_DIR/logs/<job>.out.NNN
and .err.NNN, numbered on after earlier runs' tries; the .out log starts with a
header whose "# rerun by hand:" line is one bash command that runs the same try again. pegasus checkpoint.time /
maxwalltime profiles (minutes) get pegasus-kickstart semantics: SIGTERM at
checkpoint.time so that the job saves its checkpoint, SIGKILL at maxwalltime. A job with neither (all but
train, hpo, predict) is held to its runtime profile (seconds), which on a pool only HTCondor sees (pegasus_job_runtime;
kickstart gets -k 0, never, for such a job): SIGTERM at HUNG_AFTER_RUNTIMES times it,
SIGKILL RUNTIME_KILL_AFTER_S later, so that a hung job cannot stall a local run for ever.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_path
from ..cli import RUN_LOCK_VARIABLE
from .loading import JobSpec, LoadedWorkflow

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # on the jobs' PYTHONPATH: bin/ scripts import utils
TERM_GRACE_S = 10.0  # after SIGTERM, how long a job may take to exit before SIGKILL
# A job without a checkpoint is taken for hung at this many times its runtime profile (itself 3 times the work
# estimated from rates measured on 2 CPU cores): nothing stops it on a pool, and a healthy job stopped here only
# fails again on retry, whereas a late stop of a hung one costs only time; slower machines, jobs sharing few
# cores, or a workflow generated with --gpus run on a CPU need the room.
HUNG_AFTER_RUNTIMES = 3
RUNTIME_KILL_AFTER_S = 300.0  # after the SIGTERM at a job's runtime limit, SIGKILL (GRACE_MIN, as for train)
# RUN_DIR/sites.yml is the generated site catalog: an entry there is never read, and the limits are set at generation
LIFT_LIMITS = ("a `runtimes:` entry in the sites.yml given to workflow.py (--sites-config), then generate again, or "
               "rerun with python -m utils.executor RUN_DIR --no-time-limits")
# Set for every job but without effect on what it does, so the rerun line leaves them out.
COSMETIC_VARIABLES = {"PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
RUN_LOCK_FILE = ".executor.lock"  # in the run folder: scheduler.run_lock
_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class TryOutcome:
    succeeded: bool
    exit_code: int | None
    message: str = ""        # why the try failed
    retryable: bool = True   # False when another try cannot help (no script) or the run is stopping
    wall_time_s: float = 0.0
    log: str = ""            # the stderr log, when the job was started


class JobRunner:
    """Runs tries of the workflow's jobs, one per call, each in its own scratch directory."""

    def __init__(self, workflow: LoadedWorkflow, python: str, stopping: threading.Event, lock: int | None = None,
                 time_limits: bool = True):
        self.wf = workflow
        self.time_limits = time_limits  # False: no job is stopped for its time (--no-time-limits)
        self.python = python
        self.stopping = stopping  # set on SIGINT/SIGTERM: running jobs are stopped
        # The run folder's lock (scheduler.run_lock), inherited by every job: one that outlives a killed executor
        # keeps the folder locked, so that no rerun starts the same job beside it.
        self.lock = lock

    def run_try(self, spec: JobSpec, attempt: int, threads: int) -> TryOutcome:
        """Run try number *attempt* (0-based) of *spec* with *threads* threads; stage out on success."""
        script = self.wf.transformations[spec.transformation]
        if not script.is_file():
            return TryOutcome(False, None, f"script {script} not found", retryable=False)
        job_dir = self.wf.job_dir(spec.id)
        problem = self.prepare(spec, job_dir)
        if problem:
            return TryOutcome(False, None, problem)
        variables = self.job_variables(spec, threads)
        command = self.command(spec)
        number = self.next_log_number(spec.id)
        out_path = self.wf.logs_dir / f"{spec.id}.out.{number:03d}"
        err_path = self.wf.logs_dir / f"{spec.id}.err.{number:03d}"
        began = time.time()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            # The header goes first; the job's stdout is appended after it through the same file.
            out.write(log_header(spec.id, attempt, job_dir, variables, command).encode())
            out.flush()
            process = subprocess.Popen(command, cwd=job_dir, stdout=out, stderr=err,
                                       pass_fds=() if self.lock is None else (self.lock,),
                                       env={**os.environ, **COSMETIC_VARIABLES, "PEGASUS_JOB_ID": spec.id,
                                            **self.lock_variable(), **variables})
            exit_code, reason = self._wait(process, spec)
        ran = {"wall_time_s": time.time() - began, "log": str(err_path)}
        if self.stopping.is_set():
            return TryOutcome(False, exit_code, "interrupted", retryable=False, **ran)
        if exit_code != 0:
            return TryOutcome(False, exit_code, reason or f"{exit_description(exit_code)} (see {err_path})", **ran)
        missing = [lfn for lfn, _ in spec.outputs if not (job_dir / lfn).is_file()]
        if missing:
            return TryOutcome(False, exit_code, f"exit 0 but declared outputs missing: {', '.join(missing[:5])}",
                              **ran)
        self.stage_out(spec)
        return TryOutcome(True, exit_code, **ran)

    def lock_variable(self) -> dict:
        """The run lock handed on to the job (pass_fds), named for its forked helpers to close their copy
        (utils.cli.keep_the_run_lock_from_forked_helpers)."""
        return {} if self.lock is None else {RUN_LOCK_VARIABLE: f"{self.lock}:{self.wf.run_dir / RUN_LOCK_FILE}"}

    def next_log_number(self, job_id: str) -> int:
        """The number of a try's logs: after those of every earlier try, earlier runs' too, so that a rerun
        keeps the record of the tries it resumes from."""
        prefix = f"{job_id}.out."
        taken = [int(path.name[len(prefix):]) for path in self.wf.logs_dir.glob(f"{glob.escape(prefix)}*")
                 if path.name[len(prefix):].isdigit()]
        return max(taken, default=-1) + 1

    def prepare(self, spec: JobSpec, job_dir: Path) -> str | None:
        """Link inputs, seed checkpoints, clear stale outputs. Returns an error message or None."""
        job_dir.mkdir(parents=True, exist_ok=True)
        # An earlier definition's input links go: jobs that read their folder (merge_predictions' parts, the
        # report's run records) would take a dropped shard's files for this run's, as Pegasus never stages them.
        declared = set(spec.inputs)
        for entry in os.scandir(job_dir):
            if entry.is_symlink() and entry.name not in declared:
                os.unlink(entry.path)
        for lfn in spec.inputs:
            producer = self.wf.producers.get(lfn)
            source = (self.wf.job_dir(producer) / lfn) if producer else self.wf.replicas.get(lfn)
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

    def set_aside_checkpoints(self, spec: JobSpec) -> list[str]:
        """Rename the job's checkpoints in its scratch directory to <lfn>.stale (one generation kept), so that the
        next try is seeded with the initial checkpoint. Returns the paths set aside."""
        moved = []
        job_dir = self.wf.job_dir(spec.id)
        for lfn, _ in spec.checkpoints:
            target = job_dir / lfn
            if target.is_file() and target.stat().st_size > 0:
                stale = job_dir / f"{lfn}.stale"
                os.replace(target, stale)
                moved.append(str(stale))
        return moved

    def job_variables(self, spec: JobSpec, threads: int) -> dict[str, str]:
        """The environment variables that change what the job does or whether it can run at all."""
        variables = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                     "PEGASUS_CORES": str(threads),
                     "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
        variables.update({str(k): str(v) for k, v in spec.profiles.get("env", {}).items()})
        return variables

    def command(self, spec: JobSpec) -> list[str]:
        script = self.wf.transformations[spec.transformation]
        if script.suffix == ".py":
            return [self.python, "-u", str(script), *spec.arguments]
        return [str(script), *spec.arguments]

    def _wait(self, process: subprocess.Popen, spec: JobSpec) -> tuple[int, str]:
        """Wait for the job; SIGTERM at checkpoint.time (else at its runtime), SIGKILL at maxwalltime (else
        RUNTIME_KILL_AFTER_S after its runtime) or on interrupt."""
        checkpoint_s = (spec.profile_number("pegasus", "checkpoint.time") or 0) * 60 or None
        walltime_s = (spec.profile_number("pegasus", "maxwalltime") or 0) * 60 or None
        runtime = None if checkpoint_s or walltime_s else spec.profile_number("pegasus", "runtime") or None
        runtime_s = runtime * HUNG_AFTER_RUNTIMES if runtime else None
        if runtime_s:  # no checkpoint to save: the SIGTERM lets it stop cleanly (a partial set removed, progress kept)
            checkpoint_s, walltime_s = runtime_s, runtime_s + RUNTIME_KILL_AFTER_S
        if not self.time_limits:
            checkpoint_s = walltime_s = None
        began = time.monotonic()
        reason, termed = "", False
        while True:
            now = time.monotonic() - began
            deadlines = [d for d in (checkpoint_s if not termed else None, walltime_s) if d]
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            if self.stopping.is_set():
                timeout = TERM_GRACE_S
            try:  # at least once a second, so that an interrupt is seen while the job runs
                return process.wait(timeout=1.0 if timeout is None else min(timeout, 1.0)), reason
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
                if runtime_s:
                    return process.wait(), (f"killed {RUNTIME_KILL_AFTER_S:g} s after its time limit ({runtime_s:g} s, "
                                            f"{HUNG_AFTER_RUNTIMES} times the runtime profile), SIGTERM not heeded; "
                                            f"to lift it: {LIFT_LIMITS}")
                return process.wait(), f"killed at maxwalltime ({walltime_s / 60:g} min)"
            if checkpoint_s and not termed and now >= checkpoint_s:
                process.terminate()
                termed = True
                reason = (f"stopped (SIGTERM) at its time limit ({runtime_s:g} s, {HUNG_AFTER_RUNTIMES} times the "
                          "runtime profile: a hung job "
                          f"would stall the run for ever); to lift it: {LIFT_LIMITS}" if runtime_s else
                          f"sent SIGTERM at checkpoint.time ({checkpoint_s / 60:g} min) to save a checkpoint")

    def stage_out(self, spec: JobSpec) -> None:
        """Copy the job's final outputs (stageOut) into the output folder, each atomically."""
        job_dir = self.wf.job_dir(spec.id)
        for lfn, stage_out in spec.outputs + spec.checkpoints:
            source = job_dir / lfn
            if stage_out and source.is_file():
                with atomic_path(self.wf.output_dir / lfn) as tmp:
                    shutil.copyfile(source, tmp)


def exit_description(exit_code: int) -> str:
    """"exit code 3", or for a process killed by a signal (Popen's negative code) "killed by SIGKILL"."""
    if exit_code >= 0:
        return f"exit code {exit_code}"
    try:
        return f"killed by {signal.Signals(-exit_code).name}"
    except ValueError:
        return f"killed by signal {-exit_code}"


def rerun_line(job_dir: Path, variables: dict[str, str], command: list[str]) -> str:
    """One bash line that reruns a job by hand: cd into its directory, set its variables, run it."""
    assignments = [f"{name}={shlex.quote(value)}" for name, value in variables.items()]
    # A profile may name a variable bash cannot assign in front of a command; env(1) can.
    launcher = [] if all(_SHELL_NAME.fullmatch(name) for name in variables) else ["env"]
    return f"cd {shlex.quote(str(job_dir))} && " + " ".join([*launcher, *assignments, shlex.join(command)])


def log_header(job_id: str, attempt: int, job_dir: Path, variables: dict[str, str], command: list[str]) -> str:
    """The top of a try's stdout log; every line but the rerun command is a shell comment."""
    return (f"# job {job_id}, try {attempt + 1}\n"
            f"# working directory: {job_dir}\n"
            f"# rerun by hand:\n"
            f"{rerun_line(job_dir, variables, command)}\n"
            f"# job output:\n")
