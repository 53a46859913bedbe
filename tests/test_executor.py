"""The local executor on tiny fake jobs: order, retries, checkpoints, failures, resume, statistics."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from Pegasus.api import File, Job, Properties, ReplicaCatalog, Transformation, TransformationCatalog, Workflow

from utils.pegasus.executor import load_workflow, run_workflow

# A fake job: records each start in a log outside the run dir, optionally fails its
# first N tries, keeps a try counter in its checkpoint file, writes its outputs.
FAKE_JOB = textwrap.dedent("""
    import argparse, os, signal, sys, time
    p = argparse.ArgumentParser()
    p.add_argument("--name"); p.add_argument("--log")
    p.add_argument("--inputs", nargs="*", default=[]); p.add_argument("--outputs", nargs="*", default=[])
    p.add_argument("--fail-tries", type=int, default=0); p.add_argument("--checkpoint")
    p.add_argument("--sleep", type=float, default=0.0); p.add_argument("--skip-output", action="store_true")
    p.add_argument("--until-term", action="store_true")
    a = p.parse_args()
    with open(a.log, "a") as log:
        log.write(a.name + "\\n")
    tries_so_far = 0
    if a.checkpoint:
        text = open(a.checkpoint).read().strip() if os.path.exists(a.checkpoint) else ""
        tries_so_far = int(text) if text else 0
        with open(a.checkpoint, "w") as handle:
            handle.write(str(tries_so_far + 1))
    if a.until_term and tries_so_far == 0:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))  # saved the checkpoint above
        time.sleep(60)
    time.sleep(a.sleep)
    if tries_so_far < a.fail_tries:
        print("failing on purpose, try", tries_so_far + 1, file=sys.stderr)
        sys.exit(3)
    content = "".join(open(name).read() for name in a.inputs) + a.name + ";"
    for name in ([] if a.skip_output else a.outputs):
        with open(name, "w") as handle:
            handle.write(content)
""")


def make_workflow(tmp_path: Path, jobs: list[dict], retries: int = 0, inputs: dict | None = None) -> Path:
    """Write workflow.yml + catalogs + pegasus.properties for fake jobs into tmp_path/run."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    script = tmp_path / "fake_job.py"
    script.write_text(FAKE_JOB)
    log = tmp_path / "starts.log"
    rc = ReplicaCatalog()
    for lfn, content in (inputs or {}).items():
        path = tmp_path / "data" / lfn
        path.parent.mkdir(exist_ok=True)
        path.write_text(content)
        rc.add_replica("local", lfn, path.as_uri())
    tc = TransformationCatalog().add_transformations(
        Transformation("fake", site="local", pfn=script, is_stageable=True))
    wf = Workflow("fake-wf")
    for spec in jobs:
        job = Job("fake", _id=spec["id"])
        args = ["--name", spec["id"], "--log", str(log)]
        if spec.get("inputs"):
            args += ["--inputs", *spec["inputs"]]
            job.add_inputs(*spec["inputs"])
        if spec.get("outputs"):
            args += ["--outputs", *spec["outputs"]]
            job.add_outputs(*(File(o) for o in spec["outputs"]), stage_out=spec.get("stage_out", False))
        if spec.get("checkpoint"):
            args += ["--checkpoint", spec["checkpoint"]]
            job.add_checkpoint(File(spec["checkpoint"]), stage_out=False)
            empty = tmp_path / "data" / spec["checkpoint"]
            empty.parent.mkdir(exist_ok=True)
            empty.write_text("")
            rc.add_replica("local", spec["checkpoint"], empty.as_uri())
        for flag in ("fail_tries", "sleep"):
            if spec.get(flag):
                args += [f"--{flag.replace('_', '-')}", spec[flag]]
        for flag in ("skip_output", "until_term"):
            if spec.get(flag):
                args.append(f"--{flag.replace('_', '-')}")
        job.add_args(*args)
        for key, value in spec.get("pegasus_profiles", {}).items():
            job.profiles["pegasus"][key] = value
        wf.add_jobs(job)
    rc.write(str(run_dir / "replicas.yml"))
    tc.write(str(run_dir / "transformations.yml"))
    wf.write(str(run_dir / "workflow.yml"))
    props = Properties()
    props["dagman.retry"] = retries
    props.write(str(run_dir / "pegasus.properties"))
    return run_dir


def starts(tmp_path: Path) -> list[str]:
    log = tmp_path / "starts.log"
    return log.read_text().split() if log.exists() else []


def run(run_dir: Path, jobs: int = 2) -> tuple[int, str]:
    out = io.StringIO()
    status = run_workflow(run_dir, jobs=jobs, out=out)
    return status, out.getvalue()


DIAMOND = [
    {"id": "a", "inputs": ["in.txt"], "outputs": ["a.txt"]},
    {"id": "b", "inputs": ["a.txt"], "outputs": ["b.txt"]},
    {"id": "c", "inputs": ["a.txt"], "outputs": ["c.txt"]},
    {"id": "d", "inputs": ["b.txt", "c.txt"], "outputs": ["d.txt"], "stage_out": True},
]


def test_diamond_runs_in_dependency_order_and_stages_out(tmp_path):
    run_dir = make_workflow(tmp_path, DIAMOND, inputs={"in.txt": "IN;"})
    workflow = load_workflow(run_dir)
    assert workflow.jobs["d"].parents == {"b", "c"}
    status, output = run(run_dir)
    assert status == 0, output
    order = starts(tmp_path)
    assert order[0] == "a" and order[-1] == "d" and sorted(order) == ["a", "b", "c", "d"]
    # final output delivered, intermediate ones not
    assert (run_dir / "outputs" / "d.txt").read_text() == "IN;a;b;IN;a;c;d;"
    assert not (run_dir / "outputs" / "a.txt").exists()
    stats = json.loads((run_dir / "statistics.json").read_text())
    assert stats["totals"]["succeeded"] == 4 and stats["totals"]["retries"] == 0
    assert stats["critical_path"]["jobs"][0] == "a" and stats["critical_path"]["jobs"][-1] == "d"
    assert len(stats["critical_path"]["jobs"]) == 3
    text = (run_dir / "statistics.txt").read_text()
    assert "Critical path" in text and "succeeded" in text
    assert (run_dir / "logs" / "a.out.000").exists() and (run_dir / "logs" / "a.err.000").exists()


def test_job_failing_once_is_retried_and_keeps_its_checkpoint(tmp_path):
    jobs = [{"id": "flaky", "outputs": ["f.txt"], "fail_tries": 1, "checkpoint": "flaky.ckpt", "stage_out": True}]
    run_dir = make_workflow(tmp_path, jobs, retries=1)
    status, output = run(run_dir)
    assert status == 0, output
    assert starts(tmp_path) == ["flaky", "flaky"]
    # the second try saw the first try's checkpoint
    assert (run_dir / "scratch" / "flaky" / "flaky.ckpt").read_text() == "2"
    assert "failing on purpose, try 1" in (run_dir / "logs" / "flaky.err.000").read_text()
    stats = json.loads((run_dir / "statistics.json").read_text())
    job = stats["jobs"][0]
    assert (job["status"], job["tries"], job["exit_code"]) == ("succeeded", 2, 0)
    assert stats["totals"]["retries"] == 1
    # the initial (empty) checkpoint in the replica catalog is never written through
    assert (tmp_path / "data" / "flaky.ckpt").read_text() == ""


def test_dependents_of_a_failed_job_are_skipped_and_the_rest_runs(tmp_path):
    jobs = [dict(DIAMOND[0]), dict(DIAMOND[1], fail_tries=5), dict(DIAMOND[2], stage_out=True), dict(DIAMOND[3])]
    run_dir = make_workflow(tmp_path, jobs, retries=1, inputs={"in.txt": "IN;"})
    status, output = run(run_dir)
    assert status == 1
    stats = {job["id"]: job for job in json.loads((run_dir / "statistics.json").read_text())["jobs"]}
    assert stats["b"]["status"] == "failed" and stats["b"]["tries"] == 2 and stats["b"]["exit_code"] == 3
    assert stats["c"]["status"] == "succeeded"
    assert stats["d"]["status"] == "skipped" and "b" in stats["d"]["message"]
    assert (run_dir / "outputs" / "c.txt").exists()
    assert "FAILED b" in output


def test_missing_declared_output_fails_the_job(tmp_path):
    run_dir = make_workflow(tmp_path, [{"id": "lazy", "outputs": ["x.txt"], "skip_output": True}])
    status, _ = run(run_dir)
    assert status == 1
    job = json.loads((run_dir / "statistics.json").read_text())["jobs"][0]
    assert job["status"] == "failed" and "x.txt" in job["message"]


def test_checkpoint_time_sends_sigterm_and_the_retry_resumes(tmp_path):
    # checkpoint.time is in minutes: 0.02 min = 1.2 s
    jobs = [{"id": "long", "outputs": ["l.txt"], "checkpoint": "long.ckpt", "until_term": True,
             "pegasus_profiles": {"checkpoint.time": 0.02, "maxwalltime": 0.5}}]
    run_dir = make_workflow(tmp_path, jobs, retries=1)
    began = time.time()
    status, output = run(run_dir)
    assert status == 0, output
    assert time.time() - began < 20
    assert starts(tmp_path) == ["long", "long"]
    assert "checkpoint.time" in output


def test_rerun_skips_finished_jobs_and_reruns_changed_ones(tmp_path):
    run_dir = make_workflow(tmp_path, DIAMOND, inputs={"in.txt": "IN;"})
    assert run(run_dir)[0] == 0
    assert run(run_dir)[0] == 0
    assert sorted(starts(tmp_path)) == ["a", "b", "c", "d"]  # nothing ran twice
    stats = json.loads((run_dir / "statistics.json").read_text())
    assert stats["totals"]["reused"] == 4
    # a changed input file reruns its job and everything downstream
    data = tmp_path / "data" / "in.txt"
    data.write_text("NEW;")
    os.utime(data, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert run(run_dir)[0] == 0
    assert sorted(starts(tmp_path)) == ["a", "a", "b", "b", "c", "c", "d", "d"]
    assert (run_dir / "outputs" / "d.txt").read_text().startswith("NEW;")


def test_run_killed_part_way_resumes_without_rerunning_finished_jobs(tmp_path):
    jobs = [{"id": "first", "outputs": ["1.txt"]},
            {"id": "slow", "inputs": ["1.txt"], "outputs": ["2.txt"], "sleep": 30},
            {"id": "last", "inputs": ["2.txt"], "outputs": ["3.txt"], "stage_out": True}]
    run_dir = make_workflow(tmp_path, jobs)
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "utils.pegasus.executor", str(run_dir), "--jobs", "2"]
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
    # resume with a fast "slow" job: same job definition apart from the sleep, so edit only that
    workflow_yml = run_dir / "workflow.yml"
    workflow_yml.write_text(workflow_yml.read_text().replace("- '30'", "- '0'").replace("- 30\n", "- 0\n"))
    status, output = run(run_dir)
    assert status == 0, output
    assert starts(tmp_path) == ["first", "slow", "slow", "last"]
    stats = {job["id"]: job["status"] for job in json.loads((run_dir / "statistics.json").read_text())["jobs"]}
    assert stats == {"first": "reused", "slow": "succeeded", "last": "succeeded"}
    assert (run_dir / "outputs" / "3.txt").exists()


def test_parallel_slots_are_used(tmp_path):
    jobs = [{"id": f"p{i}", "outputs": [f"p{i}.txt"], "sleep": 1.0} for i in range(4)]
    run_dir = make_workflow(tmp_path, jobs)
    began = time.time()
    assert run(run_dir, jobs=4)[0] == 0
    elapsed = time.time() - began
    assert elapsed < 3.5, elapsed  # four 1 s jobs side by side, not 4 s in a row


def test_unknown_input_is_a_clear_error(tmp_path):
    run_dir = make_workflow(tmp_path, [{"id": "a", "inputs": ["nowhere.txt"], "outputs": ["a.txt"]}])
    out = io.StringIO()
    with pytest.raises(Exception) as error:
        load_workflow(run_dir)
    assert "nowhere.txt" in str(error.value)
    assert run_workflow(run_dir, out=out) == 2
