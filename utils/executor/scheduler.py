"""Local executor: runs a generated Pegasus workflow (workflow.yml + catalogs) on this machine.

It reads what workflow.py wrote into a run directory (workflow.yml, replicas.yml,
transformations.yml, pegasus.properties) and runs the DAG the way Pegasus and
DAGMan would, without HTCondor:

- each job's transformation resolves to its bin/ script, run with this Python;
- each job runs in RUN_DIR/scratch/<job>, where its inputs are linked by logical
  file name, from the replica catalog or from the job that produced them (Pegasus
  stages files flat into the job's directory the same way);
- up to --jobs jobs at once, in dependency order, longest remaining path first;
- each job computes with the cores its pegasus cores profile asks for (at most this machine's; 1
  without one) and the jobs running at once ask for no more cores than the machine has, as
  HTCondor's request_cpus would: a job's thread count, and so its numbers, never depend on which
  jobs happened to run beside it (on a CPU the same seed gives the same bits only at one count);
- stdout and stderr per try in RUN_DIR/logs/<job>.out.NNN / .err.NNN; the .out log
  starts with a header whose line after "# rerun by hand:" reruns that try from bash
  (cd into its directory, the thread counts, PYTHONPATH and env profiles, the command);
- a failed job is retried as dagman.retry says (a dagman "retry" profile wins);
  checkpoint files stay in the job's directory between tries and across reruns;
- pegasus checkpoint.time / maxwalltime profiles: SIGTERM at checkpoint.time, so
  the job saves its checkpoint, SIGKILL at maxwalltime (pegasus-kickstart semantics);
  a job with neither is stopped at 3 times its runtime profile (seconds; job_try.HUNG_AFTER_RUNTIMES)
  the same way, so that a hung job cannot stall the run (--no-time-limits: no job is stopped for its time);
- when a job fails for good its dependents are skipped and everything else runs;
- each final output (stageOut) is copied atomically to the output folder as soon
  as its job succeeds; at the end the TensorBoard archives among them
  (tensorboard_*.tar, members tensorboard/<job>/...) are unpacked there, so that
  ``tensorboard --logdir RUN_DIR/outputs/tensorboard`` shows train and every hpo job;
- completed jobs are recorded in RUN_DIR/executor_state.json; a rerun skips them
  (like a rescue DAG) unless the job, its script or its input files changed;
- a live status line (on a terminal; plain periodic lines otherwise) and, at the
  end, statistics.txt / statistics.json in the spirit of pegasus-statistics.

    python -m utils.executor RUN_DIR [--jobs N]

This module schedules; loading.py reads the run directory, job_try.py runs one try
of a job, resume_state.py keeps executor_state.json, progress.py prints and writes
the statistics.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import queue
import shutil
import signal
import sys
import tarfile
import threading
import time
from pathlib import Path

from .. import defaults as D
from ..cli import error_message, non_negative_int, positive_float, positive_int
from ..naming import TENSORBOARD_FOLDER
from .job_try import RUN_LOCK_FILE, JobRunner
from .loading import LoadedWorkflow, WorkflowError, load_workflow, read_properties
from .progress import JobResult, Reporter
from .resume_state import ResumeState

# The package (utils/executor/__init__.py) re-exports these for workflow.py, the tests and bench/.
__all__ = ["Executor", "WorkflowError", "get_args_parser", "load_workflow", "main", "read_properties",
           "run_lock", "run_workflow"]


class Executor:
    """Schedules the jobs of a loaded workflow onto up to *jobs* slots and sees the run through."""

    def __init__(self, workflow: LoadedWorkflow, jobs: int = D.EXECUTOR_JOBS, retries: int | None = None,
                 status_interval: float | None = None, out=None, python: str = sys.executable,
                 cpu_count: int | None = None, lock: int | None = None, time_limits: bool = True):
        self.wf = workflow
        self.slots = max(1, int(jobs))
        self.default_retries = retries if retries is not None else int(workflow.properties.get("dagman.retry", 0) or 0)
        if cpu_count is None:
            cpu_count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.cpu_count = max(1, cpu_count or 1)
        self.results: dict[str, JobResult] = {job_id: JobResult(job_id) for job_id in workflow.jobs}
        self.report = Reporter(workflow, self.results, out)
        self.status_interval = status_interval if status_interval is not None else (
            0.5 if self.report.is_tty else 30.0)
        self.events: queue.Queue = queue.Queue()  # ids of jobs whose thread has finished
        self.running: set[str] = set()            # touched by the scheduling thread only
        self.threads: dict[str, threading.Thread] = {}  # each job's last try's thread
        self.stopping = threading.Event()
        self.state = ResumeState(workflow)
        self.runner = JobRunner(workflow, python, self.stopping, lock, time_limits)
        self.priority = self._bottom_levels()
        self.cores = {job_id: self._cores(spec) for job_id, spec in workflow.jobs.items()}

    def _cores(self, spec) -> int:
        """The cores (torch threads) a job runs with: its pegasus cores profile, at most this machine's."""
        cores = spec.profile_number("pegasus", "cores")
        return max(1, min(self.cpu_count, int(cores) if cores else 1))

    def _bottom_levels(self) -> dict[str, float]:
        """Longest path (expected runtime) from each job to the end: run the critical path first."""
        levels: dict[str, float] = {}
        for job_id in reversed(self.wf.topological_order):
            spec = self.wf.jobs[job_id]
            runtime = spec.profile_number("pegasus", "runtime") or 1.0
            levels[job_id] = runtime + max((levels[c] for c in spec.children), default=0.0)
        return levels

    def run(self) -> int:
        self.wf.logs_dir.mkdir(parents=True, exist_ok=True)
        self.wf.scratch_dir.mkdir(parents=True, exist_ok=True)
        self.report.start_clock()
        dropped = self.state.remove_dropped_outputs()
        if dropped:
            self.report.print(f"Removed {len(dropped)} output(s) of an earlier run that this workflow no longer "
                              f"makes from {self.wf.output_dir} (first: {dropped[0]})")
        reusable = self.state.reusable()
        for job_id in reusable:
            self.state.restore(self.results[job_id])
            self.runner.stage_out(self.wf.jobs[job_id])  # outputs/ may have been cleaned since
        if reusable:
            self.report.print(f"Resuming: {len(reusable)} of {len(self.wf.jobs)} jobs finished in an earlier run "
                              f"({', '.join(sorted(reusable))})")
        self.report.print(f"Running {len(self.wf.jobs) - len(reusable)} jobs of workflow {self.wf.name} "
                          f"with up to {self.slots} at once (retries: {self.default_retries}); "
                          f"logs in {self.wf.logs_dir}")

        previous_handlers = self._install_signal_handlers()
        last_status = 0.0
        try:
            while True:
                ready = [job_id for job_id in self.wf.topological_order
                         if self.results[job_id].status == "pending"
                         and all(self.results[p].status in ("succeeded", "reused")
                                 for p in self.wf.jobs[job_id].parents)]
                ready.sort(key=lambda j: -self.priority[j])
                busy = sum(self.cores[job_id] for job_id in self.running)
                for job_id in [] if self.stopping.is_set() else ready:
                    if len(self.running) >= self.slots or (self.running and busy + self.cores[job_id] > self.cpu_count):
                        break  # the first job in priority order waits for its cores: later ones do not overtake it
                    self._launch(job_id, self.cores[job_id])
                    busy += self.cores[job_id]
                if not self.running:
                    break
                try:
                    job_id = self.events.get(timeout=self.status_interval)
                except queue.Empty:
                    job_id = None
                if job_id is not None:
                    self.running.discard(job_id)
                    if self.results[job_id].status == "failed":
                        self._skip_descendants(job_id)
                    self.report.job_finished(job_id)
                now = time.time()
                if now - last_status >= self.status_interval:
                    self.report.status_line(self.running)
                    last_status = now
        except BaseException:  # a bug: stop the jobs and hear them end, rather than leave them running unrecorded
            self.stopping.set()
            while self.running:
                try:
                    self.running.discard(self.events.get(timeout=1))
                except queue.Empty:  # a job thread that ended without its event (it died) is not waited for
                    self.running = {job for job in self.running if self.threads[job].is_alive()}
            raise
        finally:
            self._restore_signal_handlers(previous_handlers)
            self.report.clear_status()
        finished = time.time()
        for result in self.results.values():
            if result.status == "pending":
                result.status = "interrupted" if self.stopping.is_set() else "skipped"
        stats = self.report.statistics(finished, self.slots)
        statistics_txt = self.report.write_statistics(stats)
        self.report.print(self.report.summary_line(stats))
        self.report.print(f"Statistics: {statistics_txt}")
        unpacked, problems = unpack_tensorboard(self.wf.output_dir)
        for problem in problems:
            self.report.print(f"TensorBoard: {problem}")
        if unpacked:
            self.report.print(f"TensorBoard ({len(unpacked)} job(s)): tensorboard --logdir "
                              f"{self.wf.output_dir / TENSORBOARD_FOLDER}")
        if self.stopping.is_set():
            return 130
        return 0 if all(r.status in ("succeeded", "reused") for r in self.results.values()) else 1

    def _launch(self, job_id: str, threads: int) -> None:
        result = self.results[job_id]
        result.status = "running"
        result.started = time.time()
        thread = threading.Thread(target=self._run_job, args=(job_id, threads), name=f"job-{job_id}", daemon=True)
        self.threads[job_id] = thread
        thread.start()  # a thread that cannot start ("can't start new thread") is not waited for below
        self.running.add(job_id)
        self.report.job_event("start", job_id)

    def _skip_descendants(self, job_id: str) -> None:
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

    def _retries(self, job_id: str) -> int:
        """A dagman "retry" profile on the job wins over dagman.retry in the properties."""
        spec = self.wf.jobs[job_id]
        value = spec.profile("dagman", "RETRY", spec.profile("dagman", "retry"))
        try:
            return int(value) if value is not None else self.default_retries
        except ValueError:
            return self.default_retries

    def _run_job(self, job_id: str, threads: int) -> None:
        """A job's thread: its tries until one succeeds, the retries run out or the run stops."""
        spec = self.wf.jobs[job_id]
        result = self.results[job_id]
        tries_allowed = 1 + max(0, self._retries(job_id))
        try:
            if spec.checkpoints:
                self._own_checkpoint(spec)
            while result.tries < tries_allowed and not self.stopping.is_set():
                attempt = result.tries
                result.tries += 1
                outcome = self.runner.run_try(spec, attempt, threads)
                result.wall_time_s += outcome.wall_time_s
                result.exit_code, result.message = outcome.exit_code, outcome.message
                result.log = outcome.log or result.log
                if outcome.succeeded:
                    result.status = "succeeded"
                    break
                if not outcome.retryable:
                    break
                if result.tries < tries_allowed:
                    self.report.job_event("retry", job_id, f": {result.message}; "
                                                           f"try {result.tries + 1} of {tries_allowed}")
            if result.status != "succeeded":
                result.status = "interrupted" if self.stopping.is_set() else "failed"
        except Exception as error:  # a bug or an OS error must not hang the scheduler
            result.status, result.message = "failed", f"executor error: {error!r}"
        finally:
            result.finished = time.time()
            try:
                self.state.record(spec, result)
            except Exception as error:  # the scheduler must hear about the job whatever happens
                result.status, result.message = "failed", f"executor error recording the job: {error!r}"
            self.events.put(job_id)

    def _own_checkpoint(self, spec) -> None:
        """Set aside a checkpoint left by an earlier run of the job for other work (a changed setting or other
        data): resuming from it would finish the old work, or skip training as already done."""
        key = self.state.checkpoint_key(spec)
        if self.state.stale_checkpoint(spec, key):
            moved = self.runner.set_aside_checkpoints(spec)
            if moved:
                self.report.print(f"{spec.id}: its settings or inputs changed since its checkpoint was written; "
                                  f"starting afresh (the old checkpoint is kept as {', '.join(moved)})")
        self.state.claim_checkpoint(spec, key)

    # -- interrupts ----------------------------------------------------------
    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return None

        def stop(signum, _frame):
            if not self.stopping.is_set():
                self.report.print(f"\nReceived {signal.Signals(signum).name}: stopping the running jobs "
                                  "(rerun to resume)")
            self.stopping.set()

        return {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}

    @staticmethod
    def _restore_signal_handlers(previous) -> None:
        for sig, handler in (previous or {}).items():
            signal.signal(sig, handler)


def unpack_tensorboard(output_dir) -> tuple[list[str], list[str]]:
    """Unpack each staged-out tensorboard_*.tar in *output_dir* into it, replacing the job folders it holds.

    A Pegasus job must declare fixed output names and event file names hold the host and time, so train
    and hpo stage their events out as one .tar each. Returns (the folders unpacked, problems: one line per
    archive left packed)."""
    output_dir = Path(output_dir)
    unpacked, problems = [], []
    for archive in sorted(output_dir.glob(f"{TENSORBOARD_FOLDER}_*.tar")):
        try:
            with tarfile.open(archive) as tar:
                members = tar.getmembers()
                folders = sorted({"/".join(m.name.split("/")[:2]) for m in members})
                stray = [m.name for m in members if not m.name.startswith(f"{TENSORBOARD_FOLDER}/")
                         or m.name.count("/") < 2]
                if stray:
                    problems.append(f"{archive}: {stray[0]} is not under {TENSORBOARD_FOLDER}/<job>/; left packed")
                    continue
                for folder in folders:  # a rerun's events replace the earlier run's
                    shutil.rmtree(output_dir / folder, ignore_errors=True)
                tar.extractall(output_dir, members=members, filter="data")
                unpacked += folders
        except (tarfile.TarError, OSError) as error:
            problems.append(f"{archive}: cannot unpack ({error}); left packed")
    return unpacked, problems


_HELD: dict[Path, int] = {}  # run folder -> the file descriptor of its lock, for the folders this process holds


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """One run per run directory at a time: workflow.py holds the lock from its first write into the folder
    to the run's end, the executor while it runs. Taken again by the process that holds it, it is a no-op.
    Yields the lock's file descriptor: the executor hands it on to its jobs, so that a job left running by a
    killed executor keeps the folder locked until it ends (a rerun beside it would share its scratch folder)."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _HELD:
        yield _HELD[run_dir]
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / RUN_LOCK_FILE, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkflowError(f"{run_dir}: in use by another run (workflow.py or python -m utils.executor) or "
                                "by the jobs of one that was killed; let them end, or choose another --run-dir"
                                ) from None
        _HELD[run_dir] = handle.fileno()
        try:
            yield handle.fileno()
        finally:
            _HELD.pop(run_dir, None)


def run_workflow(run_dir, jobs: int = D.EXECUTOR_JOBS, retries: int | None = None, out=None,
                 status_interval: float | None = None, time_limits: bool = True) -> int:
    """Run (or resume) the workflow in *run_dir*. Returns 0 when every job succeeded."""
    run_dir = Path(run_dir).resolve()
    try:
        if not (run_dir / "workflow.yml").is_file():  # said before the lock, which would create the folder
            raise WorkflowError(f"{run_dir / 'workflow.yml'}: workflow not found (run workflow.py first)")
        with run_lock(run_dir) as lock:
            workflow = load_workflow(run_dir)
            return Executor(workflow, jobs=jobs, retries=retries, out=out,
                            status_interval=status_interval, lock=lock, time_limits=time_limits).run()
    except (WorkflowError, OSError) as error:  # OSError: a run folder it cannot write (read-only, full)
        print(f"executor: {error_message(error)}", file=sys.stderr)
        return 2


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m utils.executor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="run directory written by workflow.py")
    parser.add_argument("--jobs", type=positive_int, default=D.EXECUTOR_JOBS,
                        help=f"jobs at once (default: {D.EXECUTOR_JOBS})")
    parser.add_argument("--retries", type=non_negative_int, default=None,
                        help="override dagman.retry from pegasus.properties")
    parser.add_argument("--no-time-limits", action="store_true",
                        help="stop no job for its time (its runtime, checkpoint.time and maxwalltime profiles): for "
                             "a machine slower than the limits assume")
    parser.add_argument("--status-interval", type=positive_float, default=None,
                        help="seconds between status lines (default: 0.5 on a terminal, 30 otherwise)")
    return parser


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    return run_workflow(args.run_dir, jobs=args.jobs, retries=args.retries, status_interval=args.status_interval,
                        time_limits=not args.no_time_limits)


if __name__ == "__main__":
    sys.exit(main())
