"""The working size a trained model runs at (utils/detection/inference_size.py): tried on the validation
images after training, the smallest size scoring within the tolerance of the best kept, and given to every job
that loads the model unless --image-size says otherwise; flip TTA likewise, kept when it earns its time."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from utils import defaults as D
from utils.detection.inference_size import (candidate_sizes, choose_box_voting, choose_inference_size, choose_tta,
                                            inference_box_voting, inference_size, inference_tta, set_inference_size,
                                            working_size)

TARGET = {"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0], [50.0, 50.0, 70.0, 70.0]]), "labels": torch.tensor([1, 2])}


def fake_model(size: int = 512):
    return SimpleNamespace(transform=SimpleNamespace(min_size=(size,), max_size=size))


def predictions_by_size(model, found_from: int, shifted_below: int = 0):
    """A stand-in for a validation pass: both faces found from *found_from* px on, one of them with a box
    a few pixels off below *shifted_below* px; below *found_from* only one face is found."""
    def predict():
        size = working_size(model)
        boxes = TARGET["boxes"].clone()
        if size < shifted_below:
            boxes[1] += 3.0
        keep = slice(None) if size >= found_from else slice(0, 1)
        pred = {"boxes": boxes[keep], "labels": TARGET["labels"][keep], "scores": torch.tensor([0.9, 0.8])[keep]}
        return [pred], [TARGET]
    return predict


def test_candidates_are_multiples_of_32_from_the_training_size_up_to_the_cap():
    assert candidate_sizes(512) == [512, 640, 768, 896, 1024]
    assert candidate_sizes(640) == [640, 800, 960, 1120, 1280]
    assert candidate_sizes(800) == [800, 992, 1216]  # 1000 and 1200 to multiples of 32; 1400 and 1600 over the cap
    assert candidate_sizes(2000) == [2000]  # the training size itself, even over the cap


def test_the_smallest_size_within_the_tolerance_of_the_best_is_chosen_and_set():
    model = fake_model(512)
    record, (preds, targets) = choose_inference_size(model, predictions_by_size(model, found_from=768), 512)
    assert record["image_size"] == 768 and working_size(model) == 768  # 896 and 1024 score the same: not taken
    assert [row["image_size"] for row in record["candidates"]] == [512, 640, 768, 896, 1024]
    assert record["chosen_on"] == "validation" and record["images"] == 1 and len(preds[0]["boxes"]) == 2
    fitness = {row["image_size"]: row["fitness"] for row in record["candidates"]}
    assert fitness[512] < fitness[768] == pytest.approx(1.0) == fitness[1024]


def test_a_gain_below_the_tolerance_does_not_buy_a_larger_size():
    model = fake_model(512)
    predict = predictions_by_size(model, found_from=0, shifted_below=640)  # 512 px: one box 3 px off
    record, _ = choose_inference_size(model, predict, 512, tolerance=1.0)
    assert record["image_size"] == 512
    record, _ = choose_inference_size(model, predict, 512, tolerance=D.INFERENCE_SIZE_TOLERANCE)
    assert record["image_size"] == 640


def test_without_labelled_faces_the_training_size_stands():
    model = fake_model(512)
    record, _ = choose_inference_size(model, lambda: ([{"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0),
                                                        "scores": torch.zeros(0)}],
                                                      [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0)}]), 512)
    assert record["image_size"] == 512 and "no labelled face" in record["criterion"]
    assert working_size(model) == 512


def test_a_job_runs_at_the_flag_else_the_stored_choice_else_the_training_size():
    stored = {"image_size": 512, "inference_size": {"image_size": 768, "chosen_on": "validation"}}
    assert inference_size(stored, 640) == (640, "--image-size")
    assert inference_size(stored, None) == (768, "the model's, chosen on its validation images")
    assert inference_size({"image_size": 512}, None)[0] == 512
    model = fake_model(512)
    set_inference_size(model, 768)
    assert model.transform.min_size == (768,) and model.transform.max_size == 768


def one_pass(shift: float, found: int = 2):
    """A validation pass whose second box is *shift* px off, finding the first *found* faces."""
    boxes = TARGET["boxes"].clone()
    boxes[1] += shift
    pred = {"boxes": boxes[:found], "labels": TARGET["labels"][:found], "scores": torch.tensor([0.9, 0.8])[:found]}
    return [pred], [TARGET]


def test_flip_tta_is_kept_only_when_it_beats_the_plain_pass_by_more_than_the_tolerance():
    plain = one_pass(shift=3.0)
    record, (preds, _) = choose_tta(plain, one_pass(shift=0.0))
    assert record["tta"] is True and preds[0]["boxes"][1].tolist() == TARGET["boxes"][1].tolist()
    assert record["tta_fitness"]["flip"] == pytest.approx(1.0)
    assert record["tta_fitness"]["plain"] < record["tta_fitness"]["flip"] - D.INFERENCE_SIZE_TOLERANCE
    record, (preds, _) = choose_tta(plain, one_pass(shift=0.0), tolerance=1.0)  # not worth twice the time
    assert record["tta"] is False and preds is plain[0]
    record, _ = choose_tta(plain, one_pass(shift=3.0, found=1))  # worse with it
    assert record["tta"] is False


def test_a_job_uses_tta_as_flagged_else_as_the_model_chose_else_not():
    chose = {"inference_size": {"image_size": 768, "chosen_on": "validation", "tta": True}}
    assert inference_tta(chose, None) == (True, "the model's, chosen on its validation images")
    assert inference_tta(chose, False) == (False, "--no-tta")
    assert inference_tta({"inference_size": {"image_size": 768, "tta": False}}, True) == (True, "--tta")
    assert inference_tta({"image_size": 512}, None)[0] is False  # a model file from before the choice


def test_box_voting_is_kept_only_when_it_beats_nms_alone_by_more_than_the_tolerance():
    plain = one_pass(shift=3.0)
    record, (preds, _) = choose_box_voting(plain, one_pass(shift=0.0), vote_iou=0.7)
    assert record["box_voting"] is True and record["box_vote_iou"] == 0.7
    assert preds[0]["boxes"][1].tolist() == TARGET["boxes"][1].tolist()
    assert record["box_voting_fitness"]["voted"] == pytest.approx(1.0)
    record, (preds, _) = choose_box_voting(plain, one_pass(shift=0.0), tolerance=1.0)
    assert record["box_voting"] is False and preds is plain[0]
    record, _ = choose_box_voting(plain, one_pass(shift=3.0))  # no better: NMS alone stays
    assert record["box_voting"] is False and record["box_voting_fitness"]["plain"] is not None
    empty = ([{**plain[0][0]}], [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64)}])
    record, _ = choose_box_voting(empty, empty)  # no labelled face: nothing to choose by
    assert record["box_voting"] is False and record["box_voting_fitness"] == {"plain": None, "voted": None}


def test_a_job_votes_as_flagged_else_as_the_model_chose_at_its_stored_iou_else_not():
    chose = {"inference_size": {"image_size": 768, "chosen_on": "validation", "box_voting": True, "box_vote_iou": 0.8}}
    assert inference_box_voting(chose, None) == (0.8, "the model's, chosen on its validation images")
    assert inference_box_voting(chose, False) == (None, "--no-box-voting")
    declined = {"inference_size": {"image_size": 768, "box_voting": False, "box_vote_iou": 0.8}}
    assert inference_box_voting(declined, None)[0] is None
    assert inference_box_voting(declined, True) == (0.8, "--box-voting")
    older = {"image_size": 512}  # a model file from before the choice: off, or the default IoU when asked
    assert inference_box_voting(older, None)[0] is None
    assert inference_box_voting(older, True) == (D.BOX_VOTE_IOU, "--box-voting")
