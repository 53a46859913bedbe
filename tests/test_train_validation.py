"""Training's choices on its validation images: the operating threshold, working size and flip TTA stored in the
model file, the epoch --keep-best keeps (across a resume too), and a SIGTERM while they are chosen."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from helpers import TINY, run_script, tiny_pairs
from utils import defaults as D
from utils.detection.evaluation import load_trained_model
from utils.detection.inference import box_voting
from utils.detection.model import load_model_file
from utils.detection.params import TrainParams
from utils.detection.training import Trainer


@pytest.mark.training
def test_training_with_the_giou_box_loss_makes_its_choices_and_writes_the_model_file(tiny_dir, tmp_path, root,
                                                                                       capsys):
    """--box-loss giou swaps the heads' class for training; the choices after the last epoch (box voting among
    them) run on those heads and used to refuse them, so such a run wrote no model file."""
    out = tmp_path / "run"
    argv = ["--images", tiny_dir / "images", "--annotations", tiny_dir / "annotations", "--val-images",
            tiny_dir / "images", "--val-annotations", tiny_dir / "annotations", "--epochs", "1", "--image-size", "64",
            "--batch-size", "2", "--workers", "0", "--checkpoint", out / "checkpoint.pt", "--output", out / "model.pt",
            "--seed", "1", "--no-progress", "--device", "cpu", "--box-loss", "giou"]
    assert run_script(root, "train", argv) == 0
    assert "model written" in capsys.readouterr().out
    _, meta = load_model_file(out / "model.pt")
    assert meta["training"]["box_loss"] == "giou" and "box_voting" in meta["inference_size"]
    run_model, loaded, _, _ = load_trained_model(out / "model.pt", torch.device("cpu"))
    assert box_voting(run_model) == (D.BOX_VOTE_IOU if loaded["box_voting"] else None)


@pytest.mark.training
def test_training_with_held_out_validation_images_chooses_and_stores_the_operating_threshold(tiny_dir, tmp_path,
                                                                                              root, caplog, capsys):
    out = tmp_path / "run"
    argv = ["--images", tiny_dir / "images", "--annotations", tiny_dir / "annotations", "--val-images",
            tiny_dir / "images", "--val-annotations", tiny_dir / "annotations", "--epochs", "1", "--image-size", "128",
            "--batch-size", "2", "--workers", "0", "--checkpoint", out / "checkpoint.pt", "--output", out / "model.pt",
            "--seed", "1", "--no-progress", "--device", "cpu", "--keep", "best"]
    with caplog.at_level(logging.INFO):  # in-process (as its __main__ runs it): a process added only torch's import
        assert run_script(root, "train", argv) == 0
    printed = capsys.readouterr().out
    assert "Choosing the operating threshold on the validation images" in caplog.text
    model, meta = load_model_file(out / "model.pt")
    # the working size: tried at 1x-2x the training size on the validation images, the chosen one stored
    size = meta["inference_size"]
    assert size["chosen_on"] == "validation" and size["images"] == 6
    assert [row["image_size"] for row in size["candidates"]] == [128, 160, 192, 224, 256]
    best = max(row["fitness"] for row in size["candidates"])
    within = [row["image_size"] for row in size["candidates"] if row["fitness"] >= best - D.INFERENCE_SIZE_TOLERANCE]
    assert size["image_size"] == min(within)
    assert model.transform.max_size == 128  # the file rebuilds at the training size; the jobs set the chosen one
    run_model, loaded, _, _ = load_trained_model(out / "model.pt", torch.device("cpu"))
    assert (loaded["working_size"], loaded["working_size_source"]) == (size["image_size"],
                                                                       "the model's, chosen on its validation images")
    _, given, _, _ = load_trained_model(out / "model.pt", torch.device("cpu"), working_size=96)
    assert (given["working_size"], given["working_size_source"]) == (96, "--image-size")
    # flip TTA: tried at the chosen size, kept only when it beats the plain pass by more than the tolerance;
    # the threshold and the estimators' rates are measured the way the model will run
    plain, flip = size["tta_fitness"]["plain"], size["tta_fitness"]["flip"]
    assert size["tta"] == (flip > plain + D.INFERENCE_SIZE_TOLERANCE)
    assert meta["quantification"]["tta"] == size["tta"] and loaded["tta"] == size["tta"]
    assert meta["quantification"]["working_size"] == size["image_size"]
    assert "flip TTA" in caplog.text
    # box voting: tried at that size and TTA, kept by the same rule, and the jobs run the model as it chose
    without, voted = size["box_voting_fitness"]["plain"], size["box_voting_fitness"]["voted"]
    assert size["box_voting"] == (voted > without + D.INFERENCE_SIZE_TOLERANCE)
    assert size["box_vote_iou"] == D.BOX_VOTE_IOU and loaded["box_voting"] == size["box_voting"]
    # read from the file, not the default (both off when the choice is off), and applied to the model itself
    assert loaded["box_voting_source"] == "the model's, chosen on its validation images"
    assert box_voting(run_model) == (D.BOX_VOTE_IOU if size["box_voting"] else None)
    assert f"box voting {'on' if size['box_voting'] else 'off'}: fitness" in caplog.text
    assert meta["val_mode"] == "monitor" and meta["num_val_images"] == 6  # held out, not trained on
    assert (meta["kept_weights"]["rule"], meta["kept_weights"]["epoch"]) == ("best", 1)  # one epoch: the best
    assert "weights of epoch 1 kept (best)" in printed
    chosen = meta["operating_threshold"]
    assert chosen["chosen_on"] == "validation" and chosen["images"] == 6
    assert chosen["score_threshold"] in [row["score_threshold"] for row in chosen["candidates"]]
    best_f1 = max(row["f1"] for row in chosen["candidates"])
    assert chosen["f1"] >= best_f1 - 0.01
    # the adjusted compliance estimators' rates: per validation image, at the chosen threshold
    record = meta["quantification"]
    assert record["chosen_on"] == "validation" and record["score_threshold"] == chosen["score_threshold"]
    assert len(record["images"]) == 6
    for image in record["images"]:
        assert len(image["truth"]) == 3 and len(image["confusion"]) == 4 and len(image["soft"]) == 4
        assert [sum(row) for row in image["confusion"][:3]] == image["truth"]  # each face once: found or missed


@pytest.mark.training
def test_keep_best_loads_the_epoch_of_the_highest_validation_fitness_and_a_resume_keeps_it(tiny_dir, tmp_path):
    pairs = tiny_pairs(tiny_dir)
    device = torch.device("cpu")
    params = TrainParams(**{**TINY, "epochs": 4, "lr": 0.05})
    checkpoint = tmp_path / "checkpoint.pt"
    trainer = Trainer(params, pairs, device, val_pairs=pairs, progress=False, keep="best")
    snapshots, fitnesses = [], []
    while not trainer.finished:
        row = trainer.run_epoch(validate_map=True)
        snapshots.append(copy.deepcopy(trainer.eval_model.state_dict()))
        fitnesses.append(row.val_fitness)
        if row.epoch == 2:
            trainer.checkpoint(checkpoint, {"test": True})
    assert all(value is not None for value in fitnesses)
    best_epoch = fitnesses.index(max(fitnesses)) + 1  # the first of equals: a later tie is no improvement
    assert [row["val_fitness"] for row in trainer.history] == fitnesses

    kept = trainer.load_kept_weights()
    assert (kept["rule"], kept["epoch"], kept["last_epoch"]) == ("best", best_epoch, 4)
    assert kept["val_fitness"] == max(fitnesses) and kept["last_val_fitness"] == fitnesses[-1]
    for name, value in trainer.eval_model.state_dict().items():
        assert torch.equal(value, snapshots[best_epoch - 1][name]), name
    assert trainer.record().kept == kept
    # whichever epoch the numbers made best here, an earlier best's weights replace the last ones
    trainer.best = {"epoch": 1, "fitness": float("inf"), "model": snapshots[0]}
    assert trainer.load_kept_weights()["epoch"] == 1
    for name, value in trainer.eval_model.state_dict().items():
        assert torch.equal(value, snapshots[0][name]), name

    # the checkpoint carries the best so far: a resumed run keeps choosing among every epoch
    resumed = Trainer(params, pairs, device, val_pairs=pairs, progress=False, keep="best")
    assert resumed.resume(checkpoint) == 2
    best_of_two = fitnesses[:2].index(max(fitnesses[:2])) + 1
    assert resumed.best["epoch"] == best_of_two
    for name, value in resumed.best["model"].items():
        assert torch.equal(value, snapshots[best_of_two - 1][name]), name


@pytest.mark.training
def test_keep_best_without_validation_keeps_the_last_epoch_and_says_why(tiny_dir):
    trainer = Trainer(TrainParams(**{**TINY, "epochs": 1}), tiny_pairs(tiny_dir), torch.device("cpu"),
                      progress=False, keep="best")
    trainer.run_epoch()
    before = copy.deepcopy(trainer.eval_model.state_dict())
    kept = trainer.load_kept_weights()
    assert (kept["rule"], kept["epoch"]) == ("last", 1) and "no validation fitness" in kept["note"]
    for name, value in trainer.eval_model.state_dict().items():
        assert torch.equal(value, before[name]), name
    with pytest.raises(ValueError, match="keep must be"):
        Trainer(TrainParams(**TINY), tiny_pairs(tiny_dir), torch.device("cpu"), progress=False, keep="first")


@pytest.mark.training
def test_keep_best_resumed_from_a_keep_last_checkpoint_says_which_epochs_it_chose_among(tiny_dir, tmp_path):
    pairs = tiny_pairs(tiny_dir)
    params = TrainParams(**{**TINY, "epochs": 2})
    checkpoint = tmp_path / "checkpoint.pt"
    first = Trainer(params, pairs, torch.device("cpu"), val_pairs=pairs, progress=False)  # keep="last"
    first.run_epoch(validate_map=True)
    first.checkpoint(checkpoint, {"test": True})
    done = Trainer(params, pairs, torch.device("cpu"), val_pairs=pairs, progress=False, keep="best")
    done.resume(checkpoint)
    kept = done.kept_weights()  # nothing trained since: the last epoch, and why
    assert (kept["rule"], kept["epoch"]) == ("last", 1)
    assert "resumed from a checkpoint that holds no best epoch" in kept["note"]
    done.run_epoch(validate_map=True)
    kept = done.kept_weights()
    assert (kept["rule"], kept["epoch"], kept["chosen_from_epoch"]) == ("best", 2, 2)


@pytest.mark.training
def test_validation_images_without_a_labelled_face_keep_the_default_threshold(tiny_dir, tmp_path, root):
    # F1 was 0 and the compliance error undefined at every threshold, so the lowest, 0.05, was stored as chosen
    # on validation, and predict and evaluate counted every faint box as a face.
    import re
    import shutil

    from helpers import run_script

    val = tmp_path / "val"
    shutil.copytree(tiny_dir, val)
    for xml in (val / "annotations").glob("*.xml"):
        xml.write_text(re.sub(r"<object>.*?</object>", "", xml.read_text(), flags=re.S))
    out = tmp_path / "run"
    argv = ["--images", tiny_dir / "images", "--annotations", tiny_dir / "annotations", "--val-images",
            val / "images", "--val-annotations", val / "annotations", "--epochs", "1", "--image-size", "96",
            "--batch-size", "2", "--workers", "0", "--weights", "none", "--keep", "best", "--checkpoint",
            out / "checkpoint.pt", "--output", out / "model.pt", "--no-progress", "--device", "cpu"]
    assert run_script(root, "train", argv) == 0
    meta = load_model_file(out / "model.pt")[1]
    assert meta["operating_threshold"] == {"score_threshold": D.SCORE_THRESHOLD, "chosen_on": None,
                                           "criterion": "the default: the validation images hold no labelled face"}
    assert "quantification" not in meta
    assert meta["kept_weights"]["note"].startswith("no validation fitness was measured (the validation images "
                                                   "hold no labelled face)")


def test_a_sigterm_while_the_working_size_tta_and_threshold_are_chosen_stops_at_the_next_validation_batch(
        tiny_dir, monkeypatch):
    # After the last epoch, bin/train.py runs about 28 inference passes over the validation images (a pass per
    # candidate working size, then a flip TTA and a box voting pass at the chosen size) before the model file exists. A
    # SIGTERM there was only recorded: every pass still ran, so a pool's kill after its grace period found the job
    # with no stand-ins (HTCondor holds it) and the retry made every pass again anyway.
    import signal

    import utils.detection.engine as engine
    from utils.detection.training_run import choose_on_validation
    from utils.stop import StopRequested, stop_on_sigterm

    pairs = tiny_pairs(tiny_dir)
    trainer = Trainer(TrainParams(**{**TINY, "weights": "none", "image_size": 64, "batch_size": 3}), pairs,
                      torch.device("cpu"), val_pairs=pairs[:3], progress=False)
    trainer.completed_epochs = 2  # as after training
    batches, detect = [], engine.detect

    def detect_then_sigterm(model, images, tta=False):
        batches.append(len(images))
        if len(batches) == 1:
            signal.raise_signal(signal.SIGTERM)  # arrives during the first candidate size's pass
        return detect(model, images, tta=tta)

    monkeypatch.setattr(engine, "detect", detect_then_sigterm)
    stop_on_sigterm()  # conftest puts the handler back and clears the request
    with pytest.raises(StopRequested, match="working size, flip TTA, box voting and score threshold abandoned; the "
                                            "checkpoint holds all 2 epochs"):
        choose_on_validation(trainer, has_val=True)
    assert batches == [3]  # the rest of the pass and the other sizes' passes were not run
