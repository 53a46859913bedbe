"""The generated files planned by the real Pegasus 5.1 planner (../shared/pegasus, stubbed HTCondor):
the condor plan of every container variant, and a Shell run that really runs every job of a
--container-type none workflow with no hand-set PYTHONPATH. Skipped when the planner or Java is absent."""

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
pytestmark = [pytest.mark.planner, pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")]

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


def test_a_shell_run_without_a_container_runs_every_job(sample_dir, tmp_path, root):
    generate(tmp_path / "run", sample_dir, "--container-type", "none")
    result = plan_check(tmp_path / "run", "--shell-run", "--job-python", str(root / ".venv" / "bin" / "python"),
                        "--work", str(tmp_path / "work"), timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    assert "ModuleNotFoundError" not in result.stdout + result.stderr


@pytest.mark.parametrize("variant", [[], ["--container-type", "none"], ["--container-type", "docker"],
                                     ["--gpus", "1"]], ids=["singularity", "none", "docker", "gpus"])
def test_every_variant_plans_for_the_condor_pool(variant, sample_dir, tmp_path):
    generate(tmp_path / "run", sample_dir, *variant)
    result = plan_check(tmp_path / "run", "--details", "--work", str(tmp_path / "work"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "condor plan OK" in result.stdout
    assert "--nv --nv" not in result.stdout and "--gpus all --gpus all" not in result.stdout
