"""workflow.py: the generated workflow, catalogs and properties (schemas and structure), the submit step, and the
folds workflow pinned byte for byte."""

from __future__ import annotations

import copy
import math
import os
import shutil
from pathlib import Path

import pytest

import workflow as generator
from helpers import generate, jobs_by_id, load
from utils import defaults as D
from pegasus_schemas import schema_errors, validate_run_dir
from utils.pegasus import catalogs
from utils.pegasus.config import ConfigError, validate_container_image
from utils.executor import load_workflow, read_properties
from utils.pegasus.runtimes import GRACE_MIN, MIN_RUNTIME_S

HPO_JOBS = 3


@pytest.fixture(scope="module")
def run_dir(sample_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("generated")
    assert generate(run_dir, sample_dir, "--hpo-jobs", str(HPO_JOBS), "--trials", "5") == 0
    return run_dir


def transformations_by_name(run_dir: Path) -> dict[str, dict]:
    return {t["name"]: t for t in load(run_dir, "transformations.yml")["transformations"]}


def test_every_generated_file_passes_the_pegasus_schemas(run_dir):
    assert validate_run_dir(run_dir) == {name: [] for name in ("workflow.yml", "replicas.yml",
                                                                "transformations.yml", "sites.yml")}


def test_the_schema_check_catches_broken_files(run_dir):
    validate_run_dir(run_dir)  # skips when the schemas are absent
    workflow = load(run_dir, "workflow.yml")
    broken = copy.deepcopy(workflow)
    broken["jobs"][0]["uses"][0]["type"] = "sideways"
    assert schema_errors(broken, "wf-5.0.yml")
    sites = load(run_dir, "sites.yml")
    del sites["pegasus"]
    assert schema_errors(sites, "sc-5.0.yml")


def test_files_written(run_dir):
    for name in ("workflow.yml", "replicas.yml", "transformations.yml", "sites.yml", "pegasus.properties",
                 "workflow.dot", "validation_report.json", "split.csv"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "workflow.png").is_file() == (shutil.which("dot") is not None)
    assert "hpo_merge" in (run_dir / "workflow.dot").read_text()


def test_jobs_and_dependencies(run_dir):
    jobs = jobs_by_id(run_dir)
    hpo = [f"hpo_{i}" for i in range(HPO_JOBS)]
    assert set(jobs) == {"plot_class_distribution", "preprocess_val", "preprocess_test", "augment_train",
                         *hpo, "hpo_merge", "train", "evaluate", "predict_shard-000000", "merge_predictions", "report"}
    assert len(jobs) == 10 + HPO_JOBS
    assert {job["name"] for job in jobs.values()} == set(catalogs.JOB_SCRIPTS) - {
        "predict_video", "make_fold", "aggregate_folds"}  # no videos, no --folds
    parents = {job_id: spec.parents for job_id, spec in load_workflow(run_dir).jobs.items()}
    assert parents["plot_class_distribution"] == set()
    for job_id in hpo:
        assert parents[job_id] == {"augment_train", "preprocess_val"}
    assert parents["hpo_merge"] == set(hpo)
    assert parents["train"] == {"augment_train", "preprocess_val", "hpo_merge"}
    assert parents["evaluate"] == {"preprocess_test", "train"}
    assert parents["predict_shard-000000"] == {"train"}
    assert parents["merge_predictions"] == {"predict_shard-000000"}
    # the report comes last: it reads what the jobs showing figures and figures' data stage out
    assert {"evaluate", "merge_predictions", "hpo_merge", "train", "plot_class_distribution"} <= parents["report"]
    report_uses = {use["lfn"]: use["type"] for use in jobs["report"]["uses"]}
    assert report_uses["evaluation_images.json"] == report_uses["annotated_shard-000000.tar"] == "input"
    assert report_uses["report.html"] == "output" and "model.pt" not in report_uses
    # the explicit jobDependencies written by Pegasus.api say the same
    written = {}
    for dependency in load(run_dir, "workflow.yml")["jobDependencies"]:
        for child in dependency["children"]:
            written.setdefault(child, set()).add(dependency["id"])
    assert written["hpo_merge"] == set(hpo) and written["train"] == parents["train"]


def test_trials_are_spread_over_the_hpo_jobs(run_dir):
    jobs = jobs_by_id(run_dir)
    trials = [int(jobs[f"hpo_{i}"]["arguments"][jobs[f"hpo_{i}"]["arguments"].index("--n-trials") + 1])
              for i in range(HPO_JOBS)]
    assert trials == [2, 2, 1]
    assert generator.trials_per_worker(7, 2) == [4, 3]


def test_checkpoints_and_their_profiles(run_dir):
    # A predict job kept no checkpoint: retried on a pool (evicted, stopped at its limit) it read its whole shard
    # again, its progress file left in the stopped try's sandbox. It hands it on as one file, as train does.
    jobs = jobs_by_id(run_dir)
    replicas = {entry["lfn"]: entry["pfns"][0]["pfn"] for entry in load(run_dir, "replicas.yml")["replicas"]}
    predict_jobs = [job_id for job_id in jobs if jobs[job_id]["name"] == "predict"]
    assert predict_jobs == ["predict_shard-000000"]
    for job_id, checkpoint in [(f"hpo_{i}", f"hpo_{i}.journal") for i in range(HPO_JOBS)] + \
                              [("train", "train_checkpoint.pt")] + \
                              [(job_id, f"{job_id}_checkpoint.tar") for job_id in predict_jobs]:
        uses = {use["lfn"]: use for use in jobs[job_id]["uses"]}
        assert uses[checkpoint]["type"] == "checkpoint"
        assert uses[checkpoint]["stageOut"] is False
        profiles = jobs[job_id]["profiles"]["pegasus"]
        kind = jobs[job_id]["name"]
        runtime = int(transformations_by_name(run_dir)[kind]["profiles"]["pegasus"]["runtime"])
        # a healthy job never meets its own limits: SIGTERM only after its whole expected runtime
        assert profiles["checkpoint.time"] == math.ceil(runtime / 60)
        assert profiles["maxwalltime"] == profiles["checkpoint.time"] + GRACE_MIN
        # condorio needs the checkpoint to exist before the first try: an empty file in the catalog
        path = Path(replicas[checkpoint][len("file://"):])
        assert path.is_file() and path.stat().st_size == 0
        arguments = jobs[job_id]["arguments"]
        assert arguments[arguments.index(checkpoint) - 1] == "--checkpoint"


def test_a_training_run_in_pieces_under_the_pools_cap_gets_a_retry_for_each_piece(sample_dir, tmp_path):
    # under max_job_minutes a long train job is stopped at checkpoint.time and resumed in the next try, which
    # DAGMan (and the local executor) counts as a retry: 100 epochs in 5-minute pieces had dagman.retry's 2
    # retries, so the training failed for good after its third piece
    sites = tmp_path / "sites.yml"
    sites.write_text(f"execution_site: condorpool\ncontainer: {{type: singularity, image: {D.CONTAINER_IMAGE}}}\n"
                     "sites: {condorpool: {arch: x86_64, max_job_minutes: 10}}\n")
    run_dir = tmp_path / "run"
    assert generate(run_dir, sample_dir, "--sites-config", str(sites), "--no-pretrained", "--retries", "2",
                    "--epochs", "100", "--hpo-jobs", "1", "--trials", "1", "--hpo-epochs", "1") == 0
    jobs, loaded = jobs_by_id(run_dir), load_workflow(run_dir)
    runtime = int(transformations_by_name(run_dir)["train"]["profiles"]["pegasus"]["runtime"])
    pieces = math.ceil(runtime / 60 / (10 - GRACE_MIN))
    assert pieces > 3 and jobs["train"]["profiles"]["pegasus"]["checkpoint.time"] == 10 - GRACE_MIN
    assert jobs["train"]["profiles"]["dagman"] == {"RETRY": 2 + pieces - 1}
    assert loaded.jobs["train"].profile("dagman", "RETRY") == 2 + pieces - 1  # the local executor's tries too
    # a job that fits in one piece keeps dagman.retry
    assert "dagman" not in jobs["hpo_0"]["profiles"]


def test_stage_out_only_final_outputs(run_dir):
    stage_out = {}
    for job in jobs_by_id(run_dir).values():
        for use in job["uses"]:
            if use["type"] == "output":
                stage_out[use["lfn"]] = use["stageOut"]
    for final in ("evaluation.json", "evaluation.txt", "confusion_matrix.png", "pr_curves.png",
                  "class_distribution.png", "best_hpo_params.json", "model.pt", "predictions_shard-000000.json",
                  "predictions.csv", "compliance.json", "compliance_histogram.png", "compliance_by_folder.png",
                  "annotated_shard-000000.tar"):
        assert stage_out[final] is True, final
    for intermediate in ("train_set.tar", "val_set.tar", "test_set.tar", "best_0.json"):
        assert stage_out[intermediate] is False, intermediate
    # annotated images travel as one .tar per prediction shard, never one file per image
    assert [lfn for lfn in stage_out if lfn.startswith("annotated_")] == ["annotated_shard-000000.tar"]


def test_resources_are_transformation_profiles(run_dir):
    tc = load(run_dir, "transformations.yml")
    transformations = {t["name"]: t for t in tc["transformations"]}
    assert set(transformations) == set(catalogs.JOB_SCRIPTS)
    for kind, transformation in transformations.items():
        site = transformation["sites"][0]
        assert site["type"] == "stageable"
        assert Path(site["pfn"]) == (generator.ROOT / catalogs.JOB_SCRIPTS[kind]).resolve()
        assert site["container"] == catalogs.CONTAINER_NAME
        profile = transformation["profiles"]["pegasus"]
        resources = catalogs.RESOURCES[kind]
        assert profile["cores"] == resources["cores"]
        assert profile["memory"] == int(resources["memory"].split()[0]) * 1024
        assert int(profile["runtime"]) >= MIN_RUNTIME_S
    (container,) = tc["containers"]
    assert container["type"] == "singularity"
    validate_container_image(container["image"])


def test_replicas_are_absolute_file_urls_of_existing_files(run_dir):
    replicas = load(run_dir, "replicas.yml")["replicas"]
    lfns = {entry["lfn"] for entry in replicas}
    assert "split.csv" in lfns
    for entry in replicas:
        (pfn,) = entry["pfns"]
        assert pfn["site"] == "local"
        assert pfn["pfn"].startswith("file:///"), pfn
        assert Path(pfn["pfn"][len("file://"):]).is_file(), pfn
    # every job input that no job produces has a replica
    produced = set()
    inputs = set()
    for job in jobs_by_id(run_dir).values():
        for use in job["uses"]:
            (inputs if use["type"] == "input" else produced).add(use["lfn"])
    assert inputs - produced <= lfns


def test_pretrained_weights_travel_as_an_input_when_cached(run_dir):
    """The default backbone's own file (the converted RetinaFace), or the fallback's where it is absent."""
    from utils.detection.weights import job_weights

    backbone, cached, _ = job_weights(D.BACKBONE)
    jobs = jobs_by_id(run_dir)
    for job_id in ("hpo_0", "train"):
        lfns = {use["lfn"] for use in jobs[job_id]["uses"]}
        arguments = jobs[job_id]["arguments"]
        assert arguments[arguments.index("--backbone") + 1] == backbone
        assert ("--weights-file" in arguments) == (cached is not None)
        if cached is not None:
            assert cached.name in lfns and arguments[arguments.index("--weights-file") + 1] == cached.name


def test_properties(run_dir):
    properties = read_properties(run_dir / "pegasus.properties")
    assert properties["pegasus.data.configuration"] == "condorio"
    assert int(properties["dagman.retry"]) >= 1
    assert "pegasus.mode" in properties and "pegasus.transfer.threads" in properties
    for catalog, name in (("replica", "replicas.yml"), ("transformation", "transformations.yml"),
                          ("site", "sites.yml")):
        assert properties[f"pegasus.catalog.{catalog}.file"] == str(run_dir.resolve() / name)


def test_site_catalog(run_dir):
    sites = {site["name"]: site for site in load(run_dir, "sites.yml")["sites"]}
    directories = {d["type"]: d for d in sites["local"]["directories"]}
    assert set(directories) == {"sharedScratch", "localStorage"}
    for directory in directories.values():
        assert Path(directory["path"]).is_absolute()
        assert directory["fileServers"][0]["url"] == Path(directory["path"]).as_uri()
    assert Path(directories["localStorage"]["path"]) == run_dir.resolve() / "outputs"
    condorpool = sites["condorpool"]["profiles"]
    assert condorpool["pegasus"]["style"] == "condor"
    assert condorpool["condor"]["universe"] == "vanilla"


def test_flags_change_properties_container_and_gpus(sample_dir, tmp_path):
    run_dir = tmp_path / "gpu"
    assert generate(run_dir, sample_dir, "--gpus", "1", "--container-type", "docker",
                    "--container-image", "docker://someone/mask:1.2", "--retries", "5", "--mode", "production",
                    "--transfer-threads", "8", "--hpo-jobs", "1", "--trials", "1") == 0
    properties = read_properties(run_dir / "pegasus.properties")
    assert properties["dagman.retry"] == "5" and properties["pegasus.mode"] == "production"
    assert properties["pegasus.transfer.threads"] == "8"
    assert properties["pegasus.data.configuration"] == "condorio"
    (container,) = load(run_dir, "transformations.yml")["containers"]
    assert container == {"name": catalogs.CONTAINER_NAME, "type": "docker", "image": "docker://someone/mask:1.2"}
    jobs = jobs_by_id(run_dir)
    assert len(jobs) == 11
    for job_id, job in jobs.items():
        pegasus = job.get("profiles", {}).get("pegasus", {})
        if job["name"] in ("hpo", "train", "evaluate", "predict"):
            # Pegasus adds --gpus all / --nv for a gpus profile; the generator must not add them again
            assert pegasus["gpus"] == 1 and "container.arguments" not in pegasus, job_id
        else:
            assert "gpus" not in pegasus, job_id
    assert validate_run_dir(run_dir)["transformations.yml"] == []


def test_no_container(sample_dir, tmp_path):
    run_dir = tmp_path / "bare"
    assert generate(run_dir, sample_dir, "--container-type", "none") == 0
    tc = load(run_dir, "transformations.yml")
    assert "containers" not in tc
    assert all("container" not in t["sites"][0] for t in tc["transformations"])


@pytest.mark.parametrize("image", ["docker:///owner/name:tag", "docker://name:tag", "owner/name:tag",
                                   "docker://owner/name", "docker://owner/:tag", "shub://owner/name:tag"])
def test_bad_container_images_are_refused(image, sample_dir, tmp_path, capsys):
    with pytest.raises(ConfigError):
        validate_container_image(image)
    assert generate(tmp_path / "bad", sample_dir, "--container-image", image) == 2
    assert "--container-image" in capsys.readouterr().err


def test_generation_is_deterministic(sample_dir, tmp_path, run_dir):
    again = tmp_path / run_dir.name  # the same run's name (the report job is given it), in another place
    assert generate(again, sample_dir, "--hpo-jobs", str(HPO_JOBS), "--trials", "5") == 0
    strip = lambda text: [line for line in text.replace(str(again.resolve()), "RUN").replace(  # noqa: E731
        str(run_dir.resolve()), "RUN").splitlines() if "createdOn" not in line]
    for name in ("workflow.yml", "replicas.yml", "transformations.yml", "sites.yml", "split.csv"):
        assert strip((again / name).read_text()) == strip((run_dir / name).read_text()), name


def test_submit_without_pegasus_prints_the_plan_command(sample_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(generator.shutil, "which", lambda name: None)
    run_dir = tmp_path / "submit"
    args = generator.get_args_parser().parse_args(
        ["--data", str(sample_dir), "--run-dir", str(run_dir), "--submit"])
    assert generator.main(args) == 3
    err = capsys.readouterr().err
    assert "pegasus-plan is not on PATH" in err
    assert f"--conf {run_dir.resolve() / 'pegasus.properties'}" in err
    assert "--sites condorpool" in err and "--submit" in err and str(run_dir.resolve() / "workflow.yml") in err


def test_time_budget_reaches_the_train_job_only_when_given(sample_dir, tmp_path, run_dir, capsys):
    def train_args(directory):
        (train,) = [job for job in jobs_by_id(directory).values() if job["name"] == "train"]
        return [str(a) for a in train["arguments"]]

    assert "--time-budget" not in train_args(run_dir)  # the default: --epochs
    budget = tmp_path / "budget"
    assert generate(budget, sample_dir, "--time-budget", "7.5", "--hpo-jobs", "1", "--trials", "1") == 0
    args = train_args(budget)
    assert args[args.index("--time-budget") + 1] == "7.5"
    assert generate(tmp_path / "bad", sample_dir, "--time-budget", "0") == 2
    assert "--time-budget 0: must be a positive number of minutes" in capsys.readouterr().err


def test_the_submit_host_as_execution_site_needs_no_container(sample_dir, tmp_path, capsys):
    """Pegasus runs sharedfs jobs on the submit host with plain kickstart: a container there would be dropped."""
    assert generate(tmp_path / "local_docker", sample_dir, "--execution-site", "local",
                    "--container-type", "docker") == 2
    assert "--execution-site local runs jobs without a container" in capsys.readouterr().err
    assert generate(tmp_path / "local_bare", sample_dir, "--execution-site", "local", "--container-type", "none",
                    "--hpo-jobs", "1", "--trials", "1") == 0
    properties = read_properties(tmp_path / "local_bare" / "pegasus.properties")
    assert properties["pegasus.data.configuration"] == "sharedfs"


def test_the_planner_output_goes_to_a_log_file_and_submit_prints_a_short_summary(tmp_path, capsys):
    import io
    import logging

    import Pegasus.client._client  # noqa: F401  (installs the pegasus.client console handler)
    from utils.pegasus.driver import submit_summary
    from utils.pegasus.pegasus_api import planner_output_to

    logger = logging.getLogger("pegasus.client")
    handlers = list(logger.handlers)
    terminal = io.StringIO()  # workflow.main's logging.basicConfig: a root handler on the terminal
    root_handler = logging.StreamHandler(terminal)
    logging.getLogger().addHandler(root_handler)
    try:
        with planner_output_to(tmp_path / "pegasus-plan.log"):
            logger.info("2026.12.02 DEBUG [Planner] one of a thousand lines")
    finally:
        logging.getLogger().removeHandler(root_handler)
    assert "one of a thousand lines" in (tmp_path / "pegasus-plan.log").read_text()
    captured = capsys.readouterr()
    assert "thousand" not in captured.out + captured.err + terminal.getvalue()
    assert logger.handlers == handlers and logger.propagate
    summary = submit_summary("/submit/run0001", tmp_path / "pegasus-plan.log")
    assert len(summary.splitlines()) == 6 and "pegasus-status -l /submit/run0001" in summary


def test_submit_without_a_planner_says_to_generate_on_the_submit_host_not_to_copy_the_folder(capsys):
    # The catalogs hold this machine's absolute paths: a run folder copied elsewhere does not plan.
    from types import SimpleNamespace

    from utils.pegasus.driver import submit

    generator = SimpleNamespace(plan_command=lambda: ["pegasus-plan", "--conf", "/here/run/pegasus.properties"])
    assert submit(generator, has_planner=False) == 3
    err = capsys.readouterr().err
    # the command shown is pegasus-plan's: it may not be called "this workflow.py command"
    assert "Run the same workflow.py command on one" in err and "this workflow.py command" not in err
    assert "at the same paths" in err and "pegasus-plan --conf /here/run/pegasus.properties" in err
    assert "Copy" not in err


def test_properties_are_for_a_production_pool(run_dir):
    properties = read_properties(run_dir / "pegasus.properties")
    assert properties["pegasus.mode"] == "production" and int(properties["dagman.retry"]) >= 3


def test_without_a_container_the_jobs_run_the_installed_project_with_it_on_pythonpath(sample_dir, tmp_path, root):
    run_dir = tmp_path / "installed"
    assert generate(run_dir, sample_dir, "--container-type", "none", "--hpo-jobs", "1", "--trials", "1") == 0
    for transformation in load(run_dir, "transformations.yml")["transformations"]:
        # installed on the execution site (and the submit host, for Shell runs), not staged into a scratch
        # folder where `utils` would be missing
        assert [site["name"] for site in transformation["sites"]] == ["condorpool", "local"]
        for site in transformation["sites"]:
            assert site["type"] == "installed"
            assert Path(site["pfn"]) == (root / catalogs.JOB_SCRIPTS[transformation["name"]]).resolve()
            assert site["profiles"]["env"]["PYTHONPATH"] == str(root.resolve())
            assert os.access(site["pfn"], os.X_OK)  # an installed transformation is executed as it is

    sites = tmp_path / "sites.yml"
    sites.write_text((root / "sites.yml").read_text().replace(
        "    # software_dir: /cvmfs/example.org/mask-detection-workflow",
        "    software_dir: /cvmfs/example.org/mask-detection-workflow"))
    assert generate(tmp_path / "cvmfs", sample_dir, "--container-type", "none", "--sites-config", str(sites),
                    "--hpo-jobs", "1", "--trials", "1") == 0
    (train,) = [t for t in load(tmp_path / "cvmfs", "transformations.yml")["transformations"]
                if t["name"] == "train"]
    pool, local = train["sites"]
    assert pool["pfn"] == "/cvmfs/example.org/mask-detection-workflow/bin/train.py"
    assert pool["profiles"]["env"]["PYTHONPATH"] == "/cvmfs/example.org/mask-detection-workflow"
    assert local["pfn"] == str((root / "bin" / "train.py").resolve())


# -- the generated DAG, pinned -------------------------------------------------------------------------------

GOLDEN_FOLDS = Path(__file__).parent / "golden" / "workflow_folds.yml"


def test_the_folds_workflow_is_the_pinned_one_byte_for_byte(sample_dir, tmp_path):
    """workflow.yml of --folds 2 --fold-ensemble (every job kind but predict_video), less its x-pegasus header
    (who generated it and when), against tests/golden/workflow_folds.yml. A refactoring of the generator must
    leave it unchanged; a change meant to alter the DAG rewrites the file with UPDATE_GOLDEN=1 and shows the
    difference in its commit."""
    run_dir = tmp_path / "folds"
    assert generate(run_dir, sample_dir, "--folds", "2", "--fold-ensemble", "--no-pretrained") == 0
    text = (run_dir / "workflow.yml").read_text()
    header, _, body = text.partition("\npegasus: ")
    assert header.startswith("x-pegasus:") and "\n  createdOn: " in header
    generated = f"pegasus: {body}"
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN_FOLDS.parent.mkdir(exist_ok=True)
        GOLDEN_FOLDS.write_text(generated)
    assert generated == GOLDEN_FOLDS.read_text(), "workflow.yml changed: see the test's docstring"
