"""Every bad flag value is one line and exit 2, never a traceback (issue #23): every bin/ script (serve.py has its
own tests) and workflow.py run with values argparse's own types let through before: negative or zero counts and
sizes, nan and inf, numbers out of range, missing or wrong files. Values are checked by the shared argparse types
of utils/cli.py, so a flag is refused the same way in every script that has it."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import load_script, run_in_one_process
from utils.cli import (fraction, fraction_below_one, image_size_px, non_negative_float, positive_int, random_seed,
                       run_job, worker_count)
from utils.detection.params import PARAM_TYPES, ParamsFileError, read_params_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "bin").glob("*.py") if p.stem != "serve")
MISSING = "/nonexistent/input"


@pytest.fixture(scope="module")
def paths(sample_dir, tiny_model_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("flags")
    notes = folder / "notes.txt"
    notes.write_text("not what any job reads\n")
    manifest = folder / "manifest.csv"
    images = sorted((sample_dir / "images").iterdir())
    manifest.write_text("image,annotation\n" + "".join(f"{p.name},{p.stem}.xml\n" for p in images))
    bad_params = folder / "bad_params.json"
    bad_params.write_text('{"best_params": {"lr": 0.01, "batch_size": Infinity}}')
    return {"PARAMS": str(bad_params),
            "I": str(sample_dir / "images"), "A": str(sample_dir / "annotations"), "MODEL": str(tiny_model_file),
            "OUT": str(folder / "out"), "TXT": str(notes), "CSV": str(manifest)}


def fill(argv, paths):
    return [paths.get(arg, arg) for arg in argv]


HPO = ["--train-images", "I", "--train-annotations", "A", "--val-images", "I", "--val-annotations", "A",
       "--output", "OUT"]
TRAIN = ["--images", "I", "--annotations", "A", "--output", "OUT"]
EVALUATE = ["--images", "I", "--annotations", "A", "--model", "MODEL", "--output-dir", "OUT"]
PREDICT = ["--images", "I", "--model", "MODEL", "--output-dir", "OUT"]
VIDEO = ["--source", MISSING, "--model", "MODEL", "--output-dir", "OUT"]

# (script, arguments, words the one line holds)
CASES = [
    ("aggregate_folds", ["--inputs", MISSING, "--output-dir", "OUT"], "not found"),
    ("aggregate_folds", ["--inputs", "TXT", "--output-dir", "OUT"], "not an evaluation.json"),
    ("augment", ["--images", "I", "--output-dir", "OUT", "--copies", "-1"], "--copies"),
    ("augment", ["--images", "I", "--output-dir", "OUT", "--noise-std", "nan"], "--noise-std"),
    ("augment", ["--images", "I", "--output-dir", "OUT", "--quality", "0"], "--quality"),
    ("augment", ["--images", MISSING, "--output-dir", "OUT"], "does not exist (expected a folder or a .tar archive)"),
    ("compare_runs", [MISSING], "run folder not found"),
    ("evaluate", [*EVALUATE, "--workers", "-5"], "--workers"),
    ("evaluate", [*EVALUATE, "--score-threshold", "nan"], "--score-threshold"),
    ("evaluate", [*EVALUATE, "--batch-size", "0"], "--batch-size"),
    ("evaluate", [*EVALUATE[:-3], "TXT", "--output-dir", "OUT"], "not a readable model file"),
    ("hpo", [*HPO, "--lr-range", "1", "-1"], "--lr-range"),
    ("hpo", [*HPO, "--lr-range", "0.1", "0.01"], "--lr-range: MIN 0.1 is above MAX 0.01"),
    ("hpo", [*HPO, "--weight-decay-range", "0", "0.1"], "--weight-decay-range"),
    ("hpo", [*HPO, "--momentum-range", "1", "1"], "--momentum-range"),
    ("hpo", [*HPO, "--batch-sizes", "4", "0"], "--batch-sizes"),
    ("hpo", [*HPO, "--timeout", "-1"], "--timeout"),
    ("hpo", [*HPO, "--image-size", "100000"], "--image-size"),
    ("hpo", [*HPO, "--workers", "-2"], "--workers"),
    ("hpo_merge", ["--inputs", "TXT"], "not valid JSON"),
    ("make_fold", ["--train-set", "I", "--val-set", "I", "--folds-csv", "TXT", "--fold", "-1",
                   "--output-train", "OUT", "--output-val", "OUT", "--output-held-out", "OUT"], "--fold"),
    ("make_fold", ["--train-set", "I", "--val-set", "I", "--folds-csv", "TXT", "--fold", "0",
                   "--output-train", "OUT", "--output-val", "OUT", "--output-held-out", "OUT"], "missing column"),
    ("make_sample_data", ["--out", "OUT", "--num-images", "-3"], "num_images must be at least 1"),
    ("make_sample_data", ["--out", "OUT", "--image-size", "0", "-5"], "--image-size"),
    ("make_sample_data", ["--out", "OUT", "--min-faces", "5", "--max-faces", "2"], "min_faces"),
    ("make_shards", ["--images", "I", "--output", "OUT", "--workers", "-2"], "--workers"),
    ("make_shards", ["--images", "I", "--output", "OUT", "--shard-size", "0"], "--shard-size"),
    ("merge_predictions", ["--inputs", "TXT", "--output-dir", "OUT", "--expected", "-1"], "--expected"),
    ("merge_predictions", ["--inputs", "TXT", "--output-dir", "OUT"], "not a predictions file"),
    ("plot_class_distribution", ["--split-csv", "TXT"], "no 'image' column"),
    ("predict", [*PREDICT, "--annotate-max", "-1"], "--annotate-max"),
    ("predict", [*PREDICT, "--workers", "-7"], "--workers"),
    ("predict", [*PREDICT, "--score-threshold", "inf"], "--score-threshold"),
    ("predict", [*PREDICT, "--explain-max-boxes", "0"], "--explain-max-boxes"),
    ("predict", ["--images", MISSING, MISSING + "2", "--model", "MODEL", "--output-dir", "OUT"],
     "no such file or folder (nor do the other 1"),
    ("predict_video", [*VIDEO, "--stride", "0"], "--stride"),
    ("predict_video", [*VIDEO, "--max-seconds", "nan"], "--max-seconds"),
    ("predict_video", [*VIDEO, "--score-threshold", "1.5"], "--score-threshold"),
    ("predict_video", ["--source", "TXT", "--model", "MODEL", "--output-dir", "OUT"], "cannot open the file"),
    ("preprocess", ["--images", "I", "--output-dir", "OUT", "--max-size", "-4"], "--max-size"),
    ("preprocess", ["--images", "I", "--output-dir", "OUT", "--quality", "101"], "--quality"),
    ("report", [MISSING], "run folder not found"),
    ("report", ["TXT"], "not a folder"),
    ("split_data", ["--manifest", "CSV", "--fractions", "0.5", "0.6", "-0.1"], "--fractions"),
    ("split_data", ["--manifest", "CSV", "--seed", "-1"], "--seed"),
    ("split_data", ["--manifest", "TXT"], "no 'image' column"),
    ("validate_data", ["--images", "I", "--annotations", "A", "--output-dir", "OUT", "--workers", "-3"], "--workers"),
    ("validate_data", ["--images", MISSING, "--annotations", "A", "--output-dir", "OUT"], "does not exist"),
    ("validate_data", ["--images", "I", "--annotations", "A", "--output-dir", "OUT", "--near-duplicate-distance",
                       "65"], "--near-duplicate-distance: expected a whole number from -1 to 64"),
    ("train", [*TRAIN, "--lr", "-1"], "--lr"),
    ("train", [*TRAIN, "--batch-size", "0"], "--batch-size"),
    ("train", [*TRAIN, "--momentum", "-3"], "--momentum"),
    ("train", [*TRAIN, "--momentum", "5"], "--momentum: expected a number from 0 to below 1"),  # AdamW's beta1
    ("train", [*TRAIN, "--val-annotations", "A"], "--val-annotations needs --val-images"),
    ("train", [*TRAIN, "--weight-decay", "nan"], "--weight-decay"),
    ("train", [*TRAIN, "--workers", "-3"], "--workers"),
    ("train", [*TRAIN, "--time-budget", "nan"], "--time-budget"),
    ("train", [*TRAIN, "--hflip", "2"], "--hflip"),
    ("train", [*TRAIN, "--warmup-iters", "-2"], "--warmup-iters"),
    ("train", [*TRAIN, "--image-size", "100000"], "--image-size"),
    ("train", [*TRAIN, "--trainable-layers", "-1"], "--trainable-layers"),
    ("train", [*TRAIN, "--freeze-backbone-epochs", "-1"], "--freeze-backbone-epochs"),
    ("train", [*TRAIN, "--epochs", "0"], "--epochs"),
    ("train", [*TRAIN, "--clip-grad", "nan"], "--clip-grad"),
    ("train", [*TRAIN, "--max-steps", "0"], "--max-steps"),
    ("train", [*TRAIN, "--photometric", "1.5"], "--photometric"),
    ("train", [*TRAIN, "--multiscale", "-0.5"], "--multiscale"),
    ("train", [*TRAIN, "--repeat-threshold", "inf"], "--repeat-threshold"),
    ("train", [*TRAIN, "--ema-decay", "5"], "--ema-decay"),
    ("train", [*TRAIN, "--ema-decay", "1"], "--ema-decay"),
    ("train", [*TRAIN, "--roi-batch-size", "-4"], "--roi-batch-size"),
    ("train", [*TRAIN, "--roi-batch-size", "2"], "--roi-batch-size"),
    ("train", [*TRAIN, "--roi-fg-iou", "0"], "--roi-fg-iou"),
    ("train", [*TRAIN, "--roi-fg-iou", "1"], "--roi-fg-iou"),
    ("train", [*TRAIN, "--roi-bg-iou", "0"], "--roi-bg-iou"),
    ("train", [*TRAIN, "--roi-fg-iou", "0.5", "--roi-bg-iou", "0.6"], "--roi-bg-iou 0.6 is above --roi-fg-iou 0.5"),
    ("train", [*TRAIN, "--box-loss", "l2"], "--box-loss"),
    ("train", [*TRAIN, "--seed", "-1"], "--seed"),
    ("train", [*TRAIN, "--seed", str(2**64)], "--seed"),
    ("train", [*TRAIN, "--tensorboard-every", "0"], "--tensorboard-every"),
    ("train", [*TRAIN, "--params", "PARAMS"], "bad_params.json: batch_size: expected a whole number of at least 1"),
    ("train", ["--images", MISSING, "--annotations", "A", "--output", "OUT"],
     "does not exist (expected a folder or a .tar archive)"),
]


def test_every_script_but_the_service_has_bad_values_here():
    assert {script for script, _, _ in CASES} == set(SCRIPTS)


def one_error_line(err: str) -> str:
    """The error line of stderr: argparse's usage lines (and their continuations) left out; exactly one other."""
    lines = [line for line in err.splitlines()
             if line.strip() and not line.startswith(("usage:", " "))]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(("script", "argv", "words"), CASES,
                         ids=[f"{script}:{' '.join(argv[-2:])}" for script, argv, _ in CASES])
def test_a_bad_value_is_one_line_and_exit_2(paths, capsys, script, argv, words):
    module = load_script(ROOT, script)
    try:
        code = run_job(module.main, module.get_args_parser(), fill(argv, paths), job=script)
    except SystemExit as stop:  # argparse's own exit for a value its type refused
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    line = one_error_line(err)
    assert ": error: " in line and words in line, line


WORKFLOW_CASES = [
    (["--seed", "-1"], "--seed"), (["--image-size", "5"], "--image-size"), (["--noise-std", "nan"], "--noise-std"),
    (["--max-size", "-1"], "--max-size"), (["--score-threshold", "3"], "--score-threshold"),
    (["--augment-copies", "-1"], "--augment-copies"), (["--retries", "-1"], "--retries"),
    (["--time-budget", "nan"], "--time-budget"), (["--time-budget", "inf"], "--time-budget inf: must be a positive"),
    (["--epochs", "0"], "--epochs"), (["--train-stages", ""], "--train-stages empty: give a JSON list"),
    (["--sites-config", "SITES_DIR"], "Is a directory"), (["--data", MISSING], "not found"),
    (["--seed", "4294967296"], "0 to 4294967295"),  # Optuna's sampler and numpy take 32-bit seeds only
    (["--near-duplicate-distance", "-2"], "--near-duplicate-distance: expected a whole number from -1 to 64"),
    (["--backbone", "foo"], "argument --backbone: invalid choice: 'foo'"),  # hpo and train would refuse it later
    # an empty path is not the current folder (which `.` says), as in an experiment file
    *(([flag, ""], f"argument {flag}: expected a path, got an empty value") for flag in (
        "--run-dir", "--data", "--pred-images", "--pred-videos", "--sites-config", "--properties", "--config")),
]


@pytest.mark.parametrize(("argv", "words"), WORKFLOW_CASES, ids=[" ".join(argv) for argv, _ in WORKFLOW_CASES])
def test_workflow_refuses_a_bad_value_in_one_line(sample_dir, tmp_path, capsys, argv, words):
    import workflow

    argv = [str(tmp_path) if arg == "SITES_DIR" else arg for arg in argv]
    try:
        args = workflow.get_args_parser().parse_args(
            ["--data", str(sample_dir), "--run-dir", str(tmp_path / "run"), "--generate-only", *argv])
        code = workflow.main(args)
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert words in one_error_line(err)


def test_workflow_takes_near_duplicate_distance_minus_one_to_turn_the_search_off(sample_dir, tmp_path):
    """-1: no near-duplicate search, as workflow.py --help, experiments/default.yml and bin/validate_data.py say and
    the flag's type takes; the driver's own check refused it ('--near-duplicate-distance -1: must be at least 0')."""
    import json

    import workflow

    run_dir = tmp_path / "run"
    args = workflow.get_args_parser().parse_args(["--data", str(sample_dir), "--run-dir", str(run_dir),
                                                  "--generate-only", "--no-pretrained",
                                                  "--near-duplicate-distance", "-1"])
    assert workflow.main(args) == 0
    assert json.loads((run_dir / "validation_report.json").read_text())["near_duplicate_distance"] == -1


def test_the_real_scripts_exit_2_in_one_line(paths):
    for script, argv in (("predict", [*PREDICT, "--workers", "-7"]), ("train", [*TRAIN, "--lr", "nan"])):
        proc = subprocess.run([sys.executable, str(ROOT / "bin" / f"{script}.py"), *fill(argv, paths)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert one_error_line(proc.stderr).startswith(f"{script}.py: error: argument ")


def test_the_jobs_refuse_a_bad_flag_or_a_missing_input_before_importing_torch(tmp_path):
    """train, predict, evaluate, hpo, augment and predict_video imported torch (~5 s of a 2-core machine) before
    they parsed their flags, or found their input or model file missing: each refusal waited for an import it never
    used. One process runs them all, as their __main__ does; torch must still be unimported at the end."""
    missing, model, clip = tmp_path / "none", tmp_path / "none.pt", tmp_path / "clip.mp4"
    clip.write_bytes(b"")
    refusals = {  # argv: the one error line
        "bin/train.py --box-loss huber": "train.py: error: argument --box-loss: invalid choice: 'huber' (choose "
                                         "from 'smooth_l1', 'giou')",
        "bin/train.py --budget-plan 0,40": "train.py: error: argument --budget-plan: --budget-plan: the first plan "
                                           "must be a positive number of steps, got 0",
        "bin/train.py --backbone resnet18": "train.py: error: argument --backbone: invalid choice: 'resnet18' (choose "
                                            "from 'mobilenet_v2_fpn', 'retinaface_mnet025', 'mobilenet_v3_large_fpn', "
                                            "'resnet50_fpn', 'resnet50_fpn_v2')",
        f"bin/train.py --images {tmp_path} --annotations {tmp_path} --tensorboard-tar {tmp_path}/tb.tar":
            "train: error: --tensorboard-tar needs --tensorboard-dir (the folder it packs)",
        f"bin/train.py --images {tmp_path} --annotations {tmp_path} --label-map mask":
            "train: error: --label-map: 'mask' is not a SOURCE=CLASS pair",
        "bin/predict.py --explain-method lime": "predict.py: error: argument --explain-method: invalid choice: 'lime' "
                                                "(choose from 'hirescam', 'gradcam', 'eigencam')",
        f"bin/predict.py --images {missing} --model {model} --output-dir {tmp_path}":
            f"predict: error: {missing}: no such file or folder",
        f"bin/predict.py --images {tmp_path} --model {model} --output-dir {tmp_path}":
            f"predict: error: {model}: model file not found",
        "bin/evaluate.py --batch-size 0": "evaluate.py: error: argument --batch-size: expected a whole number of at "
                                          "least 1, got 0",
        f"bin/evaluate.py --images {tmp_path} --annotations {tmp_path} --model {model} --output-dir {tmp_path}":
            f"evaluate: error: {model}: model file not found",
        "bin/hpo.py --objective f1": "hpo.py: error: argument --objective: invalid choice: 'f1' (choose from "
                                     "'fitness', 'map')",
        "bin/augment.py --copies -1": "augment.py: error: argument --copies: expected a whole number of at least 0, "
                                      "got -1",
        "bin/predict_video.py --output-video out.gif": "predict_video.py: error: argument --output-video: expected a "
                                                       "video file name ending .mp4, .avi, .mkv, .mov, got 'out.gif'",
        f"bin/predict_video.py --source {missing} --model {model} --output-dir {tmp_path}":
            f"predict_video: error: {missing}: video file not found",
        f"bin/predict_video.py --source {clip} --model {model} --output-dir {tmp_path}":
            f"predict_video: error: {model}: model file not found",
    }
    ends, errors = run_in_one_process(refusals)
    assert ends == ["exit 2"] * len(refusals) + ["loaded: []"], errors
    assert errors == list(refusals.values())


@pytest.mark.parametrize(("kind", "text", "value"), [
    (positive_int, "3", 3), (worker_count, "-1", -1), (fraction, "0.25", 0.25), (non_negative_float, "0", 0.0),
    (image_size_px, "512", 512), (fraction_below_one, "0.998", 0.998), (fraction_below_one, "0", 0.0),
    (random_seed, "42", 42), (random_seed, str(2**32 - 1), 2**32 - 1)])
def test_the_types_accept_what_they_should(kind, text, value):
    assert kind(text) == value


@pytest.mark.parametrize(("kind", "text"), [
    (positive_int, "0"), (positive_int, "1.5"), (positive_int, "x" * 10_000), (worker_count, "-2"),
    (fraction, "nan"), (fraction, "-0.1"), (non_negative_float, "inf"), (image_size_px, "31"),
    (positive_int, "-" + "9" * 4000), (image_size_px, "9" * 4000), (worker_count, "-" + "9" * 4000),
    (fraction_below_one, "1"), (random_seed, str(2**32))])
def test_the_types_refuse_with_a_short_message(kind, text):
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        kind(text)
    assert len(str(refused.value)) < 160  # the value quoted shortened (utils.errors.shown)


def test_workers_minus_one_picks_a_share_as_documented():
    """--workers -1 is the documented default of train and hpo (defaults.LOADER_WORKERS), so it is accepted."""
    for script, argv in (("train", TRAIN), ("hpo", HPO)):
        args = load_script(ROOT, script).get_args_parser().parse_args([*argv, "--workers", "-1"])
        assert args.workers == -1


def test_train_and_hpo_check_every_number_they_are_given():
    """No numeric flag of train or hpo is a plain int or float (which let nan, inf and negatives through); the
    flags a --params file may also set take the file's type, so both refuse the same values."""
    for script in ("train", "hpo"):
        actions = load_script(ROOT, script).get_args_parser()._actions
        assert all(action.type not in (int, float) for action in actions), script
    flags = {action.dest: action.type for action in load_script(ROOT, "train").get_args_parser()._actions}
    assert {key: flags[key] for key in PARAM_TYPES} == PARAM_TYPES


# (the params file's text, what the one line says after the file name)
BAD_PARAMS = [
    ('{"lr": -5}', "lr: expected a finite number above 0, got -5"),
    ('{"image_size": 100000}', "image_size: expected a whole number from 32 to"),
    ('{"params": {"batch_size": 0}}', "batch_size: expected a whole number of at least 1, got 0"),
    ('{"clip_grad": NaN}', "clip_grad: expected a finite number of 0 or more"),
    ('{"batch_size": Infinity}', "batch_size: expected a whole number of at least 1"),
    ('{"batch_size": 7.5}', "batch_size: expected a whole number of at least 1"),
    ('{"batch_size": true}', "batch_size must be a number, got True"),
    ('{"ema_decay": 5}', "ema_decay: expected a number from 0 to below 1"),
    ('{"roi_batch_size": 2}', "roi_batch_size: expected a whole number of at least 4"),
    ('{"hflip": "often"}', "hflip: expected a number from 0 to 1, got 'often'"),
    ('{"optimizer": "adam"}', "optimizer must be one of sgd, adamw, got 'adam'"),
    ('{"lr": [' + ", ".join(["1"] * 5000) + "]}", "lr must be a number, got [1, 1, 1, 1, ...]"),
    ('{"warmup_iters": -' + "9" * 4000 + "}", "warmup_iters: expected a whole number of at least 0"),
    ('{"batch_size": ' + "9" * 5000 + "}", "params file is not valid JSON"),
]


@pytest.mark.parametrize(("text", "words"), BAD_PARAMS, ids=[words.split(":")[0][:30] for _, words in BAD_PARAMS])
def test_a_params_file_value_is_refused_as_its_flag_would_be(tmp_path, text, words):
    path = tmp_path / "best_hpo_params.json"
    path.write_text(text)
    with pytest.raises(ParamsFileError) as refused:
        read_params_file(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: ") and words in message, message
    assert "\n" not in message and len(message) < 300  # a huge value is shown shortened


def test_a_params_file_with_good_values_reads_them_as_the_flags_would(tmp_path):
    path = tmp_path / "best_hpo_params.json"
    path.write_text('{"best_params": {"lr": 0.0123, "batch_size": 8.0, "image_size": 320, "optimizer": "adamw", '
                    '"ema_decay": 0.998, "roi_batch_size": 64, "momentum": "0.9", "trainable_layers": 0, '
                    '"best_value": 0.5}}')
    params = read_params_file(path)
    assert params == {"lr": 0.0123, "batch_size": 8, "image_size": 320, "optimizer": "adamw", "ema_decay": 0.998,
                      "roi_batch_size": 64, "momentum": 0.9, "trainable_layers": 0}
    assert type(params["batch_size"]) is int and type(params["lr"]) is float
    # a TrainParams dump (a bench row's params, a run record's resolved ones) gives no ignore band and the
    # architecture's own proposals per image as null
    path.write_text('{"params": {"roi_batch_size": null, "roi_bg_iou": null, "roi_fg_iou": 0.6}}')
    assert read_params_file(path) == {"roi_batch_size": None, "roi_bg_iou": None, "roi_fg_iou": 0.6}
    path.write_text('{"params": {"lr": null}}')
    with pytest.raises(ParamsFileError, match="lr must be a number, got None"):
        read_params_file(path)
