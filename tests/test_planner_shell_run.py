"""A Shell run by the real Pegasus 5.1 planner that really runs every job of a --container-type none
workflow with no hand-set PYTHONPATH. Skipped when the planner or Java is absent (tests/real_planner.py).
A file of its own: it is the suite's longest test, make test hands each file to one worker, and this
one first (by its name and the planner marker)."""

from __future__ import annotations

import os

from real_planner import PLANNER_TESTS, generate, plan_check

pytestmark = PLANNER_TESTS


def job_python(folder, python) -> str:
    """*python* behind a wrapper that drops PYTHONPYCACHEPREFIX. The planner's env.sh points it at an empty
    state folder so that Pegasus' own tools never write byte-code into the read-only bundle; jobs that
    inherited it (with PYTHONDONTWRITEBYTECODE, as here) would compile torch from source in every job,
    twice the CPU of the same job on a pool node, where a job gets its own environment."""
    wrapper = folder / "python3"
    wrapper.write_text(f'#!/bin/sh\nunset PYTHONPYCACHEPREFIX\nexec "{python}" "$@"\n')
    wrapper.chmod(0o755)
    return os.fspath(wrapper)


def test_a_shell_run_without_a_container_runs_every_job(sample_dir, tmp_path, root):
    generate(tmp_path / "run", sample_dir, "--container-type", "none")
    python = job_python(tmp_path, root / ".venv" / "bin" / "python")
    # Two of Pegasus' own settings, for time only (115 s against 152 s): pegasus-transfer starts its threads 2 s
    # apart, so properties.conf's 4 made every stage job last 6 s, and integrity checking spawns a checksum process
    # per staged file (14 s of CPU for 50 files). The condor plans in test_real_planner.py keep the project's.
    result = plan_check(tmp_path / "run", "--shell-run", "--job-python", python, "--work", str(tmp_path / "work"),
                        "--", "-Dpegasus.integrity.checking=none", "-Dpegasus.transfer.threads=1", timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    assert "ModuleNotFoundError" not in result.stdout + result.stderr
