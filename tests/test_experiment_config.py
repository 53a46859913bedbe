"""Experiment files (workflow.py --config): every flag from YAML, the command line over the file, one-line
errors naming the file and the key, the effective settings in RUN_DIR/config.yml and in every job's run
record, experiments/default.yml generated from the parser, and --train-stages reaching the train job."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

import workflow as generator
from helpers import jobs_by_id, load
from utils.pegasus import experiment, replicas
from utils.executor import load_workflow
from utils.provenance import EXPERIMENT_CONFIG_FILE, file_sha256, run_record

STAGES = [{"epochs": 1, "lr": 0.02, "trainable_layers": 0, "name": "head"}, {"epochs": 3, "lr": 0.005}]


def parse(*argv) -> object:
    return generator.get_args_parser().parse_args([str(arg) for arg in argv])


def write_experiment(path: Path, settings: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(settings if isinstance(settings, str) else yaml.safe_dump(settings, sort_keys=False))
    return path


# -- experiments/default.yml ---------------------------------------------------------------------------------

def test_the_committed_default_yml_is_what_the_parser_and_the_defaults_table_write(root):
    committed = (root / "experiments" / "default.yml").read_text()
    assert committed == experiment.default_config_text(generator.get_args_parser(), root / "experiments"), (
        "experiments/default.yml is out of date: run .venv/bin/python workflow.py --write-default-config "
        "experiments/default.yml")


def test_default_yml_names_every_flag_and_loading_it_changes_nothing(root, tmp_path, monkeypatch):
    parser = generator.get_args_parser()
    settings = yaml.safe_load((root / "experiments" / "default.yml").read_text())
    assert list(settings) == list(experiment.setting_actions(parser))  # every flag, in --help's order
    assert settings["image_size"] == generator.WORKFLOW_OVERRIDES["image_size"] and settings["data"] == "../data/sample"
    # relative to the file's folder, not to the working directory
    monkeypatch.chdir(tmp_path)
    from_file, plain = vars(parse("--config", root / "experiments" / "default.yml")), vars(parse())
    for name in experiment.setting_actions(parser):
        assert experiment.plain_value(from_file[name]) == experiment.plain_value(plain[name]), name
    assert from_file["experiment"].from_file == frozenset(settings)


def test_write_default_config_writes_the_same_text_for_its_folder(tmp_path, capsys):
    target = tmp_path / "sub" / "defaults.yml"
    assert generator.main(parse("--write-default-config", target)) == 0
    assert target.read_text() == experiment.default_config_text(generator.get_args_parser(), tmp_path / "sub")
    assert str(target) in capsys.readouterr().out and not (tmp_path / "sub" / "config.yml").exists()
    # a folder is one line, exit 2 (an IsADirectoryError's traceback before)
    assert generator.main(parse("--write-default-config", tmp_path)) == 2
    assert capsys.readouterr().err == (f"workflow.py: {tmp_path}: cannot write the default settings "
                                       "(a folder, not a file to write)\n")


def test_the_example_experiments_load(root):
    examples = sorted(path for path in (root / "experiments").glob("*.yml") if path.name != "default.yml")
    assert len(examples) >= 2
    for path in examples:
        args = parse("--config", path)
        assert args.data.resolve() == (root.parent / "shared" / "datasets" / "face-mask").resolve(), path
        assert args.run_dir.resolve().parent == (root / "runs").resolve(), path
    assert len({path.read_text() for path in examples}) == len(examples)


# -- a run from an experiment file ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def experiment_run(sample_dir, tmp_path_factory):
    """An experiment in its own folder, with relative paths, generated from another working directory and
    with one flag given on the command line."""
    folder = tmp_path_factory.mktemp("experiment")
    path = write_experiment(folder / "exp" / "small.yml", {
        "data": os.path.relpath(sample_dir, folder / "exp"), "run_dir": "runs/small",
        "hpo_jobs": 1, "trials": 1, "image_size": 320, "seed": 3, "fractions": [0.6, 0.2, 0.2],
        "local": True, "train_stages": STAGES, "label_map": {"mask": "with_mask"}})
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("elsewhere"))
    try:
        args = parse("--config", path, "--image-size", "256", "--generate-only")
        assert generator.main(args) == 0
    finally:
        os.chdir(cwd)
    return path, folder / "exp" / "runs" / "small", args


def test_the_file_sets_the_flags_and_the_command_line_wins(experiment_run, sample_dir):
    path, run_dir, args = experiment_run
    assert run_dir.is_dir() and (run_dir / "workflow.yml").is_file()  # run_dir relative to the file's folder
    assert args.data.resolve() == sample_dir.resolve()
    assert (args.hpo_jobs, args.trials, args.seed, args.fractions) == (1, 1, 3, [0.6, 0.2, 0.2])
    # --image-size 256 on the command line is the parser's default too: given, it still wins over the file
    assert args.image_size == 256 == generator.WORKFLOW_OVERRIDES["image_size"]
    # --generate-only replaces the file's local: true (one of the mutually exclusive three)
    assert args.generate_only and not args.local
    assert args.experiment.from_file == frozenset(
        {"data", "run_dir", "hpo_jobs", "trials", "seed", "fractions", "train_stages", "label_map"})
    assert len(jobs_by_id(run_dir)) and "hpo_1" not in jobs_by_id(run_dir)


def test_config_yml_holds_every_effective_setting_and_the_command_line(experiment_run, sample_dir):
    path, run_dir, _ = experiment_run
    text = (run_dir / "config.yml").read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert f"--config {path} --image-size 256 --generate-only" in header[1]
    assert str(path.resolve()) in header[2] and file_sha256(path) in header[2]
    settings = yaml.safe_load(text)
    assert list(settings) == list(experiment.setting_actions(generator.get_args_parser()))
    assert settings["data"] == str(sample_dir.resolve()) and settings["run_dir"] == str(run_dir.resolve())
    assert settings["image_size"] == 256 and settings["hpo_jobs"] == 1 and settings["generate_only"] is True
    assert settings["execution_site"] == "condorpool" and settings["container_type"] == "singularity"  # sites.yml
    assert settings["label_map"] == "mask=with_mask" and settings["jobs"] >= 1
    assert settings["train_stages"] == STAGES
    # the jobs' copy: the same settings less how the run is launched
    jobs_copy = load(run_dir, EXPERIMENT_CONFIG_FILE)
    assert jobs_copy == {k: v for k, v in settings.items() if k not in experiment.LAUNCH_SETTINGS}
    # config.yml is itself an experiment file: it repeats the run
    again = parse("--config", run_dir / "config.yml")
    assert again.run_dir.resolve() == run_dir.resolve() and again.image_size == 256 and again.generate_only


def test_every_job_receives_the_settings_and_the_train_job_its_stages(experiment_run):
    _, run_dir, _ = experiment_run
    jobs = jobs_by_id(run_dir)
    for job_id, job in jobs.items():
        assert EXPERIMENT_CONFIG_FILE in [use["lfn"] for use in job["uses"] if use["type"] == "input"], job_id
    loaded = load_workflow(run_dir)  # what the local executor links into each job's folder
    assert loaded.replicas[EXPERIMENT_CONFIG_FILE] == (run_dir / EXPERIMENT_CONFIG_FILE).resolve()
    assert all(EXPERIMENT_CONFIG_FILE in spec.inputs for spec in loaded.jobs.values())
    # the stages travel as a file: a JSON text's quotes do not survive Pegasus' Shell code generator
    arguments = jobs["train"]["arguments"]
    assert arguments[arguments.index("--stages") + 1] == replicas.STAGES_FILE
    assert replicas.STAGES_FILE in [use["lfn"] for use in jobs["train"]["uses"] if use["type"] == "input"]
    assert loaded.replicas[replicas.STAGES_FILE] == (run_dir / replicas.STAGES_FILE).resolve()
    assert json.loads((run_dir / replicas.STAGES_FILE).read_text()) == [
        {"epochs": 1, "lr": 0.02, "name": "head", "trainable_layers": 0}, {"epochs": 3, "lr": 0.005}]
    assert "--stages" not in jobs["hpo_0"]["arguments"]


def test_a_jobs_run_record_holds_the_settings_it_was_handed(experiment_run, tmp_path, monkeypatch):
    _, run_dir, _ = experiment_run
    monkeypatch.chdir(tmp_path)
    assert "experiment_config" not in run_record("job", {"seed": 1})  # a by-hand run: no such file here
    (tmp_path / EXPERIMENT_CONFIG_FILE).symlink_to(run_dir / EXPERIMENT_CONFIG_FILE)  # as the executor links it
    record = run_record("job", {"seed": 1})
    assert record["experiment_config"] == load(run_dir, EXPERIMENT_CONFIG_FILE)
    assert record["experiment_config"]["image_size"] == 256
    (tmp_path / EXPERIMENT_CONFIG_FILE).unlink()
    (tmp_path / EXPERIMENT_CONFIG_FILE).write_text("- not\n- a mapping\n")
    with pytest.raises(ValueError, match=f"{EXPERIMENT_CONFIG_FILE}: the workflow's settings must be a mapping"):
        run_record("job", {})


def test_how_a_run_is_launched_leaves_the_jobs_copy_alone(experiment_run, sample_dir, tmp_path):
    """A resume with another --jobs (or --local after --generate-only) must reuse the finished jobs,
    whose signature includes this input file."""
    path, run_dir, _ = experiment_run
    other = tmp_path / "other"
    assert generator.main(parse("--config", path, "--image-size", "256", "--generate-only", "--jobs", "1",
                                "--verbose", "--run-dir", other)) == 0
    strip = lambda text: text.replace(str(other.resolve()), "RUN").replace(str(run_dir.resolve()), "RUN")  # noqa: E731
    assert strip((other / EXPERIMENT_CONFIG_FILE).read_text()) == strip((run_dir / EXPERIMENT_CONFIG_FILE).read_text())
    assert load(other, "config.yml")["jobs"] == 1


def test_stages_from_the_command_line_as_json_or_a_file_and_their_epochs_size_the_train_job(sample_dir, tmp_path):
    stages_file = tmp_path / "stages.yml"
    stages_file.write_text(yaml.safe_dump([{"epochs": 4, "trainable_layers": 0}, {"epochs": 6, "lr": 0.001}]))
    runs = {}
    for name, extra in (("plain", []), ("file", ["--train-stages", stages_file]),
                        ("json", ["--train-stages", json.dumps([{"epochs": 10}])])):
        runs[name] = tmp_path / name
        assert generator.main(parse("--data", sample_dir, "--run-dir", runs[name], "--generate-only",
                                    "--no-pretrained", *extra)) == 0
    train = {name: jobs_by_id(run_dir)["train"]["arguments"] for name, run_dir in runs.items()}
    assert "--stages" not in train["plain"] and not (runs["plain"] / replicas.STAGES_FILE).exists()
    assert "--stages" in train["file"]
    assert json.loads((runs["file"] / replicas.STAGES_FILE).read_text()) == [
        {"epochs": 4, "trainable_layers": 0}, {"epochs": 6, "lr": 0.001}]
    assert load(runs["file"], "config.yml")["train_stages"] == [{"epochs": 4, "trainable_layers": 0},
                                                                {"epochs": 6, "lr": 0.001}]

    def train_runtime(run_dir):
        transformations = {t["name"]: t for t in load(run_dir, "transformations.yml")["transformations"]}
        return int(transformations["train"]["profiles"]["pegasus"]["runtime"])

    # ten epochs in stages against the two of --epochs: the time limits follow the stages' total
    assert train_runtime(runs["file"]) == train_runtime(runs["json"]) > train_runtime(runs["plain"])


# -- errors: one line naming the file and the key ------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("epochs: big\n", "epochs: 'big' is not an integer"),
    ("epochs: 2.5\n", "epochs: 2.5 is not an integer"),
    ("image_size: 512.5\n", "image_size: 512.5: expected a whole number from 32 to 4096, got '512.5'"),
    ("image_size: 8\n", "image_size: 8: expected a whole number from 32 to 4096, got 8"),
    ("near_duplicate_distance: -2\n", "near_duplicate_distance: -2: expected a whole number from -1 to 64, got -2"),
    ("image_sise: 512\n", "image_sise: unknown setting (did you mean image_size?)"),
    ("hpo-jobs: 2\n", "hpo-jobs: unknown setting (did you mean hpo_jobs?)"),
    ("local: 'yes please'\n", "local: 'yes please' is not true or false"),
    ("no_pretrained: 1\n", "no_pretrained: 1 is not true or false"),
    ("container_type: podman\n", "container_type: 'podman' is not one of singularity, docker, none"),
    ("fractions: [0.5, 0.5]\n", "fractions: expected a list of 3 values, got [0.5, 0.5]"),
    ("fractions: [0.7, 0.1, x]\n", "fractions: 'x' is not a number"),
    ("epochs: null\n", "epochs: null is not allowed here (the default is 2)"),
    ("data: 5\n", "data: 5 is not a path"),
    ("backbone: [a]\n", "backbone: ['a'] is not text"),
    ("backbone: resnet\n", "backbone: 'resnet' is not one of mobilenet_v2_fpn, retinaface_mnet025"),
    ("train_stages: [{epochs: 0}]\n", "train_stages: stage 1: key 'epochs' must be an integer >= 1, got 0"),
    ("train_stages: [{epochs: 2, lr: -1}]\n", "train_stages: stage 1: key 'lr' must be a number > 0, got -1"),
    ("train_stages: [{epochs: 2, layers: 3}]\n", "train_stages: stage 1: unknown key 'layers'"),
    ("label_map: 'mask=face'\n", "label_map: 'mask=face' maps to 'face'"),
    ("local: true\nsubmit: true\n", "submit: cannot be true together with local"),
    ("seed: 1\nseed: 2\n", "seed: given twice (lines 1 and 2)"),
    ("config: other.yml\n", "config: not a setting an experiment file can hold"),
])
def test_a_bad_key_or_value_is_one_line_naming_the_file_and_the_key(text, expected, tmp_path, capsys):
    path = write_experiment(tmp_path / "bad.yml", text)
    with pytest.raises(SystemExit) as stopped:
        parse("--config", path)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"workflow.py: {path}: {expected}") and err.count("\n") == 1, err


def test_a_huge_bad_value_is_shown_shortened(tmp_path, capsys):
    path = write_experiment(tmp_path / "big.yml", "backbone: [" + ", ".join(["x" * 50] * 5000) + "]\n")
    with pytest.raises(SystemExit):
        parse("--config", path)
    err = capsys.readouterr().err
    assert err.startswith(f"workflow.py: {path}: backbone: ['xxx") and err.endswith(" is not text\n"), err
    assert err.count("\n") == 1 and len(err) < len(str(path)) + 200


@pytest.mark.parametrize(("text", "expected"), [
    ("- image_size: 512\n", "expected a mapping of settings (key: value) at the top level, got list"),
    ("image_size: [512\n", "not valid YAML"),
])
def test_a_file_that_is_not_a_mapping_of_settings_is_one_line(text, expected, tmp_path, capsys):
    path = write_experiment(tmp_path / "bad.yml", text)
    with pytest.raises(SystemExit):
        parse("--config", path)
    err = capsys.readouterr().err
    assert err.startswith(f"workflow.py: {path}: {expected}") and err.count("\n") == 1, err
    with pytest.raises(SystemExit):
        parse("--config", tmp_path / "missing.yml")
    assert capsys.readouterr().err == f"workflow.py: {tmp_path / 'missing.yml'}: experiment file not found\n"


@pytest.mark.parametrize(("settings", "expected"), [
    ({"hpo_jobs": 0}, "hpo_jobs: 0: need at least one HPO job"),
    ({"trials": 1, "hpo_jobs": 2}, "trials: 1 is fewer than hpo_jobs 2"),
    ({"epochs": -1}, "epochs: -1: must be at least 1"),
    ({"annotate_max": -5}, "annotate_max: -5: must be 0 or more"),
    ({"gpus": -1}, "gpus: -1: must be 0 or more"),
    ({"time_budget": 0}, "time_budget: 0: must be a positive number of minutes"),
    ({"time_budget": float("inf")}, "time_budget: inf: must be a positive number of minutes"),
    ({"folds": 1}, "folds: 1: use 0 (no cross-validation) or 2 or more folds"),
    ({"images_per_job": 0}, "images_per_job: 0: must be at least 1"),
    ({"jobs": 0}, "jobs: 0: must be at least 1"),
])
def test_values_the_workflow_refuses_name_the_file_and_key(settings, expected, sample_dir, tmp_path, capsys):
    path = write_experiment(tmp_path / "range.yml", {"data": str(sample_dir), "run_dir": "run", **settings})
    assert generator.main(parse("--config", path, "--generate-only", "--no-pretrained")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"workflow.py: {path}: {expected}") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()  # refused before the split (or anything else) was written
    # the same values given as flags: the error names the flag
    flags = [f"--{key.replace('_', '-')}" for key in settings]
    args = [item for key, flag in zip(settings, flags) for item in (flag, settings[key])]
    assert generator.main(parse("--config", path, "--generate-only", "--no-pretrained", *args)) == 2
    assert capsys.readouterr().err.startswith(f"workflow.py: {flags[0]} ")


def test_a_value_checked_against_another_names_the_file_that_gave_it(sample_dir, tmp_path, capsys):
    path = write_experiment(tmp_path / "jobs.yml", {"data": str(sample_dir), "run_dir": "run", "hpo_jobs": 3})
    assert generator.main(parse("--config", path, "--generate-only", "--no-pretrained", "--trials", "2")) == 2
    assert capsys.readouterr().err == (f"workflow.py: --trials 2 is fewer than hpo_jobs 3 (from {path}): every HPO "
                                       "job needs at least one trial\n")
    assert not (tmp_path / "run").exists()


def test_too_many_folds_from_a_file_names_the_file(sample_dir, tmp_path, capsys):
    path = write_experiment(tmp_path / "cv.yml", {"data": str(sample_dir), "run_dir": "run", "folds": 40})
    assert generator.main(parse("--config", path, "--generate-only", "--no-pretrained")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"workflow.py: {path}: folds: 40: the ") and "groups of images" in err, err
    assert "--folds" not in err and not (tmp_path / "run").exists()


def test_split_fractions_are_checked_before_the_data_is_read(sample_dir, tmp_path, capsys):
    run_dir = tmp_path / "r"
    assert generator.main(parse("--data", sample_dir, "--run-dir", run_dir, "--generate-only", "--no-pretrained",
                                "--fractions", "0.7", "-0.1", "0.4")) == 2
    assert capsys.readouterr().err == ("workflow.py: --fractions 0.7 -0.1 0.4: must be non-negative with a "
                                       "positive sum\n")
    assert not run_dir.exists()


def test_a_bad_train_stages_flag_names_the_flag(sample_dir, tmp_path, capsys):
    assert generator.main(parse("--data", sample_dir, "--run-dir", tmp_path / "r", "--generate-only",
                                "--no-pretrained", "--train-stages", '[{"epochs": 2, "trainable_layers": 9}]')) == 2
    assert capsys.readouterr().err.startswith("workflow.py: --train-stages: stage 1: key 'trainable_layers' must be")
    assert not (tmp_path / "r").exists()


def test_a_run_record_names_an_input_gone_since_the_job_listed_it_instead_of_ending_in_a_traceback(tmp_path):
    # An image deleted while predict ran was a listed skip, then the run record hashed every input again and the
    # job, its outputs written, ended in FileNotFoundError (exit 1, no run record).
    kept, gone = tmp_path / "a.jpg", tmp_path / "b.jpg"
    kept.write_bytes(b"a")
    record = run_record("predict", {}, [kept, gone])
    assert record["num_inputs"] == 2 and len(record["inputs_sha256"]) == 64
    assert record["inputs_unreadable"] == [{"file": str(gone), "problem": "No such file or directory"}]
    assert "inputs_unreadable" not in run_record("predict", {}, [kept])
