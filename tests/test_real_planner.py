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


def test_a_training_in_pieces_under_the_pools_cap_gets_its_retries_in_the_dag(sample_dir, tmp_path):
    """max_job_minutes 10: train runs in 5-minute pieces, a DAGMan retry each on top of --retries 2."""
    import math

    import yaml

    sites = tmp_path / "sites.yml"
    sites.write_text("execution_site: condorpool\ncontainer: {type: singularity, image: "
                     "'docker://maskdetection/mask-detection-workflow:latest'}\n"
                     "sites: {condorpool: {arch: x86_64, max_job_minutes: 10}}\n")
    generate(tmp_path / "run", sample_dir, "--sites-config", str(sites), "--epochs", "100", "--image-size", "512",
             "--retries", "2")
    result = plan_check(tmp_path / "run", "--work", str(tmp_path / "work"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    transformations = yaml.safe_load((tmp_path / "run" / "transformations.yml").read_text())["transformations"]
    runtime = next(int(t["profiles"]["pegasus"]["runtime"]) for t in transformations if t["name"] == "train")
    assert math.ceil(runtime / 60 / 5) > 3
    dag = next((tmp_path / "work" / "submit-condor").rglob("*.dag")).read_text().splitlines()
    assert f"RETRY train_train {2 + math.ceil(runtime / 60 / 5) - 1}" in dag
    assert "RETRY hpo_merge_hpo_merge 2" in dag


def test_a_sharedfs_site_that_is_not_the_execution_site_does_not_stop_generation(sample_dir, tmp_path):
    """sharedfs / nonsharedfs cannot be planned on the execution site (3c42832 refuses them), but the planner plans
    no other site: a sites.yml that also lists a site of another setup for other runs was refused whole."""
    sites = tmp_path / "sites.yml"
    sites.write_text("execution_site: condorpool\ncontainer: {type: singularity, image: "
                     "'docker://maskdetection/mask-detection-workflow:latest'}\n"
                     "sites:\n  condorpool: {arch: x86_64}\n  spare: {arch: x86_64, data_configuration: sharedfs}\n")
    generate(tmp_path / "run", sample_dir, "--sites-config", str(sites))
    result = plan_check(tmp_path / "run", "--work", str(tmp_path / "work"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "condor plan OK" in result.stdout
