"""A run folder in the hands of a careless user: two runs at once, a rerun after an interrupt, a folder that
cannot be written. Each test here failed on the code before its fix."""

from __future__ import annotations

import fcntl
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import generate
from fake_workflow import job_stats, make_workflow, run, starts
from utils.executor import main as executor_main, run_workflow

ROOT = Path(__file__).resolve().parents[1]


def test_a_second_run_into_a_folder_in_use_is_refused_before_it_writes(sample_dir, tmp_path, capsys):
    """A run rewrote the folder's workflow, settings and split while another executor ran in it, and only then
    met the executor's lock: the running one went on with files of other settings under it."""
    run_dir = tmp_path / "run"
    assert generate(run_dir, sample_dir) == 0
    before = {name: (run_dir / name).read_bytes() for name in ("workflow.yml", "config.yml", "split.csv")}
    with open(run_dir / ".executor.lock", "w") as held:  # as a running executor holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        capsys.readouterr()
        assert generate(run_dir, sample_dir, "--seed", "3", "--epochs", "5") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"workflow.py: {run_dir}: in use by another run (workflow.py or python -m utils.executor) or "
                   "by the jobs of one that was killed; let them end, or choose another --run-dir"]
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    # once the other run has ended, the folder is free again
    assert generate(run_dir, sample_dir, "--seed", "3") == 0


@pytest.mark.parametrize("flags, message", [
    (["--jobs", "0"], "argument --jobs: expected a whole number of at least 1, got 0"),
    (["--retries", "-3"], "argument --retries: expected a whole number of at least 0, got -3"),
    (["--status-interval", "-1"], "argument --status-interval: expected a finite number above 0, got -1"),
    (["--status-interval", "nan"], "argument --status-interval: expected a finite number above 0, got 'nan'"),
])
def test_the_executors_nonsense_flags_are_refused_in_one_line(flags, message, tmp_path, capsys):
    """--jobs 0 ran with one slot and --retries -3 printed 'retries: -3'; --status-interval -1 started the
    jobs, then died with a traceback and left them running."""
    run_dir = make_workflow(tmp_path, [{"id": "a", "outputs": ["a.txt"]}])
    with pytest.raises(SystemExit) as stopped:
        executor_main([str(run_dir), *flags])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"python -m utils.executor: error: {message}"
    assert starts(tmp_path) == []


def test_the_executor_names_a_run_folder_it_cannot_use_in_one_line(tmp_path, capsys):
    """A run folder it could not write in (read-only, full; here its lock file cannot be opened) was a
    traceback; a missing one was created, left holding nothing but the lock file."""
    run_dir = make_workflow(tmp_path, [{"id": "a", "outputs": ["a.txt"]}])
    (run_dir / ".executor.lock").mkdir()
    assert run_workflow(run_dir) == 2
    assert capsys.readouterr().err == f"executor: {run_dir / '.executor.lock'}: Is a directory\n"
    assert run_workflow(tmp_path / "missing") == 2
    assert capsys.readouterr().err == (f"executor: {tmp_path / 'missing' / 'workflow.yml'}: workflow not found "
                                       "(run workflow.py first)\n")
    assert not (tmp_path / "missing").exists()


def test_a_rerun_keeps_the_logs_of_the_earlier_runs_tries(tmp_path):
    """A rerun numbered its tries from .000 again and wrote over the logs of the run before: the failed or
    interrupted try that a resume continues from lost its record."""
    run_dir = make_workflow(tmp_path, [{"id": "a", "outputs": ["a.txt"], "fail_tries": 1, "checkpoint": "a.ckpt"}])
    assert run_workflow(run_dir, out=io.StringIO()) == 1
    assert run_workflow(run_dir, out=io.StringIO()) == 0
    logs = run_dir / "logs"
    assert sorted(path.name for path in logs.iterdir()) == ["a.err.000", "a.err.001", "a.out.000", "a.out.001"]
    assert (logs / "a.err.000").read_text() == "failing on purpose, try 1\n"
    assert (logs / "a.out.001").read_text().endswith("a wrote a.txt\n")
    assert job_stats(run_dir)["a"]["log"] == str(logs / "a.err.001")


@pytest.mark.slow  # about 8 s: a job of its own outlives its killed executor
def test_a_job_left_running_by_a_killed_executor_keeps_its_folder_locked(tmp_path, capsys):
    """kill -9 of the executor (or of workflow.py) leaves its jobs running; a rerun started the same jobs again
    in the same scratch folders beside them, both writing the same checkpoint and outputs."""
    run_dir = make_workflow(tmp_path, [{"id": "a", "outputs": ["a.txt"], "sleep": "4"}])
    executor = subprocess.Popen([sys.executable, "-m", "utils.executor", str(run_dir)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while starts(tmp_path) != ["a"] and time.monotonic() < deadline:
        time.sleep(0.05)
    executor.kill()
    executor.wait()
    capsys.readouterr()
    assert run_workflow(run_dir, out=io.StringIO()) == 2  # job a of the killed run is still running
    assert "or by the jobs of one that was killed" in capsys.readouterr().err
    while time.monotonic() < deadline and run_workflow(run_dir, out=io.StringIO()) == 2:
        time.sleep(0.2)  # until the orphan ends and lets the folder go
    assert starts(tmp_path) == ["a", "a"]  # the rerun ran it again once the first had ended, not beside it


# A job through the job runner (utils.cli.run_job) whose forked helper (a DataLoader worker) outlives it.
FORKING_JOB = """
import argparse, os, sys, time
from utils.cli import run_job

def main(args):
    helper = os.fork()
    if helper == 0:
        time.sleep(30)
        os._exit(0)
    with open(args.log, "a") as log:
        log.write(f"{helper}\\n")
    for name in args.outputs:
        with open(name, "w") as handle:
            handle.write("done")
    return 0

parser = argparse.ArgumentParser()
parser.add_argument("--name"); parser.add_argument("--log"); parser.add_argument("--outputs", nargs="*", default=[])
sys.exit(run_job(main, parser, job="forking"))
"""


def test_a_jobs_forked_helper_that_outlives_it_does_not_keep_the_folder_locked(tmp_path):
    """Jobs inherit the run lock (so that a job of a killed executor keeps its folder); their DataLoader workers
    inherited it too and, outliving a killed job by seconds, made an immediate rerun fail as 'in use'."""
    import os
    import signal

    run_dir = make_workflow(tmp_path, [{"id": "a", "outputs": ["a.txt"]}])
    (tmp_path / "fake_job.py").write_text(FORKING_JOB)
    assert run_workflow(run_dir, out=io.StringIO()) == 0
    helper = int((tmp_path / "starts.log").read_text())
    try:
        os.kill(helper, 0)  # still running, its job gone
        with open(run_dir / ".executor.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError before the fix
            fcntl.flock(handle, fcntl.LOCK_UN)
        assert run_workflow(run_dir, out=io.StringIO()) == 0  # the rerun reuses the job
    finally:
        os.kill(helper, signal.SIGKILL)


def test_a_job_thread_that_cannot_start_ends_the_run_with_its_error_not_a_hang(tmp_path, monkeypatch):
    """The job joined the running set before its thread started; when the start failed ("can't start new
    thread", a process limit), the executor waited for that job's end for ever, Ctrl-C or not."""
    import threading

    run_dir = make_workflow(tmp_path, [{"id": "a", "outputs": ["a.txt"]}])
    start = threading.Thread.start

    def refuse_jobs(thread):
        if thread.name.startswith("job-"):
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", refuse_jobs)
    outcome = []

    def run():
        try:
            run_workflow(run_dir, out=io.StringIO())
        except RuntimeError as error:
            outcome.append(str(error))

    runner = threading.Thread(target=run, daemon=True)
    start(runner)
    runner.join(timeout=30)
    assert not runner.is_alive() and outcome == ["can't start new thread"]


def test_statistics_txt_counts_interrupted_jobs_as_interrupted(tmp_path):
    """After Ctrl-C the totals table put the interrupted jobs, the one that ran for minutes too, under
    'Skipped', while the run's last line said 'interrupted'."""
    from utils.executor import load_workflow
    from utils.executor.progress import JobResult, Reporter

    run_dir = make_workflow(tmp_path, [{"id": "a", "outputs": ["a.txt"]},
                                       {"id": "b", "inputs": ["a.txt"], "outputs": ["b.txt"]},
                                       {"id": "c", "inputs": ["b.txt"], "outputs": ["c.txt"]}])
    results = {"a": JobResult("a", "succeeded", tries=1, wall_time_s=2.0, exit_code=0),
               "b": JobResult("b", "interrupted", tries=1, wall_time_s=90.0, exit_code=-15, message="interrupted"),
               "c": JobResult("c", "interrupted")}
    reporter = Reporter(load_workflow(run_dir), results, io.StringIO())
    text = reporter.write_statistics(reporter.statistics(reporter.started + 92.0, 2)).read_text().splitlines()
    header = text.index(next(line for line in text if line.startswith("Type")))
    assert text[header].split() == ["Type", "Succeeded", "Failed", "Skipped", "Interrupted", "Reused", "Total",
                                    "Tries", "Retries"]
    assert text[header + 1].split() == ["Jobs", "1", "0", "0", "2", "0", "3", "2", "0"]


def test_a_job_rerun_by_hand_in_place_reruns_the_jobs_that_read_its_outputs(tmp_path):
    """docs/troubleshooting.md: paste a log's rerun line, change a flag, and the job runs again in place. The
    next run reused that job (right: its outputs are the new ones) and its children too, whose results came
    from the old outputs: outputs/ then held a new a.txt beside a b.txt made from the old one."""
    run_dir = make_workflow(tmp_path, [
        {"id": "a", "outputs": ["a.txt"], "stage_out": True},
        {"id": "b", "inputs": ["a.txt"], "outputs": ["b.txt"], "stage_out": True}])
    assert run_workflow(run_dir, out=io.StringIO()) == 0
    (run_dir / "scratch" / "a" / "a.txt").write_text("a, rerun by hand;")
    assert run_workflow(run_dir, out=io.StringIO()) == 0
    assert starts(tmp_path) == ["a", "b", "b"]
    assert (run_dir / "outputs" / "b.txt").read_text() == "a, rerun by hand;b;"
    assert run_workflow(run_dir, out=io.StringIO()) == 0  # and then nothing is left to do
    assert starts(tmp_path) == ["a", "b", "b"]


class GoneAfterOneLine(io.StringIO):
    """Standard output piped into `head -1`: the second line written raises BrokenPipeError."""

    def write(self, text):
        if self.getvalue():
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)


def test_progress_output_that_goes_away_does_not_stop_the_run(tmp_path):
    """`python -m utils.executor RUN_DIR | head -1`: the next progress line raised BrokenPipeError out of the
    scheduler, which died with the jobs still running on their own, and wrote no statistics."""
    run_dir = make_workflow(tmp_path, [{"id": "a", "outputs": ["a.txt"], "sleep": "1"},
                                       {"id": "b", "inputs": ["a.txt"], "outputs": ["b.txt"]}])
    assert run_workflow(run_dir, out=GoneAfterOneLine(), status_interval=0.2) == 0
    assert {job_id: job["status"] for job_id, job in job_stats(run_dir).items()} == {"a": "succeeded",
                                                                                      "b": "succeeded"}


def test_an_executor_error_stops_the_running_jobs_before_it_ends(tmp_path, monkeypatch):
    """An error in the scheduling loop (a bug) ended the executor and left its jobs running, unrecorded."""
    from utils.executor.progress import Reporter

    run_dir = make_workflow(tmp_path, [{"id": "a", "outputs": ["a.txt"], "sleep": "60"}])

    def broken_status_line(self, running):
        raise RuntimeError("a bug in the status line")

    monkeypatch.setattr(Reporter, "status_line", broken_status_line)
    began = time.monotonic()
    with pytest.raises(RuntimeError, match="a bug in the status line"):
        run_workflow(run_dir, out=io.StringIO(), status_interval=0.2)
    assert time.monotonic() - began < 30
    with open(run_dir / ".executor.lock", "a") as handle:  # no job of the run holds it any more
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_job_killed_by_a_signal_is_said_so(tmp_path):
    """A job killed by a signal (the kernel's OOM killer, kill -9) read 'exit code -9', an exit status no
    process can return."""
    run_dir = make_workflow(tmp_path, [{"id": "a", "outputs": ["a.txt"]}])
    (tmp_path / "fake_job.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    out = io.StringIO()
    assert run_workflow(run_dir, out=out) == 1
    assert job_stats(run_dir)["a"]["message"] == f"killed by SIGKILL (see {run_dir / 'logs' / 'a.err.000'})"
    assert "FAILED a after 1 tries: killed by SIGKILL" in out.getvalue()


def test_a_finished_runs_summary_with_no_reader_left_ends_quietly_with_the_runs_status(tmp_path):
    """`workflow.py --local ... | head -1`: the run succeeded, then its summary met the closed pipe and ended in a
    BrokenPipeError traceback, exit 1."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "import utils.executor as executor\n"
        "from utils.pegasus import driver\n"
        "executor.run_workflow = lambda run_dir, jobs: 0\n"
        "driver.print_summary = lambda run_dir, output_dir: [print('summary line', i, flush=True) "
        "for i in range(100000)]\n"
        "sys.exit(driver.run_locally(Path('run'), Path('out'), 1))\n")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "summary line 0\n"
    process.stdout.close()
    assert process.wait(timeout=60) == 0
    assert "Traceback" not in process.stderr.read()


# A job's helper (forked, its copy of the lock closed) that opens a file at the lock's old number and forks in turn.
HELPER_OF_A_HELPER = """
import os, sys
from utils.cli import RUN_LOCK_VARIABLE, keep_the_run_lock_from_forked_helpers

lock = os.open(sys.argv[1], os.O_RDWR)
os.environ[RUN_LOCK_VARIABLE] = f"{lock}:{sys.argv[1]}"
keep_the_run_lock_from_forked_helpers()
helper = os.fork()
if helper == 0:
    try:
        os.fstat(lock)
        os._exit(4)  # the helper kept the lock
    except OSError:
        pass
    os.dup2(os.open(sys.argv[2], os.O_RDONLY), lock)  # the number reused: a file the helper reads
    inner = os.fork()
    if inner == 0:
        try:
            os.fstat(lock)
        except OSError:
            os._exit(3)  # the helper's file closed under it
        os._exit(0)
    os._exit(os.waitstatus_to_exitcode(os.waitpid(inner, 0)[1]))
os.fstat(lock)  # the job keeps its own
sys.exit(os.waitstatus_to_exitcode(os.waitpid(helper, 0)[1]))
"""


def test_a_helper_of_a_helper_keeps_the_file_its_parent_opened_at_the_locks_old_number(tmp_path):
    """The fork hook closed the lock's number in every process forked below the job: a helper that had closed its
    copy and then opened a file at that number (the lowest free one) lost that file in its own forked children."""
    (tmp_path / ".executor.lock").write_text("")
    (tmp_path / "image.jpg").write_bytes(b"an image the helper reads")
    (tmp_path / "helpers.py").write_text(HELPER_OF_A_HELPER)
    done = subprocess.run([sys.executable, str(tmp_path / "helpers.py"), str(tmp_path / ".executor.lock"),
                           str(tmp_path / "image.jpg")], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (done.returncode, done.stderr)  # 3: the helper's file closed in its child


def test_a_rerun_with_fewer_inputs_leaves_none_of_the_old_ones_in_the_jobs_folder(tmp_path):
    # merge_predictions reads its folder's predictions_*.json and the report its *_run.json: a rerun with fewer
    # shards (--images-per-job) left the earlier run's links to the dropped shards' parts there, beside the new
    # ones (merge: '10 part(s), expected 6' on every retry; the report: the old shards' records and images)
    parts = [{"id": f"p{i}", "outputs": [f"part_{i}.txt"]} for i in range(3)]
    merge = {"id": "merge", "inputs": ["part_0.txt", "part_1.txt", "part_2.txt"], "outputs": ["all.txt"]}
    run_dir = make_workflow(tmp_path, [*parts, merge])
    assert run(run_dir)[0] == 0
    merge_dir = run_dir / "scratch" / "merge"
    assert sorted(path.name for path in merge_dir.glob("part_*")) == ["part_0.txt", "part_1.txt", "part_2.txt"]
    make_workflow(tmp_path, [*parts[:2], {**merge, "inputs": ["part_0.txt", "part_1.txt"]}])
    assert run(run_dir)[0] == 0
    assert sorted(path.name for path in merge_dir.glob("part_*")) == ["part_0.txt", "part_1.txt"]
    assert (run_dir / "scratch" / "p2" / "part_2.txt").exists()  # only the link in the merge's folder goes


def test_a_rerun_removes_the_outputs_of_the_jobs_it_no_longer_has(tmp_path):
    # a rerun with fewer shards or folds left the dropped jobs' staged-out files in RUN_DIR/outputs beside the new
    # run's (bin/report.py RUN_DIR then showed both configurations' records and images)
    parts = [{"id": f"p{i}", "outputs": [f"part_{i}.txt"], "stage_out": True} for i in range(3)]
    parts.append({"id": "hpo_3", "outputs": ["tensorboard_hpo_3.tar"], "stage_out": True})
    run_dir = make_workflow(tmp_path, parts)
    assert run(run_dir)[0] == 0
    (run_dir / "outputs" / "notes.txt").write_text("the user's own")
    for job in ("hpo_3", "train"):  # what the tensorboard_<job>.tar unpacked (a text file here: left packed)
        (run_dir / "outputs" / "tensorboard" / job).mkdir(parents=True)
    make_workflow(tmp_path, parts[:2])
    status, out = run(run_dir)
    assert status == 0
    assert sorted(path.name for path in (run_dir / "outputs").iterdir()) == ["notes.txt", "part_0.txt", "part_1.txt",
                                                                             "tensorboard"]
    assert [path.name for path in (run_dir / "outputs" / "tensorboard").iterdir()] == ["train"]
    assert f"Removed 2 output(s) of an earlier run that this workflow no longer makes from {run_dir / 'outputs'}" \
           f" (first: part_2.txt)" in out
    assert "p2" not in json.loads((run_dir / "executor_state.json").read_text())["jobs"]


def test_a_rerun_into_another_output_folder_removes_nothing_of_what_is_there(tmp_path):
    # the dropped jobs' names were removed from whatever folder the rerun delivers to: with sites.yml's
    # local_storage moved to a folder of the user's (or another run's), their files of those names went
    parts = [{"id": f"p{i}", "outputs": [f"part_{i}.txt"], "stage_out": True} for i in range(3)]
    run_dir = make_workflow(tmp_path, parts)
    assert run(run_dir)[0] == 0
    elsewhere = tmp_path / "results"
    elsewhere.mkdir()
    (elsewhere / "part_2.txt").write_text("another run's")
    make_workflow(tmp_path, parts[:2])
    (run_dir / "sites.yml").write_text("sites:\n- name: local\n  directories:\n  - type: localStorage\n"
                                       f"    path: {elsewhere}\n")
    status, out = run(run_dir)
    assert status == 0
    assert (elsewhere / "part_2.txt").read_text() == "another run's"
    assert "Removed" not in out
