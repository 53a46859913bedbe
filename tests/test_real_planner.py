"""The generated files planned by the real Pegasus 5.1 planner (../shared/pegasus, stubbed HTCondor): the condor
plan of every container variant. Skipped when the planner or Java is absent (tests/real_planner.py)."""

from __future__ import annotations

import pytest

from real_planner import PLANNER_TESTS, generate, plan_check

pytestmark = PLANNER_TESTS


@pytest.mark.parametrize("variant", [[], ["--container-type", "none"], ["--container-type", "docker"],
                                     ["--gpus", "1"]], ids=["singularity", "none", "docker", "gpus"])
def test_every_variant_plans_for_the_condor_pool(variant, sample_dir, tmp_path):
    generate(tmp_path / "run", sample_dir, *variant)
    result = plan_check(tmp_path / "run", "--details", "--work", str(tmp_path / "work"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "condor plan OK" in result.stdout
    assert "--nv --nv" not in result.stdout and "--gpus all --gpus all" not in result.stdout
