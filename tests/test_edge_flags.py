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

from helpers import load_script
from utils.cli import fraction, image_size_px, non_negative_float, positive_int, run_job, worker_count

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
    return {"I": str(sample_dir / "images"), "A": str(sample_dir / "annotations"), "MODEL": str(tiny_model_file),
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
    ("augment", ["--images", MISSING, "--output-dir", "OUT"], "folder does not exist"),
    ("compare_runs", [MISSING], "run folder not found"),
    ("evaluate", [*EVALUATE, "--workers", "-5"], "--workers"),
    ("evaluate", [*EVALUATE, "--score-threshold", "nan"], "--score-threshold"),
    ("evaluate", [*EVALUATE, "--batch-size", "0"], "--batch-size"),
    ("evaluate", [*EVALUATE[:-3], "TXT", "--output-dir", "OUT"], "not a readable model file"),
    ("hpo", [*HPO, "--lr-range", "1", "-1"], "--lr-range"),
    ("hpo", [*HPO, "--lr-range", "0.1", "0.01"], "--lr-range: MIN 0.1 is above MAX 0.01"),
    ("hpo", [*HPO, "--weight-decay-range", "0", "0.1"], "--weight-decay-range"),
    ("hpo", [*HPO, "--batch-sizes", "4", "0"], "--batch-sizes"),
    ("hpo", [*HPO, "--timeout", "-1"], "--timeout"),
    ("hpo", [*HPO, "--image-size", "100000"], "--image-size"),
    ("hpo_merge", ["--inputs", "TXT"], "not valid JSON"),
    ("make_fold", ["--train-set", "I", "--val-set", "I", "--folds-csv", "TXT", "--fold", "-1",
                   "--output-train", "OUT", "--output-val", "OUT"], "--fold"),
    ("make_fold", ["--train-set", "I", "--val-set", "I", "--folds-csv", "TXT", "--fold", "0",
                   "--output-train", "OUT", "--output-val", "OUT"], "missing column"),
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
    ("train", [*TRAIN, "--lr", "-1"], "--lr"),
    ("train", [*TRAIN, "--batch-size", "0"], "--batch-size"),
    ("train", [*TRAIN, "--momentum", "-3"], "--momentum"),
    ("train", [*TRAIN, "--weight-decay", "nan"], "--weight-decay"),
    ("train", [*TRAIN, "--workers", "-3"], "--workers"),
    ("train", [*TRAIN, "--time-budget", "nan"], "--time-budget"),
    ("train", [*TRAIN, "--hflip", "2"], "--hflip"),
    ("train", [*TRAIN, "--warmup-iters", "-2"], "--warmup-iters"),
    ("train", ["--images", MISSING, "--annotations", "A", "--output", "OUT"], "folder does not exist"),
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
    (["--time-budget", "nan"], "--time-budget"), (["--epochs", "0"], "--epochs"),
    (["--sites-config", "SITES_DIR"], "Is a directory"), (["--data", MISSING], "not found"),
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


@pytest.mark.slow
def test_the_real_scripts_exit_2_in_one_line(paths):
    for script, argv in (("predict", [*PREDICT, "--workers", "-7"]), ("train", [*TRAIN, "--lr", "nan"])):
        proc = subprocess.run([sys.executable, str(ROOT / "bin" / f"{script}.py"), *fill(argv, paths)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert one_error_line(proc.stderr).startswith(f"{script}.py: error: argument ")


@pytest.mark.parametrize(("kind", "text", "value"), [
    (positive_int, "3", 3), (worker_count, "-1", -1), (fraction, "0.25", 0.25), (non_negative_float, "0", 0.0),
    (image_size_px, "512", 512)])
def test_the_types_accept_what_they_should(kind, text, value):
    assert kind(text) == value


@pytest.mark.parametrize(("kind", "text"), [
    (positive_int, "0"), (positive_int, "1.5"), (positive_int, "x" * 10_000), (worker_count, "-2"),
    (fraction, "nan"), (fraction, "-0.1"), (non_negative_float, "inf"), (image_size_px, "31")])
def test_the_types_refuse_with_a_short_message(kind, text):
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        kind(text)
    assert len(str(refused.value)) < 160  # the value quoted shortened (utils.errors.shown)
