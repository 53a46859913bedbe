"""Weights that hold NaN or infinity (a training that diverged) are refused wherever a model is read, in one line
naming the file and the problem, exit 2: predict, predict_video, evaluate, the service at its start, train's
--weights file and its checkpoint; and train writes no model file of them. Such a model loaded, ran and answered
no face in any photo (NaN scores pass no threshold), without a word."""

from __future__ import annotations

import socket

import pytest
import torch

from helpers import run_script
from utils.detection.model_file import CLASS_SCORE_ROWS, ModelError

BROKEN = CLASS_SCORE_ROWS[0]  # the class scores: a NaN there makes every score NaN


@pytest.fixture(scope="module")
def diverged(tiny_model_file, tmp_path_factory):
    """The tiny model's file with 3 NaN class-score weights and an infinite box regression bias."""
    payload = torch.load(tiny_model_file, map_location="cpu", weights_only=True)
    payload["model"][BROKEN][0, :3] = float("nan")
    payload["model"]["roi_heads.box_predictor.bbox_pred.bias"][1] = float("inf")
    path = tmp_path_factory.mktemp("diverged") / "diverged.pt"
    torch.save(payload, path)
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def one_line(capsys, job: str, path) -> str:
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "Traceback" not in err, err
    assert err.startswith(f"{job}: error: {path}: the weights hold 3 NaN values in {BROKEN}, and 1 more tensor "
                          "holds NaN or infinite values"), err
    return err


@pytest.mark.parametrize("job", ["predict", "evaluate", "serve"])
def test_each_job_that_runs_a_model_refuses_a_diverged_one_in_one_line(root, sample_dir, diverged, tmp_path, capsys,
                                                                      job):
    argv = {"predict": ["--images", sample_dir / "images", "--output-dir", tmp_path],
            "evaluate": ["--images", sample_dir / "images", "--annotations", sample_dir / "annotations",
                         "--output-dir", tmp_path],
            "serve": ["--host", "127.0.0.1", "--port", free_port()]}[job]
    assert run_script(root, job, [*argv, "--model", diverged, "--device", "cpu"]) == 2
    assert "diverged; not used" in one_line(capsys, job, diverged)
    assert not any(tmp_path.iterdir())  # nothing written of it


def test_predict_video_refuses_a_diverged_model_in_one_line(root, clip, diverged, tmp_path, capsys):
    assert run_script(root, "predict_video", ["--source", clip, "--model", diverged, "--output-dir", tmp_path,
                                              "--device", "cpu"]) == 2
    one_line(capsys, "predict_video", diverged)


def test_train_reads_no_diverged_weights_and_writes_none(tiny_model_file, diverged, tmp_path):
    from utils.detection.checkpoint import CheckpointError, load_checkpoint
    from utils.detection.model import load_model_file, read_weight_file, save_model_file

    with pytest.raises(ModelError, match=r"diverged\.pt: the weights hold 3 NaN values in .*diverged; not used"):
        read_weight_file(diverged)  # --weights PATH, --weights-file
    payload = torch.load(diverged, map_location="cpu", weights_only=True)
    checkpoint = tmp_path / "checkpoint.pt"  # the epoch checkpoint a rerun resumes from
    torch.save({"model": payload["model"], "optimizer": {}, "scheduler": None, "epoch": 3, "args": {}, "rng": {}},
               checkpoint)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: the weights hold 3 NaN .*delete it to start afresh"):
        load_checkpoint(checkpoint)
    model, _ = load_model_file(tiny_model_file)
    with torch.no_grad():
        model.state_dict()[BROKEN].fill_(float("nan"))  # the update after the last loss checked
    with pytest.raises(ModelError, match=r"model\.pt: not written: the weights hold [0-9,]+ NaN values in .* --lr"):
        save_model_file(tmp_path / "model.pt", model)
    assert not (tmp_path / "model.pt").exists()
