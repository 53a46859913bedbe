"""The real Pegasus 5.1 planner (../shared/pegasus, stubbed HTCondor) for the planner tests: where it is,
why a test skips, and how a test generates a small workflow and plans it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import workflow as generator

PEGASUS = Path(__file__).resolve().parents[2] / "shared" / "pegasus"
PLAN_CHECK = PEGASUS / "plan-check.sh"
SKIP_REASON = (f"real planner absent ({PLAN_CHECK})" if not PLAN_CHECK.is_file() else
               "java absent (apt-get install -y default-jre-headless)" if shutil.which("java") is None else None)
PLANNER_TESTS = [pytest.mark.planner, pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")]

SMALL = ["--hpo-jobs", "1", "--trials", "1", "--hpo-epochs", "1", "--epochs", "1", "--image-size", "64",
         "--augment-copies", "0", "--rare-factor", "1", "--max-size", "160", "--retries", "0"]


def generate(run_dir: Path, data: Path, *extra: str) -> None:
    args = generator.get_args_parser().parse_args(
        ["--data", str(data), "--run-dir", str(run_dir), "--generate-only", *SMALL, *extra])
    assert generator.main(args) == 0


def plan_check(run_dir: Path, *options: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}  # as on a pool
    return subprocess.run([str(PLAN_CHECK), str(run_dir), *options], capture_output=True, text=True,
                          timeout=timeout, env=env)
