"""The local executor on tiny fake jobs, as a specification.

Reading the run directory, scheduling (order, slots, failures), one job's tries
(retries, checkpoints, logs and the line that reruns a job by hand), resuming an
earlier run, and the statistics it leaves behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from fake_workflow import DIAMOND, job_stats, make_workflow, rerun_line_in, run, starts, wait_for_the_run_lock
from helpers import REFUSAL_MB, peak_mb
from utils.executor import WorkflowError, load_workflow, run_workflow

# -- reading the run directory -------------------------------------------------

def test_jobs_depend_on_the_jobs_that_produce_their_inputs(tmp_path):
    workflow = load_workflow(make_workflow(tmp_path, DIAMOND, inputs={"in.txt": "IN;"}))
    assert workflow.jobs["a"].parents == set()
    assert workflow.jobs["b"].parents == workflow.jobs["c"].parents == {"a"}
    assert workflow.jobs["d"].parents == {"b", "c"}
    assert workflow.topological_order[0] == "a" and workflow.topological_order[-1] == "d"


def test_an_input_nobody_provides_is_a_clear_error(tmp_path):
    run_dir = make_workflow(tmp_path, [{"id": "a", "inputs": ["nowhere.txt"], "outputs": ["a.txt"]}])
    with pytest.raises(WorkflowError, match="nowhere.txt"):
        load_workflow(run_dir)
    assert run_workflow(run_dir, out=io.StringIO()) == 2



def test_a_user_edited_workflow_yml_is_read_bounded(tmp_path):
    """The run directory's YAML is user-editable: an alias bomb, a 100 KB string aliased thousands of times and
    brackets nested 100,000 deep are one-line WorkflowErrors in well under a second (libyaml's loader expanded
    the first two and crashed the process on the third); the catalogs as written still load."""
    run_dir = make_workflow(tmp_path, DIAMOND, inputs={"in.txt": "IN;"})
    workflow_file = run_dir / "workflow.yml"
    written = workflow_file.read_text()
    bomb = "x0: &x0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"x{level}: &x{level} [{', '.join([f'*x{level - 1}'] * 9)}]\n" for level in range(1, 9))
    long_text = 'long: &long "' + "y" * 100_000 + '"\nmany: [' + ", ".join(["*long"] * 9000) + "]\n"
    for extra, words in ((bomb, "values once its aliases"), (long_text, "characters once its aliases"),
                         ("deep: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested more than")):
        workflow_file.write_text(written + extra)
        tracemalloc.start()
        with pytest.raises(WorkflowError, match=words) as caught:
            load_workflow(run_dir)
        assert peak_mb() < REFUSAL_MB and "\n" not in str(caught.value)
        assert str(caught.value).startswith(f"{workflow_file}: not valid YAML (")
    workflow_file.write_text(written)
    assert set(load_workflow(run_dir).jobs) == {"a", "b", "c", "d"}

# -- scheduling ----------------------------------------------------------------

def test_jobs_run_in_dependency_order_and_only_final_outputs_are_staged_out(tmp_path):
    run_dir = make_workflow(tmp_path, DIAMOND, inputs={"in.txt": "IN;"})
    status, output = run(run_dir)
    assert status == 0, output
    order = starts(tmp_path)
    assert order[0] == "a" and order[-1] == "d" and sorted(order) == ["a", "b", "c", "d"]
    assert (run_dir / "outputs" / "d.txt").read_text() == "IN;a;b;IN;a;c;d;"
    assert not (run_dir / "outputs" / "a.txt").exists()


def test_up_to_jobs_jobs_are_started_at_once(tmp_path):
    jobs = [{"id": f"p{i}", "outputs": [f"p{i}.txt"]} for i in range(4)]
    # the start lines say how many ran side by side: all four with four slots,
    # two with two slots (the third starts only once one of the first two is done); 8 cores: the slots decide
    for slots, at_once in ((4, 4), (2, 2)):
        run_dir = make_workflow(tmp_path / f"slots{slots}", jobs)
        status, output = run(run_dir, jobs=slots, cpu_count=8)
        assert status == 0, output
        events = [line.split("] ", 1)[1].split()[0] for line in output.splitlines() if line.startswith("[")]
        assert events.count("start") == 4
        assert events.index("done") == at_once


def test_each_job_computes_with_the_cores_it_asks_for_whatever_ran_beside_it(tmp_path):
    """A job's thread count is its pegasus cores profile (at most the machine's, 1 without one), never a share of
    the cores that depends on which jobs were running when it started; the jobs at once ask for no more cores than
    the machine has (a job that asks for all of them runs alone), as HTCondor's request_cpus would."""
    shown = ["OMP_NUM_THREADS", "MKL_NUM_THREADS", "PEGASUS_CORES"]
    jobs = [{"id": "whole", "outputs": ["whole.txt"], "pegasus_profiles": {"cores": 4}, "sleep": 0.3},
            {"id": "more", "outputs": ["more.txt"], "pegasus_profiles": {"cores": 16}},
            *({"id": f"one{i}", "outputs": [f"one{i}.txt"], "sleep": 0.3} for i in range(3)),
            {"id": "two", "outputs": ["two.txt"], "pegasus_profiles": {"cores": 2}, "sleep": 0.3}]
    for job in jobs:
        job["show_env"] = shown
    run_dir = make_workflow(tmp_path, jobs)
    status, output = run(run_dir, jobs=4, cpu_count=4)
    assert status == 0, output
    asked = {"whole": 4, "more": 4, "one0": 1, "one1": 1, "one2": 1, "two": 2}
    for job_id, cores in asked.items():
        written = (run_dir / "scratch" / job_id / f"{job_id}.txt").read_text()
        assert written == f"{job_id};" + "".join(f"{name}={cores};" for name in shown), job_id
    in_use, most = 0, 0  # the cores of the jobs running, from the start and done lines in their order
    for line in output.splitlines():
        event, job_id = line.split("] ", 1)[1].split()[:2] if line.startswith("[") else ("", "")
        in_use += {"start": asked.get(job_id, 0), "done": -asked.get(job_id, 0)}.get(event, 0)
        most = max(most, in_use)
    assert most == 4 and in_use == 0, output


def test_dependents_of_a_failed_job_are_skipped_and_the_rest_runs(tmp_path):
    jobs = [dict(DIAMOND[0]), dict(DIAMOND[1], fail_tries=5), dict(DIAMOND[2], stage_out=True), dict(DIAMOND[3])]
    run_dir = make_workflow(tmp_path, jobs, retries=1, inputs={"in.txt": "IN;"})
    status, output = run(run_dir)
    assert status == 1
    stats = job_stats(run_dir)
    assert stats["b"]["status"] == "failed" and stats["b"]["tries"] == 2 and stats["b"]["exit_code"] == 3
    assert stats["c"]["status"] == "succeeded"
    assert stats["d"]["status"] == "skipped" and "b" in stats["d"]["message"]
    assert (run_dir / "outputs" / "c.txt").exists()
    assert "FAILED b" in output


# -- one job's tries -----------------------------------------------------------

def test_each_try_has_its_stdout_and_stderr_log(tmp_path):
    jobs = [{"id": "flaky", "outputs": ["f.txt"], "fail_tries": 1, "checkpoint": "flaky.ckpt"}]
    run_dir = make_workflow(tmp_path, jobs, retries=1)
    assert run(run_dir)[0] == 0
    logs = run_dir / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["flaky.err.000", "flaky.err.001",
                                                      "flaky.out.000", "flaky.out.001"]
    assert "failing on purpose, try 1" in (logs / "flaky.err.000").read_text()
    assert (logs / "flaky.out.001").read_text().endswith("flaky wrote f.txt\n")


def test_a_try_log_starts_with_a_commented_header_and_the_line_that_reruns_it(tmp_path):
    run_dir = make_workflow(tmp_path, DIAMOND[:2], inputs={"in.txt": "IN;"})
    assert run(run_dir)[0] == 0
    lines = (run_dir / "logs" / "b.out.000").read_text().splitlines()
    rerun = lines.index("# rerun by hand:") + 1
    assert lines[0] == "# job b, try 1"
    assert lines[1] == f"# working directory: {run_dir / 'scratch' / 'b'}"
    assert lines[rerun].startswith(f"cd {run_dir / 'scratch' / 'b'} && ")
    assert " OMP_NUM_THREADS=" in lines[rerun] and " PYTHONPATH=" in lines[rerun]
    # everything else in the header is a shell comment, then comes the job's own stdout
    assert all(line.startswith("# ") for line in lines[:rerun] + lines[rerun + 1:-1])
    assert lines[-1] == "b wrote b.txt"


def test_the_rerun_line_recreates_the_output_by_hand_even_in_a_folder_with_spaces(tmp_path):
    base = tmp_path / "my runs"  # every path in the line has a space: the run dir, the script, the log
    jobs = [DIAMOND[0], dict(DIAMOND[1], env={"MASK_NOTE": "it's a note"},
                             show_env=["MASK_NOTE", "OMP_NUM_THREADS", "PYTHONPATH"])]
    run_dir = make_workflow(base, jobs, inputs={"in.txt": "IN;"})
    assert run(run_dir)[0] == 0
    output = run_dir / "scratch" / "b" / "b.txt"
    made_by_the_executor = output.read_text()
    assert "MASK_NOTE=it's a note;" in made_by_the_executor
    output.unlink()
    # a bare environment: whatever the job needs must be on the line itself
    subprocess.run([shutil.which("bash"), "-c", rerun_line_in(run_dir / "logs" / "b.out.000")],
                   cwd=tmp_path, env={"PATH": os.defpath}, check=True, capture_output=True)
    assert output.read_text() == made_by_the_executor
    assert starts(base) == ["a", "b", "b"]


def test_a_job_failing_once_is_retried_and_keeps_its_checkpoint(tmp_path):
    jobs = [{"id": "flaky", "outputs": ["f.txt"], "fail_tries": 1, "checkpoint": "flaky.ckpt", "stage_out": True}]
    run_dir = make_workflow(tmp_path, jobs, retries=1)
    status, output = run(run_dir)
    assert status == 0, output
    assert starts(tmp_path) == ["flaky", "flaky"]
    # the second try saw the first try's checkpoint
    assert (run_dir / "scratch" / "flaky" / "flaky.ckpt").read_text() == "2"
    job = job_stats(run_dir)["flaky"]
    assert (job["status"], job["tries"], job["exit_code"]) == ("succeeded", 2, 0)
    assert "retry  flaky: exit code 3" in output
    # the initial (empty) checkpoint in the replica catalog is never written through
    assert (tmp_path / "data" / "flaky.ckpt").read_text() == ""


def test_a_job_exiting_0_without_its_declared_outputs_fails(tmp_path):
    run_dir = make_workflow(tmp_path, [{"id": "lazy", "outputs": ["x.txt"], "skip_output": True}])
    status, _ = run(run_dir)
    assert status == 1
    job = job_stats(run_dir)["lazy"]
    assert job["status"] == "failed" and "x.txt" in job["message"]


def test_checkpoint_time_sends_sigterm_and_the_retry_resumes(tmp_path):
    # checkpoint.time is in minutes: 0.02 min = 1.2 s; the job would sleep 60 s without SIGTERM
    jobs = [{"id": "long", "outputs": ["l.txt"], "checkpoint": "long.ckpt", "until_term": True,
             "pegasus_profiles": {"checkpoint.time": 0.02, "maxwalltime": 0.5}}]
    run_dir = make_workflow(tmp_path, jobs, retries=1)
    status, output = run(run_dir)
    assert status == 0, output
    assert starts(tmp_path) == ["long", "long"]
    assert "retry  long: sent SIGTERM at checkpoint.time" in output  # not "killed at maxwalltime"


def test_a_job_without_a_checkpoint_is_stopped_at_its_runtime_limit_and_told_how_to_lift_it(tmp_path):
    """Only train and hpo (checkpoint.time, maxwalltime) had a time limit here; every other job carries its
    runtime profile (seconds, utils/pegasus/runtimes.py), which kickstart holds it to on a pool, and a hung one
    stalled a local run for ever. It now gets SIGTERM at 3 times it, taken for hung (a healthy job past its
    runtime, slower than the limits assume, is let run: it would fail every retry); --no-time-limits lifts
    every limit."""
    run_dir = make_workflow(tmp_path, [{"id": "hung", "outputs": ["h.txt"], "sleep": 600,
                                        "pegasus_profiles": {"runtime": 0.5}},
                                       {"id": "slower", "outputs": ["s.txt"], "sleep": 1.0,
                                        "pegasus_profiles": {"runtime": 0.5}}])
    status, output = run(run_dir)
    assert status == 1, output
    job = job_stats(run_dir)["hung"]
    assert job["status"] == "failed"
    assert "stopped (SIGTERM) at its time limit (1.5 s, 3 times the runtime profile" in job["message"]
    assert "--no-time-limits" in job["message"]
    # the sites.yml that sets the limits, not RUN_DIR/sites.yml (the generated catalog, whose entries are not read)
    assert "`runtimes:` entry in the sites.yml given to workflow.py (--sites-config), then generate" in job["message"]
    assert "hung" in output and "at its time limit (1.5 s" in output
    assert job_stats(run_dir)["slower"]["status"] == "succeeded"  # twice its runtime profile

    slow = make_workflow(tmp_path / "lifted", [{"id": "slow", "outputs": ["s.txt"], "sleep": 1.5,
                                                "pegasus_profiles": {"runtime": 0.5}}])
    assert run_workflow(slow, out=io.StringIO(), time_limits=False) == 0
    assert job_stats(slow)["slow"]["status"] == "succeeded"


def test_an_interrupt_stops_the_running_jobs_and_the_run_says_so(tmp_path):
    # a job without checkpoint.time or maxwalltime, far longer than the test waits for the executor
    run_dir = make_workflow(tmp_path, [{"id": "slow", "outputs": ["s.txt"], "sleep": 600},
                                       {"id": "after", "inputs": ["s.txt"], "outputs": ["t.txt"]}])
    command = [sys.executable, "-m", "utils.executor", str(run_dir)]
    process = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not starts(tmp_path):
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)  # the executor alone, not the job: it must stop the job itself
        output, _ = process.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the whole group is gone when the executor worked
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == 130, output
    assert "Received SIGINT" in output
    assert {job_id: job["status"] for job_id, job in job_stats(run_dir).items()} == {
        "slow": "interrupted", "after": "interrupted"}


# -- resuming ------------------------------------------------------------------

def test_a_rerun_skips_finished_jobs_and_reruns_changed_ones(tmp_path):
    run_dir = make_workflow(tmp_path, DIAMOND, inputs={"in.txt": "IN;"})
    assert run(run_dir)[0] == 0
    assert run(run_dir)[0] == 0
    assert sorted(starts(tmp_path)) == ["a", "b", "c", "d"]  # nothing ran twice
    stats = json.loads((run_dir / "statistics.json").read_text())
    assert stats["totals"]["reused"] == 4
    wall_time = next(line for line in (run_dir / "statistics.txt").read_text().splitlines()
                     if line.startswith("Workflow wall time:"))  # not a whole run's time: none of it ran now
    assert wall_time.endswith("s): this rerun's alone, 4 of 4 jobs reused from earlier runs, their time not in it")
    # a changed input file reruns its job and everything downstream
    data = tmp_path / "data" / "in.txt"
    data.write_text("NEW;")
    os.utime(data, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert run(run_dir)[0] == 0
    assert sorted(starts(tmp_path)) == ["a", "a", "b", "b", "c", "c", "d", "d"]
    assert (run_dir / "outputs" / "d.txt").read_text().startswith("NEW;")


def test_a_run_killed_part_way_resumes_without_rerunning_finished_jobs(tmp_path):
    jobs = [{"id": "first", "outputs": ["1.txt"]},
            {"id": "slow", "inputs": ["1.txt"], "outputs": ["2.txt"], "sleep": 30},
            {"id": "last", "inputs": ["2.txt"], "outputs": ["3.txt"], "stage_out": True}]
    run_dir = make_workflow(tmp_path, jobs)
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "utils.executor", str(run_dir), "--jobs", "2"]
    # a new session, so that killing its process group takes the running job down too (a crash)
    process = subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and starts(tmp_path).count("slow") == 0:
            time.sleep(0.1)
        assert starts(tmp_path) == ["first", "slow"]
        state = json.loads((run_dir / "executor_state.json").read_text())
        assert state["jobs"]["first"]["status"] == "succeeded" and "slow" not in state["jobs"]
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    wait_for_the_run_lock(run_dir)  # the killed job holds the folder's lock until it is gone, a moment later
    # resume with a fast "slow" job: same job definition apart from the sleep, so edit only that
    workflow_yml = run_dir / "workflow.yml"
    workflow_yml.write_text(workflow_yml.read_text().replace("- '30'", "- '0'").replace("- 30\n", "- 0\n"))
    status, output = run(run_dir)
    assert status == 0, output
    assert starts(tmp_path) == ["first", "slow", "slow", "last"]
    assert {job_id: job["status"] for job_id, job in job_stats(run_dir).items()} == {
        "first": "reused", "slow": "succeeded", "last": "succeeded"}
    assert (run_dir / "outputs" / "3.txt").exists()


# -- statistics ----------------------------------------------------------------

def test_statistics_count_the_jobs_and_name_the_critical_path(tmp_path):
    run_dir = make_workflow(tmp_path, DIAMOND, inputs={"in.txt": "IN;"})
    status, output = run(run_dir)
    assert status == 0, output
    stats = json.loads((run_dir / "statistics.json").read_text())
    assert stats["totals"]["succeeded"] == 4 and stats["totals"]["retries"] == 0
    assert stats["critical_path"]["jobs"][0] == "a" and stats["critical_path"]["jobs"][-1] == "d"
    assert len(stats["critical_path"]["jobs"]) == 3
    text = (run_dir / "statistics.txt").read_text()
    assert "Critical path" in text and "succeeded" in text
    assert "Workflow fake-wf: 4 succeeded of 4 jobs" in output


def test_a_rerun_with_other_arguments_does_not_resume_the_old_checkpoint(tmp_path):
    # A finished job's checkpoint, then the job's settings change: the rerun must start afresh (its
    # checkpoint counted "1" and would read "2" if resumed), and the old checkpoint is kept aside.
    run_dir = make_workflow(tmp_path, [{"id": "train", "outputs": ["model.pt"], "checkpoint": "ck"}])
    assert run(run_dir)[0] == 0
    assert (run_dir / "scratch" / "train" / "ck").read_text() == "1"
    run_dir = make_workflow(tmp_path, [{"id": "train", "outputs": ["model.pt"], "checkpoint": "ck", "sleep": 0.01}])
    status, output = run(run_dir)
    assert status == 0, output
    assert starts(tmp_path) == ["train", "train"]
    assert (run_dir / "scratch" / "train" / "ck").read_text() == "1"
    assert (run_dir / "scratch" / "train" / "ck.stale").read_text() == "1"
    assert "train: its settings or inputs changed since its checkpoint was written; starting afresh" in output


def test_a_rerun_after_a_parent_made_other_data_does_not_resume_the_old_checkpoint(tmp_path):
    # The child's own definition is unchanged, but its parent reran on another input and made other data.
    jobs = [{"id": "prep", "inputs": ["raw.txt"], "outputs": ["set.txt"]},
            {"id": "train", "inputs": ["set.txt"], "outputs": ["model.pt"], "checkpoint": "ck"}]
    run_dir = make_workflow(tmp_path, jobs, inputs={"raw.txt": "first"})
    assert run(run_dir)[0] == 0
    run_dir = make_workflow(tmp_path, jobs, inputs={"raw.txt": "second"})
    status, output = run(run_dir)
    assert status == 0, output
    assert starts(tmp_path) == ["prep", "train", "prep", "train"]
    assert (run_dir / "scratch" / "train" / "ck").read_text() == "1"
    assert "starting afresh" in output


def test_an_interrupted_job_rerun_unchanged_resumes_its_checkpoint(tmp_path):
    # The first run fails the job once with no retries left; the rerun (same settings) resumes from it.
    jobs = [{"id": "flaky", "outputs": ["f.txt"], "fail_tries": 1, "checkpoint": "flaky.ckpt"}]
    run_dir = make_workflow(tmp_path, jobs, retries=0)
    assert run(run_dir)[0] == 1
    status, output = run(run_dir)
    assert status == 0, output
    assert (run_dir / "scratch" / "flaky" / "flaky.ckpt").read_text() == "2"
    assert "starting afresh" not in output


def test_the_run_settings_file_alone_reruns_nothing(tmp_path):
    # experiment_config.yml is only copied into the jobs' run records: a setting that changes no job's
    # arguments (e.g. --retries) must not rerun the workflow.
    jobs = [{"id": "a", "inputs": ["experiment_config.yml"], "outputs": ["a.txt"]},
            {"id": "b", "inputs": ["a.txt", "data.txt"], "outputs": ["b.txt"]}]
    run_dir = make_workflow(tmp_path, jobs, inputs={"experiment_config.yml": "retries: 1\n", "data.txt": "x"})
    assert run(run_dir)[0] == 0
    run_dir = make_workflow(tmp_path, jobs, inputs={"experiment_config.yml": "retries: 5\n", "data.txt": "x"})
    status, output = run(run_dir)
    assert status == 0 and "Resuming: 2 of 2 jobs" in output, output
    # while a changed data file reruns the job that reads it
    run_dir = make_workflow(tmp_path, jobs, inputs={"experiment_config.yml": "retries: 5\n", "data.txt": "y"})
    assert run(run_dir)[0] == 0
    assert starts(tmp_path) == ["a", "b", "b"]
