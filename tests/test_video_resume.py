"""bin/predict_video.py stopped part way and run again: the model runs only on the frames not done, and the outputs
are those of a run never stopped; in the same folder (its progress file) or in another (--checkpoint, a pool's
retry)."""

from __future__ import annotations

import json
import os
import shutil
import signal

import cv2
import numpy as np
import pytest

from helpers import run_script

PROGRESS = ".video_frames.csv.progress.jsonl"


def _detect_calls(monkeypatch, sigterm_on: int | None = None) -> list:
    """Count the model's calls (video.detect); with *sigterm_on*, send SIGTERM on that call (1-based)."""
    from utils.detection import video as video_module

    original, calls = video_module.detect, []

    def counting(*args, **kwargs):
        calls.append(1)
        if len(calls) == sigterm_on:
            os.kill(os.getpid(), signal.SIGTERM)  # the job's handler: it stops after this frame
        return original(*args, **kwargs)

    monkeypatch.setattr(video_module, "detect", counting)
    return calls


def _frames(video) -> list:
    capture, frames = cv2.VideoCapture(str(video)), []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


def _same_outputs(out, whole) -> None:
    assert (out / "video_frames.csv").read_bytes() == (whole / "video_frames.csv").read_bytes()
    summaries = [json.loads((folder / "video_summary.json").read_text()) for folder in (out, whole)]
    for summary in summaries:  # the run's own time and where it wrote
        for key in ("processing_seconds", "outputs"):
            del summary[key]
    assert summaries[0] == summaries[1] and summaries[0]["interrupted"] is None
    drawn, reference = _frames(out / "a.mp4"), _frames(whole / "a.mp4")
    assert len(drawn) == len(reference) == 12 and all(np.array_equal(a, b) for a, b in zip(drawn, reference))


@pytest.mark.slow
def test_a_stopped_video_run_resumes_with_the_model_only_on_the_frames_not_done(root, clip, tiny_model_file, tmp_path,
                                                                                 monkeypatch, capsys, restore_signals):
    # A video job stopped part way (a pool's SIGTERM, a Ctrl-C, a kill) and run again processed the whole video
    # again: hours of a long video's detection lost at every eviction.
    def argv(out):
        return ["--source", clip, "--model", tiny_model_file, "--output-dir", out, "--output-video", out / "a.mp4",
                "--stride", "1", "--device", "cpu"]

    whole, out = tmp_path / "whole", tmp_path / "out"
    assert run_script(root, "predict_video", argv(whole)) == 0
    with monkeypatch.context() as patch:
        _detect_calls(patch, sigterm_on=5)
        assert run_script(root, "predict_video", argv(out)) == 143
    progress = out / PROGRESS
    lines = progress.read_bytes().splitlines(keepends=True)
    assert len(lines) == 1 + 5  # the header, the 5 frames done (the one in progress finished)
    progress.write_bytes(b"".join(lines[:-1]) + lines[-1][:-9])  # a kill cut the last record short
    calls = _detect_calls(monkeypatch)
    capsys.readouterr()
    assert run_script(root, "predict_video", argv(out)) == 0
    assert "the detections of its 4 processed frames are taken from" in capsys.readouterr().out
    assert len(calls) == 12 - 4
    _same_outputs(out, whole)
    assert not progress.exists()  # the whole run's outputs are written: nothing left to resume
    # progress of other settings is not used: another stride runs every frame it processes
    calls.clear()
    with monkeypatch.context() as patch:
        _detect_calls(patch, sigterm_on=2)
        assert run_script(root, "predict_video", argv(out)) == 143
    calls = _detect_calls(monkeypatch)
    capsys.readouterr()
    assert run_script(root, "predict_video", [*argv(out), "--stride", "2"]) == 0
    assert "with another model, setting or video (or unreadable); starting afresh" in capsys.readouterr().out
    assert len(calls) == 6


@pytest.mark.slow
def test_a_video_job_retried_in_a_new_folder_resumes_from_its_checkpoint(root, clip, tiny_model_file, tmp_path,
                                                                          monkeypatch, capsys, restore_signals):
    # On a pool the retry runs in a new sandbox, the video a new copy: the progress travels as the job's checkpoint
    # (the workflow declares it, as train's), the video known by its content.
    def sandbox(name, checkpoint=b""):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copyfile(clip, folder / "video_clip.mp4")
        os.utime(folder / "video_clip.mp4", ns=(len(name) * 10**9, len(name) * 10**9))
        (folder / "ck.jsonl").write_bytes(checkpoint)
        monkeypatch.chdir(folder)
        return folder

    argv = ["--source", "video_clip.mp4", "--model", tiny_model_file, "--output-dir", ".", "--output-video", "a.mp4",
            "--stride", "1", "--device", "cpu", "--checkpoint", "ck.jsonl"]
    whole = sandbox("whole")
    assert run_script(root, "predict_video", argv) == 0
    first = sandbox("try_1")
    with monkeypatch.context() as patch:
        _detect_calls(patch, sigterm_on=7)
        assert run_script(root, "predict_video", argv) == 143
    assert not (first / PROGRESS).exists()  # the checkpoint holds it
    retry = sandbox("try_two", checkpoint=(first / "ck.jsonl").read_bytes())
    calls = _detect_calls(monkeypatch)
    capsys.readouterr()
    assert run_script(root, "predict_video", argv) == 0
    assert "the detections of its 7 processed frames are taken from ck.jsonl" in capsys.readouterr().out
    assert len(calls) == 12 - 7
    _same_outputs(retry, whole)
    assert (retry / "ck.jsonl").stat().st_size == 0  # emptied: what the workflow starts a job with
