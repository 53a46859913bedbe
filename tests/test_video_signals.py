"""bin/predict_video.py stopped by a SIGTERM or a Ctrl-C: at the next frame, its outputs of the frames done or
the last run's, and its exit code."""

from __future__ import annotations

import csv
import json

import cv2
import pytest

from helpers import run_script


def _signal_on_call(monkeypatch, module, name, signum, call):
    """Patch module.name to send *signum* to this process on its *call*-th call (1-based)."""
    import os

    original, calls = getattr(module, name), []

    def patched(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, patched)


@pytest.mark.slow
@pytest.mark.parametrize("signame, rc", [("SIGTERM", 143), ("SIGINT", 0)])
def test_a_signal_stops_at_the_next_frame_and_keeps_the_frames_done(root, clip, tiny_model_file, tmp_path, capsys,
                                                                     monkeypatch, restore_signals, signame, rc):
    """SIGTERM (a pool stopping the job: 143, retried) or Ctrl-C (the user ending a run: 0) stops the run at the
    next frame; the CSV, plot, summary and annotated video hold the frames done, the summary says interrupted."""
    import signal

    from utils.detection import video as video_module

    out = tmp_path / "out"
    argv = ["--source", clip, "--model", tiny_model_file, "--output-dir", out, "--output-video", out / "a.mp4",
            "--stride", "1", "--device", "cpu"]
    assert run_script(root, "predict_video", [*argv, "--max-frames", "1"]) == 0  # a previous run's outputs
    _signal_on_call(monkeypatch, video_module, "detect", getattr(signal, signame), 3)
    assert run_script(root, "predict_video", argv) == rc
    err = capsys.readouterr().err
    assert "Traceback" not in err and "interrupted by" in err
    summary = json.loads((out / "video_summary.json").read_text())
    assert summary["interrupted"] == ("SIGTERM" if signame == "SIGTERM" else "Ctrl-C (SIGINT)")
    assert summary["frames_processed"] == 3 and summary["frames_read"] == 3  # the frame in progress is finished
    assert len(list(csv.DictReader(open(out / "video_frames.csv")))) == 3
    video = cv2.VideoCapture(str(out / "a.mp4"))
    assert video.get(cv2.CAP_PROP_FRAME_COUNT) == 3
    video.release()
    assert sorted(p.name for p in out.iterdir()) == [".video_frames.csv.progress.jsonl",  # for a rerun to resume
                                                     "a.mp4", "compliance_over_time.png", "predict_video_run.json",
                                                     "video_frames.csv", "video_summary.json"]  # no temp files


@pytest.mark.slow
def test_a_sigterm_before_the_first_frame_still_replaces_the_previous_outputs(root, clip, tiny_model_file, tmp_path,
                                                                               monkeypatch, restore_signals):
    import signal

    from utils.detection import video as video_module

    out = tmp_path / "out"
    argv = ["--source", clip, "--model", tiny_model_file, "--output-dir", out, "--device", "cpu"]
    assert run_script(root, "predict_video", [*argv, "--max-frames", "2"]) == 0
    _signal_on_call(monkeypatch, video_module, "open_source", signal.SIGTERM, 1)
    assert run_script(root, "predict_video", argv) == 143
    summary = json.loads((out / "video_summary.json").read_text())
    assert summary["interrupted"] == "SIGTERM" and summary["frames_processed"] == 0


@pytest.mark.slow
def test_a_second_ctrl_c_while_the_outputs_are_written_leaves_the_last_runs_outputs(root, clip, tiny_model_file,
                                                                                    tmp_path, monkeypatch,
                                                                                    restore_signals):
    """The first Ctrl-C stops the run, the second comes while its outputs are written: the annotated video and CSV
    were new, the plot, summary and run record the last run's. Now all stay the last run's, with no temporary."""
    import hashlib
    import signal

    from utils.detection import plots
    from utils.detection import video as video_module

    out = tmp_path / "out"
    argv = ["--source", clip, "--model", tiny_model_file, "--output-dir", out, "--output-video", out / "a.mp4",
            "--stride", "1", "--device", "cpu"]
    assert run_script(root, "predict_video", [*argv, "--max-frames", "1"]) == 0  # the last run's outputs
    before = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in out.iterdir()}
    _signal_on_call(monkeypatch, video_module, "detect", signal.SIGINT, 3)
    _signal_on_call(monkeypatch, plots, "plot_compliance_over_time", signal.SIGINT, 1)
    assert run_script(root, "predict_video", argv) == 130  # one line, no traceback (utils.cli.run_job)
    progress = out / ".video_frames.csv.progress.jsonl"  # the frames done, kept for a rerun to resume
    assert progress.is_file() and progress.name not in before
    assert {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in out.iterdir()
            if path != progress} == before


@pytest.mark.slow
def test_a_sigterm_after_ctrl_c_still_exits_143(root, clip, tiny_model_file, tmp_path, monkeypatch, restore_signals,
                                                capsys):
    """Ctrl-C stopped the run, then a pool's SIGTERM came while the outputs were written: the outputs are written
    for the frames done (the summary names the Ctrl-C that stopped the run), and the exit is 143, as after any
    SIGTERM (it was 0: the pool read a job it had stopped as done)."""
    import signal

    from utils.detection import plots
    from utils.detection import video as video_module

    out = tmp_path / "out"
    argv = ["--source", clip, "--model", tiny_model_file, "--output-dir", out, "--stride", "1", "--device", "cpu"]
    _signal_on_call(monkeypatch, video_module, "detect", signal.SIGINT, 2)
    _signal_on_call(monkeypatch, plots, "plot_compliance_over_time", signal.SIGTERM, 1)
    assert run_script(root, "predict_video", argv) == 143
    summary = json.loads((out / "video_summary.json").read_text())
    assert summary["interrupted"] == "Ctrl-C (SIGINT)" and summary["frames_processed"] == 2
    # one that comes once the run ended of itself: its outputs are whole, exit 0 (a retry would redo the video)
    monkeypatch.undo()
    _signal_on_call(monkeypatch, plots, "plot_compliance_over_time", signal.SIGTERM, 1)
    assert run_script(root, "predict_video", [*argv, "--max-frames", "2"]) == 0
    assert "SIGTERM received once the run had ended (--max-frames); its outputs are complete" in \
        capsys.readouterr().err
    assert json.loads((out / "video_summary.json").read_text())["interrupted"] is None
