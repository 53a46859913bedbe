"""The whole workflow, generated and run by the local executor on tiny synthetic data.

One small run (1 HPO trial, 1 epoch, small images) that must end with the evaluation,
the compliance summary and the statistics; then a rerun that reuses every job.
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
import time
from pathlib import Path

import pytest

import workflow as generator
from pegasus_schemas import SCHEMA_DIR, validate_run_dir

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def finished_run(sample_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    args = generator.get_args_parser().parse_args([
        "--local", "--data", str(sample_dir), "--run-dir", str(run_dir), "--jobs", "2", "--seed", "3",
        "--epochs", "1", "--hpo-epochs", "1", "--trials", "1", "--hpo-jobs", "1", "--image-size", "128",
        "--augment-copies", "0", "--rare-factor", "1", "--max-size", "160", "--retries", "0",
    ])
    began = time.time()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = generator.main(args)
    return run_dir, status, time.time() - began, printed.getvalue()


def test_local_run_ends_with_evaluation_compliance_and_statistics(finished_run):
    run_dir, status, seconds, printed = finished_run
    stats = json.loads((run_dir / "statistics.json").read_text())
    failed = [job for job in stats["jobs"] if job["status"] != "succeeded"]
    assert status == 0 and not failed, failed
    outputs = run_dir / "outputs"
    for name in ("evaluation.json", "evaluation.txt", "confusion_matrix.png", "pr_curves.png",
                 "class_distribution.png", "best_hpo_params.json", "model.pt", "predictions_shard-000000.json",
                 "predictions.csv", "compliance.json", "compliance_histogram.png", "compliance_by_folder.png",
                 "optimization_history.png",
                 "loss_curve.png", "evaluation_images.json", "report.html", "report_run.json"):
        assert (outputs / name).is_file() and (outputs / name).stat().st_size > 0, name
    evaluation = json.loads((outputs / "evaluation.json").read_text())
    assert isinstance(evaluation, dict) and evaluation
    compliance = json.loads((outputs / "compliance.json").read_text())
    assert isinstance(compliance, dict) and compliance
    test_images = sum(1 for line in (run_dir / "split.csv").read_text().splitlines() if line.endswith(",test"))
    with tarfile.open(outputs / "annotated_shard-000000.tar") as annotated:
        assert len(annotated.getnames()) == test_images == compliance["num_images"]
    # intermediate files stay in scratch
    assert not (outputs / "train_set.tar").exists()
    assert (run_dir / "scratch" / "augment_train" / "train_set.tar").exists()
    assert stats["totals"] == {**stats["totals"], "jobs": 11, "succeeded": 11, "failed": 0, "skipped": 0}
    assert stats["critical_path"]["jobs"][-1] == "report"
    # the report job's page: every section, the worst test images with their errors, timings from the run records
    page = (outputs / "report.html").read_text()
    for section in ("summary", "data", "hpo", "training", "evaluation", "predictions", "timings", "provenance"):
        assert f'<section id="{section}">' in page, section
    assert page.count('class="tile"') == min(24, test_images) and "most errors are shown, worst first" in page
    assert "no <code>statistics.json</code> yet" in page and "http://" not in page and "https://" not in page
    assert "train" in stats["critical_path"]["jobs"]
    text = (run_dir / "statistics.txt").read_text()
    assert "Critical path" in text and "hpo_merge" in text
    assert "== Evaluation" in printed and "mAP@0.5" in printed
    assert "compliance:" in printed and str(outputs) in printed
    print(f"end-to-end run: {seconds:.0f} s")


def test_generated_files_of_the_run_pass_the_schemas(finished_run):
    if not SCHEMA_DIR.is_dir():
        pytest.skip(f"{SCHEMA_DIR} not found")
    run_dir = finished_run[0]
    assert all(errors == [] for errors in validate_run_dir(run_dir).values())


def test_rerun_reuses_every_finished_job(finished_run, sample_dir):
    run_dir = finished_run[0]
    before = (run_dir / "outputs" / "model.pt").stat().st_mtime_ns
    args = generator.get_args_parser().parse_args([
        "--local", "--data", str(sample_dir), "--run-dir", str(run_dir), "--jobs", "2", "--seed", "3",
        "--epochs", "1", "--hpo-epochs", "1", "--trials", "1", "--hpo-jobs", "1", "--image-size", "128",
        "--augment-copies", "0", "--rare-factor", "1", "--max-size", "160", "--retries", "0",
    ])
    assert generator.main(args) == 0
    stats = json.loads((run_dir / "statistics.json").read_text())
    assert stats["totals"]["reused"] == 11 and stats["totals"]["tries"] == 0
    assert (run_dir / "scratch" / "train" / "model.pt").stat().st_mtime_ns <= before
    assert Path(run_dir / "outputs" / "model.pt").is_file()
