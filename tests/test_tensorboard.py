"""TensorBoard events: a staged train run stopped by SIGTERM and rerun with the same command ends with one
event per step (the resumed try purges what the stopped one logged past its checkpoint), validation
mAP/F1 and annotated images per epoch; hpo writes each trial's objective and parameters; the .tar a job
stages out unpacks under outputs/tensorboard/<job>."""

from __future__ import annotations

import contextlib
import csv
import logging
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from helpers import run_script
from utils.executor import unpack_tensorboard

EXIT_STOPPED = 143
STAGES = '[{"epochs": 1, "lr": 0.02, "trainable_layers": 0, "name": "head"}, {"epochs": 1, "lr": 0.005}]'


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from helpers import make_train_val

    return make_train_val(tmp_path_factory.mktemp("tensorboard"), num_train=4, num_val=2)


def accumulate(log_dir) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def steps(events, tag) -> list[int]:
    return [event.step for event in events.Scalars(tag)]


@pytest.mark.training
def test_staged_train_run_stopped_and_resumed_writes_each_step_once(root, data, tmp_path, caplog):
    out, log_dir = tmp_path / "run", tmp_path / "run" / "tensorboard" / "train"
    command = [sys.executable, str(root / "bin" / "train.py"), "--images", str(data / "train" / "images"),
               "--annotations", str(data / "train" / "annotations"), "--val-images", str(data / "val" / "images"),
               "--val-annotations", str(data / "val" / "annotations"), "--stages", STAGES, "--image-size", "96",
               "--batch-size", "2", "--workers", "0", "--weights", "none", "--warmup-iters", "1",
               "--checkpoint", str(out / "checkpoint.pt"), "--output", str(out / "model.pt"), "--no-progress",
               "--device", "cpu", "--tensorboard-dir", str(log_dir), "--tensorboard-every", "1",
               "--tensorboard-tar", str(out / "tensorboard_train.tar")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "checkpoint.pt").is_file():  # stage 1 (one epoch) is done: stage 2 is starting
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_STOPPED, stderr
    done = torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]
    assert done == 1

    with caplog.at_level(logging.INFO):  # the rerun in-process (as its __main__ runs it): no torch start-up again
        assert run_script(root, "train", command[2:]) == 0
    assert f"resumed from {out / 'checkpoint.pt'} after epoch 1 of 2" in caplog.text
    assert "epoch 2/2 [stage 2]" in caplog.text
    with open(out / "training_metrics.csv") as handle:
        assert [row["stage"] for row in csv.DictReader(handle)] == ["1", "2"]

    # 2 steps per epoch (4 images, batch 2): steps 1..4, each written once although the stopped try
    # may have logged a step past its checkpoint; the epoch scalars at each epoch's last step
    events = accumulate(log_dir)
    assert steps(events, "train/step_loss") == [1, 2, 3, 4]
    assert steps(events, "train/lr") == [1, 2, 3, 4]
    assert steps(events, "val/map") == steps(events, "val/f1") == [2, 4]
    assert [event.value for event in events.Scalars("train/stage")] == [1, 2]
    lrs = {event.step: event.value for event in events.Scalars("train/lr")}
    assert lrs[3] < lrs[4] <= 0.005 < lrs[2] <= 0.02  # stage 2 warms up again to its own lr
    images = events.Tags()["images"]
    assert sorted(images) == ["val/image_0", "val/image_1"]  # at most 4: here the 2 validation images
    assert [image.step for image in events.Images("val/image_0")] == [2, 4]
    assert events.Images("val/image_0")[0].width == 96

    # the resumed try's event file starts the session over where the checkpoint ends (purge_step)
    files = sorted(log_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns)
    assert len(files) == 2
    starts = [event.step for event in EventFileLoader(str(files[-1])).Load()
              if event.HasField("session_log") and event.session_log.status == event.session_log.START]
    assert starts == [3]

    # the job's .tar unpacks into the output folder as tensorboard/train
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    (outputs / "tensorboard_train.tar").write_bytes((out / "tensorboard_train.tar").read_bytes())
    with tarfile.open(outputs / "tensorboard_train.tar") as tar:
        assert {Path(name).parent.as_posix() for name in tar.getnames()} == {"tensorboard/train"}
    assert unpack_tensorboard(outputs) == (["tensorboard/train"], [])
    assert steps(accumulate(outputs / "tensorboard" / "train"), "val/map") == [2, 4]


@pytest.mark.training
def test_hpo_writes_each_trial_objective_and_parameters(data, tmp_path):
    from utils.detection.hpo import HpoConfig, SearchSpace, run_study

    log_dir = tmp_path / "tensorboard" / "hpo_0"
    config = HpoConfig(epochs=1, image_size=96, weights="none", workers=0, warmup_iters=1, seed=3)
    result = run_study(config, SearchSpace(batch_sizes=(2,)), data / "train" / "images",
                       data / "train" / "annotations", data / "val" / "images", data / "val" / "annotations",
                       journal=tmp_path / "hpo.journal", n_trials=1, device=torch.device("cpu"),
                       study_name="tb", tensorboard_dir=log_dir)
    values = {trial["number"]: trial["value"] for trial in result["trials"] if trial["state"] == "COMPLETE"}
    assert values, result["trial_counts"]
    events = accumulate(log_dir)
    written = {event.step: event.value for event in events.Scalars("hpo/fitness")}
    assert {step: written[step] for step in values} == pytest.approx(values)
    lrs = {trial["number"]: trial["params"]["lr"] for trial in result["trials"] if trial["number"] in values}
    assert {event.step: event.value for event in events.Scalars("hpo_params/lr")} == pytest.approx(lrs)
    # add_hparams: one run per trial for the HPARAMS tab
    assert sorted(p.name for p in log_dir.iterdir() if p.is_dir()) == [f"trial_{n:04d}" for n in sorted(values)]

    # a continued study in an empty folder (a pool job's retry) first writes the trials the journal holds
    fresh = tmp_path / "fresh"
    run_study(config, SearchSpace(batch_sizes=(2,)), data / "train" / "images", data / "train" / "annotations",
              data / "val" / "images", data / "val" / "annotations", journal=tmp_path / "hpo.journal", n_trials=1,
              device=torch.device("cpu"), study_name="tb", tensorboard_dir=fresh)
    assert steps(accumulate(fresh), "hpo/fitness") == sorted(values)


def test_an_archive_outside_tensorboard_is_left_packed_and_said(tmp_path):
    stray = tmp_path / "payload.txt"
    stray.write_text("not events")
    with tarfile.open(tmp_path / "tensorboard_bad.tar", "w") as tar:
        tar.add(stray, arcname="payload.txt")
    (tmp_path / "tensorboard_broken.tar").write_bytes(b"not a tar")
    unpacked, problems = unpack_tensorboard(tmp_path)
    assert unpacked == [] and len(problems) == 2
    assert "tensorboard_bad.tar: payload.txt is not under tensorboard/<job>/; left packed" in problems[0]
    assert "tensorboard_broken.tar: cannot unpack" in problems[1]


def test_a_resume_in_an_empty_folder_writes_a_cut_short_last_epoch_at_the_step_it_ended(tmp_path):
    # --max-steps 4 at 3 steps an epoch: epoch 2 ended at step 4, where the live run logged it; the replay of a
    # resumed run's history (a pool's retry in a fresh folder) put it at 2 * 3 = 6, past the run's last step
    from types import SimpleNamespace

    from utils.detection.training_plan import TrainingPlan
    from utils.detection.training_run import resume_and_watch

    plan = TrainingPlan(epochs=2, max_steps=4)
    trainer = SimpleNamespace(plan=plan, steps_per_epoch=3, board=None, completed_epochs=2,
                              steps_done=lambda: plan.steps_done(2, 3), steps_taken=4,
                              history=[{"epoch": 1, "train_loss": 1.0, "val_map": 0.1},
                                       {"epoch": 2, "train_loss": 0.9, "val_map": 0.2}])
    log_dir = tmp_path / "train"
    args = SimpleNamespace(tensorboard_dir=str(log_dir), tensorboard_every=1, val_mode="monitor")
    with contextlib.ExitStack() as stack:
        resume_and_watch(trainer, tmp_path / "no_checkpoint.pt", args, stack)
    assert steps(accumulate(log_dir), "val/map") == steps(accumulate(log_dir), "train/epoch_loss") == [3, 4]


@pytest.mark.training
def test_an_epoch_longer_than_the_loaders_length_logs_each_step_once(tmp_path):
    # Repeat-factor sampling (on by default) draws each rare-class image once or twice per epoch, so an epoch may
    # hold a batch more than len(loader), the length steps were numbered by: epoch 1's last step and epoch 2's
    # first were both logged at step 4, and the epoch's row at step 3, before its last step.
    from PIL import Image

    from utils.data.pairs import pair_folders
    from utils.data.voc import VocAnnotation, VocObject, write_voc
    from utils.detection.params import TrainParams
    from utils.detection.tensorboard_log import TrainBoard
    from utils.detection.training import Trainer

    for folder in ("images", "annotations"):
        (tmp_path / folder).mkdir()
    for index in range(6):  # without_mask in 1 image of 6: repeated sqrt(0.3 / (1/6)) = 1.34 times
        name = "without_mask" if index == 5 else "with_mask"
        Image.new("RGB", (64, 64), (40 * index, 90, 60)).save(tmp_path / "images" / f"{index}.png")
        write_voc(tmp_path / "annotations" / f"{index}.xml", VocAnnotation(
            filename=f"{index}.png", width=64, height=64, objects=[VocObject(name, 10, 10, 40, 40)]))
    pairs = pair_folders(tmp_path / "images", tmp_path / "annotations").pairs
    params = TrainParams(image_size=64, batch_size=2, workers=0, epochs=2, warmup_iters=1, weights="none",
                         repeat_threshold=0.3, seed=11)  # seed 11: 7 images in epoch 1 (4 batches), 6 in epoch 2
    trainer = Trainer(params, pairs, torch.device("cpu"), progress=False)
    assert trainer.steps_per_epoch == 3
    trainer.board = TrainBoard(tmp_path / "events", purge_step=1, every=1)
    trainer.run_epoch()
    trainer.checkpoint(tmp_path / "checkpoint.pt", {})
    trainer.run_epoch()
    trainer.board.close()
    events = accumulate(tmp_path / "events")
    assert steps(events, "train/step_loss") == [1, 2, 3, 4, 5, 6, 7]
    assert steps(events, "train/epoch_loss") == [4, 7]
    assert [row["step"] for row in trainer.history] == [4, 7]  # the metrics CSV's step column, the replay's steps
    resumed = Trainer(params, pairs, torch.device("cpu"), progress=False)
    resumed.resume(tmp_path / "checkpoint.pt")
    assert resumed.steps_taken == 4  # a resumed run logs on from step 5 (and purges what a stopped try logged)
