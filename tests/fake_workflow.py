"""A fake Pegasus workflow for the local executor's tests: tiny jobs written with Pegasus.api, the run folder
they make, and the readers of what the executor leaves behind (starts, statistics, the rerun-by-hand line)."""

from __future__ import annotations

import fcntl
import io
import json
import textwrap
import time
from pathlib import Path

from Pegasus.api import File, Job, Properties, ReplicaCatalog, Transformation, TransformationCatalog, Workflow

from utils.executor import load_workflow, run_workflow
from utils.executor.scheduler import Executor

# A fake job: records each start in a log outside the run dir, optionally fails its
# first N tries, keeps a try counter in its checkpoint file, writes its outputs (its
# inputs' content, its name and the environment variables asked for) and says so on stdout.
FAKE_JOB = textwrap.dedent("""
    import argparse, os, signal, sys, time
    p = argparse.ArgumentParser()
    p.add_argument("--name"); p.add_argument("--log")
    p.add_argument("--inputs", nargs="*", default=[]); p.add_argument("--outputs", nargs="*", default=[])
    p.add_argument("--fail-tries", type=int, default=0); p.add_argument("--checkpoint")
    p.add_argument("--sleep", type=float, default=0.0); p.add_argument("--skip-output", action="store_true")
    p.add_argument("--until-term", action="store_true"); p.add_argument("--show-env", nargs="*", default=[])
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
    content += "".join(f"{name}={os.environ.get(name, '(unset)')};" for name in a.show_env)
    for name in ([] if a.skip_output else a.outputs):
        with open(name, "w") as handle:
            handle.write(content)
    print(a.name, "wrote", *a.outputs)
""")


def make_workflow(tmp_path: Path, jobs: list[dict], retries: int = 0, inputs: dict | None = None) -> Path:
    """Write workflow.yml + catalogs + pegasus.properties for fake jobs into tmp_path/run."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
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
        if spec.get("show_env"):
            args += ["--show-env", *spec["show_env"]]
        job.add_args(*args)
        for key, value in spec.get("pegasus_profiles", {}).items():
            job.profiles["pegasus"][key] = value
        if spec.get("env"):
            job.add_env(**spec["env"])
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


def run(run_dir: Path, jobs: int = 2, cpu_count: int | None = None) -> tuple[int, str]:
    """Run the workflow; *cpu_count*: the cores the executor believes this machine has (default: its own)."""
    out = io.StringIO()
    if cpu_count is None:
        status = run_workflow(run_dir, jobs=jobs, out=out)
    else:
        status = Executor(load_workflow(run_dir), jobs=jobs, out=out, cpu_count=cpu_count).run()
    return status, out.getvalue()


def rerun_line_in(log: Path) -> str:
    """The command under "# rerun by hand:" in a try's stdout log."""
    lines = log.read_text().splitlines()
    return lines[lines.index("# rerun by hand:") + 1]


def wait_for_the_run_lock(run_dir: Path, timeout: float = 30.0) -> None:
    """Until no process (the jobs of a killed executor) holds the run folder's lock."""
    deadline = time.time() + timeout
    with open(run_dir / ".executor.lock", "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(handle, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                assert time.time() < deadline, "the run folder's lock was not released"
                time.sleep(0.05)


def job_stats(run_dir: Path) -> dict[str, dict]:
    return {job["id"]: job for job in json.loads((run_dir / "statistics.json").read_text())["jobs"]}


DIAMOND = [
    {"id": "a", "inputs": ["in.txt"], "outputs": ["a.txt"]},
    {"id": "b", "inputs": ["a.txt"], "outputs": ["b.txt"]},
    {"id": "c", "inputs": ["a.txt"], "outputs": ["c.txt"]},
    {"id": "d", "inputs": ["b.txt", "c.txt"], "outputs": ["d.txt"], "stage_out": True},
]
