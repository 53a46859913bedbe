"""A real SIGTERM in the middle of an epoch: train and hpo stop at the next step with exit 143 and one
line, keep the last finished epoch's checkpoint (hpo: the interrupted trial enqueued again), and a rerun
resumes from it."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import run_script
from utils.detection.model import ModelError, load_model_file
from utils.stop import is_stand_in

pytestmark = pytest.mark.training

EXIT_STOPPED = 143


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from utils.data.sample_data import make_sample_dataset

    out = tmp_path_factory.mktemp("sigterm")
    make_sample_dataset(out, num_images=8, seed=5, image_size=(96, 96))
    return out


def wait_for(condition, process, seconds=240.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def train_command(root, tiny_dir, out, epochs):
    return [sys.executable, str(root / "bin" / "train.py"), "--images", str(tiny_dir / "images"),
            "--annotations", str(tiny_dir / "annotations"), "--epochs", str(epochs), "--image-size", "96",
            "--batch-size", "2", "--workers", "0", "--weights", "none", "--warmup-iters", "1",
            "--checkpoint", str(out / "checkpoint.pt"), "--output", str(out / "model.pt"), "--no-progress",
            "--device", "cpu"]


def test_train_stops_on_sigterm_mid_epoch_and_a_rerun_resumes(root, tiny_dir, tmp_path, caplog):
    checkpoint = tmp_path / "checkpoint.pt"
    process = subprocess.Popen(train_command(root, tiny_dir, tmp_path, epochs=40), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for(checkpoint.is_file, process)  # the first epoch is done: the second one is running
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_STOPPED, stderr
    assert time.monotonic() - started < 60
    (line,) = [text for text in stderr.splitlines() if text.startswith("train: stopped:")]
    done = torch.load(checkpoint, weights_only=True)["epoch"]
    assert f"the checkpoint holds {done} finished epoch(s)" in line and "Traceback" not in stderr
    assert 1 <= done < 40
    # every declared output exists (HTCondor holds a job whose transfer_output_files are missing): the
    # model is a stand-in that says so, and loading it fails with one clear line
    assert "stand-ins for the outputs not written yet: model.pt" in line
    assert is_stand_in(tmp_path / "model.pt") and (tmp_path / "model_run.json").is_file()
    with pytest.raises(ModelError, match="a stand-in, not a model file"):
        load_model_file(tmp_path / "model.pt")

    with caplog.at_level(logging.INFO):  # the rerun in-process (as its __main__ runs it): no torch start-up again
        assert run_script(root, "train", train_command(root, tiny_dir, tmp_path, epochs=done + 1)[2:]) == 0
    assert f"after epoch {done} of {done + 1}" in caplog.text and not is_stand_in(tmp_path / "model.pt")
    assert load_model_file(tmp_path / "model.pt")[1]["backbone"]


def test_hpo_stops_on_sigterm_mid_trial_and_the_retry_runs_that_trial_again(root, tiny_dir, tmp_path):
    from utils.detection.hpo_results import HpoError, journal_trials

    journal = tmp_path / "hpo.journal"
    command = [sys.executable, str(root / "bin" / "hpo.py"), "--train-images", str(tiny_dir / "images"),
               "--train-annotations", str(tiny_dir / "annotations"), "--val-images", str(tiny_dir / "images"),
               "--val-annotations", str(tiny_dir / "annotations"), "--epochs", "30", "--n-trials", "1",
               "--image-size", "96", "--batch-sizes", "1", "--workers", "0", "--weights", "none",
               "--warmup-iters", "1", "--checkpoint", str(journal), "--output", str(tmp_path / "best.json"),
               "--study-name", "stop", "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def trial_running() -> bool:
        try:
            return any(t["state"] == "RUNNING" for t in journal_trials(journal))
        except HpoError:  # not there yet, or created but its study not yet written (seen on a loaded machine)
            return False

    wait_for(trial_running, process)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_STOPPED, stderr
    (line,) = [text for text in stderr.splitlines() if text.startswith("hpo: stopped: SIGTERM received")]
    assert "trial 0 abandoned" in line and "the journal holds 0 finished trial(s)" in line, line
    assert "Traceback" not in stderr, stderr  # Optuna's log of the stopped trial, without its traceback
    states = [t["state"] for t in journal_trials(journal)]
    assert states == ["FAIL", "WAITING"]  # the interrupted trial, and its parameters enqueued for the retry
    assert is_stand_in(tmp_path / "best.json") and is_stand_in(tmp_path / "best_run.json")


def test_a_train_sigkilled_mid_training_then_while_it_chooses_on_validation_writes_the_uninterrupted_model(
        root, tiny_dir, tmp_path, caplog):
    """SIGKILL gives no chance to stop cleanly. Killed once an epoch's checkpoint exists, the rerun resumes from it;
    killed again after the last epoch's checkpoint, while it chooses the working size, flip TTA, box voting and the
    score threshold on the validation images (about 28 passes), the next rerun trains no epoch again, makes the choice
    anew and writes the model file an uninterrupted run writes, byte for byte, recording what it resumed from.
    (One test for both kill points: each training is a process start-up of torch.)"""
    import json
    import shutil

    val = tmp_path / "val"  # 3 of the 8 images: each of the 4 runs validates every epoch and chooses on them
    for folder in ("images", "annotations"):
        (val / folder).mkdir(parents=True)
        for path in sorted((tiny_dir / folder).iterdir())[:3]:
            shutil.copy(path, val / folder / path.name)
    validated = ["--val-images", str(val / "images"), "--val-annotations", str(val / "annotations")]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    command = train_command(root, tiny_dir, killed, epochs=3) + validated
    subprocess.run(train_command(root, tiny_dir, whole, epochs=3) + validated, capture_output=True, text=True,
                   timeout=300, check=True)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: (killed / "checkpoint.pt").is_file(), process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    done = torch.load(killed / "checkpoint.pt", weights_only=True)["epoch"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    printed = []
    for line in process.stderr:
        printed.append(line)
        if line.startswith("Choosing the working size"):  # logged after the last epoch's checkpoint
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    process.stderr.close()
    assert f"resumed from {killed / 'checkpoint.pt'} after epoch {done} of 3" in "".join(printed)
    assert process.returncode == -signal.SIGKILL and not (killed / "model.pt").exists()
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["epoch"] == 3
    with caplog.at_level(logging.INFO):  # the last rerun in-process (as its __main__ runs it): no torch start-up again
        assert run_script(root, "train", command[2:]) == 0
    assert "after epoch 3 of 3" in caplog.text and "epoch 3/3:" not in caplog.text  # nothing trained again
    assert (killed / "model.pt").read_bytes() == (whole / "model.pt").read_bytes()
    resumed = json.loads((killed / "model_run.json").read_text())["params"]["resumed_from"]
    assert resumed["after_epoch"] == 3 and resumed["checkpoint"] == str(killed / "checkpoint.pt")
