"""The job runner every bin/ script ends with: exit codes 0 / 2 / 1, the one-line error naming the file,
the args line first; and the conventions of the scripts themselves (runner, no path hacks, one defaults table)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import load_script
from utils import defaults as D
from utils.cli import run_job
from utils.errors import InputError

SCRIPTS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "bin").glob("*.py"))


def fake_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--count", type=int, default=3)
    return parser


def run_fake(main, capsys, argv=("--input", "data/in.csv")):
    code = run_job(main, fake_parser(), list(argv), job="fake")
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_job_that_succeeds_exits_0_and_prints_its_resolved_args_first(capsys):
    def main(args):
        print("working")
        return 0

    code, out, err = run_fake(main, capsys)
    assert code == 0 and err == ""
    first, second = out.splitlines()
    assert first == 'fake: args: {"count": 3, "input": "data/in.csv"}'  # sorted, defaults resolved, paths as text
    assert second == "working"


def test_bad_input_exits_2_with_one_line_naming_the_file_and_no_traceback(capsys):
    def main(args):
        raise InputError(f"{args.input}: row 3 has no image column")

    code, out, err = run_fake(main, capsys)
    assert code == 2
    assert err == "fake: error: data/in.csv: row 3 has no image column\n"
    assert out.startswith("fake: args: ")


def test_ctrl_c_exits_130_with_one_line_and_no_traceback(capsys):
    def main(args):
        raise KeyboardInterrupt  # a Ctrl-C in a job without a handler of its own, or a second one while it stops

    code, out, err = run_fake(main, capsys)
    assert code == 130 and "Traceback" not in err
    assert err.startswith("fake: interrupted (Ctrl-C)") and err.count("\n") == 1


def test_a_missing_file_exits_2_with_one_line_naming_the_file(tmp_path, capsys):
    missing = tmp_path / "nope.csv"

    def main(args):
        missing.read_text()

    code, _, err = run_fake(main, capsys)
    assert code == 2
    assert err == f"fake: error: {missing}: No such file or directory\n"


def test_a_multi_line_message_still_gives_one_line(capsys):
    def main(args):
        raise NotADirectoryError(f"{args.input}: neither a folder\nnor a .tar archive")

    code, _, err = run_fake(main, capsys)
    assert code == 2 and err == "fake: error: data/in.csv: neither a folder; nor a .tar archive\n"


def test_a_bug_exits_1_with_the_one_line_and_then_the_traceback(capsys):
    def main(args):
        return {}["missing key"]

    code, _, err = run_fake(main, capsys)
    assert code == 1
    lines = err.splitlines()
    assert lines[0] == "fake: error: unexpected KeyError: 'missing key' (a bug; traceback follows)"
    assert lines[1] == "Traceback (most recent call last):" and lines[-1] == "KeyError: 'missing key'"


def test_a_bad_flag_exits_2_as_argparse_does_before_any_work(capsys):
    def main(args):
        raise AssertionError("main must not run")

    with pytest.raises(SystemExit) as exit_info:
        run_job(main, fake_parser(), ["--input", "x", "--count", "many"], job="fake")
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "invalid int value: 'many'" in captured.err


def test_the_job_is_named_after_its_script(root, capsys):
    script = load_script(root, "split_data")
    assert run_job(script.main, script.get_args_parser(), ["--manifest", "/nonexistent/m.csv"]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("split_data: args: {")
    assert captured.err == "split_data: error: /nonexistent/m.csv: No such file or directory\n"


def test_the_signal_handlers_are_as_the_job_found_them_however_it_ends(root, tmp_path, capsys):
    """train and hpo (every job that stops on SIGTERM) set their own SIGTERM handler and left it set: a process that
    ran a job in-process (an embedding program, a test) could no longer be ended by SIGTERM once it was done."""
    import signal

    from utils.stop import StopRequested, stop_on_sigterm

    def own(signum, frame):  # the calling program's handlers
        pass

    def job_ending(how):
        def main(args):
            stop_on_sigterm()
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # as predict_video's Ctrl-C handler, were it left set
            if how is not None:
                raise how
            return 0
        return main

    def handlers():
        return signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, own)  # conftest's _no_stop_left_over puts pytest's back
    codes = []
    for how in [None, StopRequested("SIGTERM received"), InputError("bad"), RuntimeError("a bug"), KeyboardInterrupt()]:
        codes.append(run_fake(job_ending(how), capsys)[0])
        assert handlers() == (own, own), how
    for name in ("train", "hpo"):  # the real jobs, refusing a missing set after their handler is set
        script = load_script(root, name)
        sets = ["--images", "--annotations"] if name == "train" else ["--train-images", "--train-annotations",
                                                                      "--val-images", "--val-annotations"]
        argv = [part for flag in sets for part in (flag, str(tmp_path / "none"))]
        codes.append(run_job(script.main, script.get_args_parser(), [*argv, "--output", str(tmp_path / "out")]))
        assert handlers() == (own, own), name
    assert codes == [0, 143, 2, 1, 130, 2, 2]


def test_a_job_that_is_the_program_keeps_its_sigterm_handler_until_it_exits(tmp_path):
    """A SIGTERM that reaches a job run as a script after its main returned 0 (here from an atexit hook, as the
    interpreter exits; a pool's at checkpoint.time) finds the work done: exit 0. With the default action put
    back after main, it ended the finished job as killed (143), which the executor and a pool retry."""
    script = tmp_path / "late.py"
    script.write_text("import argparse, atexit, os, signal, sys\n"
                      "from utils.cli import run_job\n"
                      "from utils.stop import stop_on_sigterm\n\n\n"
                      "def main(args):\n"
                      "    stop_on_sigterm()\n"
                      "    atexit.register(os.kill, os.getpid(), signal.SIGTERM)\n"
                      "    return 0\n\n\n"
                      "sys.exit(run_job(main, argparse.ArgumentParser(), job='late'))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_real_script_on_a_missing_folder_exits_2_with_one_line_naming_it(root, tmp_path):
    missing = tmp_path / "no_such_folder"
    proc = subprocess.run([sys.executable, str(root / "bin" / "preprocess.py"), "--images", str(missing),
                           "--output-dir", str(tmp_path / "out"), "--no-progress"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"preprocess: error: {missing}: does not exist (expected a folder or a .tar archive)"]
    args = json.loads(proc.stdout.splitlines()[0].removeprefix("preprocess: args: "))
    assert args["images"] == [str(missing)] and args["quality"] == D.JPEG_QUALITY


def test_every_project_bad_input_error_is_an_input_error_and_keeps_its_old_base():
    from utils.data.images import ImageError
    from utils.data.preprocess import NothingProcessedError
    from utils.data.split import SplitError
    from utils.data.validation import ValidationInputError
    from utils.data.voc import VocError
    from utils.detection.checkpoint import CheckpointError
    from utils.detection.device import DeviceError, resolve_device
    from utils.detection.engine import NonFiniteLossError
    from utils.detection.evaluation import EvaluationInputError
    from utils.detection.hpo import HpoError
    from utils.detection.model import ModelError
    from utils.detection.training import TrainingDataError

    for error in (VocError, ImageError, ModelError, CheckpointError, NonFiniteLossError, TrainingDataError, HpoError,
                  EvaluationInputError, ValidationInputError, SplitError, NothingProcessedError, DeviceError):
        assert issubclass(error, InputError), error
    for error in (CheckpointError, NonFiniteLossError, NothingProcessedError, DeviceError):
        assert issubclass(error, RuntimeError), error
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    import torch

    beyond = torch.cuda.device_count()  # a CUDA index this machine does not have (any on a CPU-only one)
    with pytest.raises(DeviceError, match=f"--device cuda:{beyond}: no such CUDA device here"):
        resolve_device(f"cuda:{beyond}")
    with pytest.raises(DeviceError, match="no such CUDA device"):
        resolve_device("cuda:x")


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_runs_through_the_job_runner_without_path_hacks(root, name):
    source = (root / "bin" / f"{name}.py").read_text()
    assert "sys.path" not in source and "noqa: E402" not in source
    assert 'if __name__ == "__main__":\n    sys.exit(run_job(main, get_args_parser()))\n' in source
    script = load_script(root, name)
    assert callable(script.main) and isinstance(script.get_args_parser(), argparse.ArgumentParser)


def test_defaults_come_from_the_one_table(root):
    from utils.detection.hpo import HpoConfig, SearchSpace
    from utils.detection.params import TrainParams

    def defaults(name):
        parser = load_script(root, name).get_args_parser()
        return {action.dest: action.default for action in parser._actions}

    assert TrainParams().seed == HpoConfig().seed == D.SEED
    for name in ("augment", "split_data", "make_sample_data", "hpo"):
        assert defaults(name)["seed"] == D.SEED, name
    for name in ("evaluate", "predict"):
        assert defaults(name)["score_threshold"] is None, name  # None: the model's operating threshold
        assert defaults(name)["batch_size"] == D.INFERENCE_BATCH_SIZE, name
    assert tuple(defaults("split_data")["fractions"]) == D.SPLIT_FRACTIONS
    assert tuple(defaults("hpo")["lr_range"]) == (SearchSpace().lr_min, SearchSpace().lr_max) == D.HPO_LR_RANGE
    assert defaults("hpo")["epochs"] == HpoConfig().epochs == D.HPO_EPOCHS
    help_text = load_script(root, "evaluate").get_args_parser().format_help()
    assert f"{D.SCORE_THRESHOLD} for a model without one" in " ".join(help_text.split())


def test_the_flags_that_wrote_their_defaults_out_read_them_from_the_table(root, monkeypatch):
    # serve's --host, --port, --device and --forwarded-allow-ips, predict_video's --device and compare_runs'
    # --sort-by were literals beside the table: a value changed there is what the flags now default to
    for name, value in (("SERVICE_HOST", "192.0.2.1"), ("SERVICE_PORT", 8123), ("DEVICE", "cpu"),
                        ("SERVICE_FORWARDED_ALLOW_IPS", "192.0.2.2"), ("COMPARE_SORT_BY", "map")):
        monkeypatch.setattr(D, name, value)
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)

    def defaults(name):
        return {action.dest: action.default for action in load_script(root, name).get_args_parser()._actions}

    assert {key: defaults("serve")[key] for key in ("host", "port", "device", "forwarded_allow_ips")} == {
        "host": "192.0.2.1", "port": 8123, "device": "cpu", "forwarded_allow_ips": "192.0.2.2"}
    assert defaults("predict_video")["device"] == "cpu"
    assert defaults("compare_runs")["sort_by"] == "map"


def test_every_plot_format_taken_is_one_matplotlib_draws_here(tmp_path):
    from utils.cli import PLOT_FORMATS
    from utils.detection.training_run import plot_loss_curve

    for suffix in PLOT_FORMATS:
        plot_loss_curve(tmp_path / f"loss{suffix}", [{"epoch": 1, "train_loss": 1.0, "val_loss": 0.9}])
        assert (tmp_path / f"loss{suffix}").stat().st_size > 0


@pytest.mark.parametrize("script, required, flag", [
    ("train", ["--images", "i", "--annotations", "a"], "--loss-plot"),
    ("plot_class_distribution", ["--split-csv", "split.csv"], "--output"),
    ("merge_predictions", ["--inputs", "p.json", "--output-dir", "out"], "--histogram"),
    ("merge_predictions", ["--inputs", "p.json", "--output-dir", "out"], "--folder-plot"),
    ("compare_runs", ["run"], "--plot"),
])
def test_a_plot_flag_refuses_a_format_matplotlib_would_refuse_when_drawing(root, capsys, script, required, flag):
    """matplotlib picks the format by the extension and raises only in savefig: for train that was after its first
    epoch, a traceback. The flag's type refuses it before any work; the formats it takes are ones matplotlib writes."""
    import matplotlib.figure

    from utils.cli import PLOT_FORMATS

    assert {suffix[1:] for suffix in PLOT_FORMATS} <= set(matplotlib.figure.Figure().canvas.get_supported_filetypes())
    parser = load_script(root, script).get_args_parser()
    for bad in ("plot.txt", "plot", "plot.pgf", ""):
        with pytest.raises(SystemExit):
            parser.parse_args([*required, flag, bad])
        assert f"argument {flag}: expected " in capsys.readouterr().err
    for good in ("plot.png", "plot.SVG", "plot.pdf", "plot.jpg", "plot.webp"):
        parser.parse_args([*required, flag, good])
    if script == "merge_predictions":  # a name in the output folder: a path elsewhere is refused
        for elsewhere in ("../plot.png", "sub/plot.png", "/tmp/plot.png"):
            with pytest.raises(SystemExit):
                parser.parse_args([*required, flag, elsewhere])
            assert "expected a plain file-name part" in capsys.readouterr().err
