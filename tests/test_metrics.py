"""Metrics on hand-made cases: mAP extremes, the detection confusion matrix, PR curves, compliance."""

from __future__ import annotations

import pytest
import torch

from utils.classes import LABEL_OF
from utils.detection.evaluation import recall_lines
from utils.detection.compliance import (choose_operating_threshold, compliance, compliance_error, compliance_line,
                                        detection_f1, merge_compliance)
from utils.detection.metrics import (CONFUSION_LABELS, coco_map, compute_coco, detection_confusion_matrix, pr_curves,
                                    recall_by_iou)

WITH, WITHOUT, INCORRECT = LABEL_OF["with_mask"], LABEL_OF["without_mask"], LABEL_OF["mask_weared_incorrect"]
BG = CONFUSION_LABELS.index("background")


def target(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64)}


def pred(boxes, labels, scores):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "scores": torch.tensor(scores, dtype=torch.float32)}


def no_pred():
    return pred([], [], [])


TARGETS = [
    target([[10, 10, 50, 50], [60, 10, 100, 50]], [WITH, WITHOUT]),
    target([[20, 20, 70, 70], [80, 80, 120, 130]], [INCORRECT, WITH]),
]


def test_perfect_predictions_give_map_one():
    preds = [pred(t["boxes"].tolist(), t["labels"].tolist(), [0.9] * len(t["labels"])) for t in TARGETS]
    result = coco_map(preds, TARGETS)
    assert result["map"] == pytest.approx(1.0)
    assert result["map_50"] == pytest.approx(1.0)
    assert result["map_75"] == pytest.approx(1.0)
    assert result["mar_100"] == pytest.approx(1.0)
    for name, entry in result["per_class"].items():
        assert entry["ap"] == pytest.approx(1.0), name
        assert entry["ap_50"] == pytest.approx(1.0), name
        assert entry["recall"] == pytest.approx(1.0), name


def test_no_predictions_give_map_zero():
    result = coco_map([no_pred(), no_pred()], TARGETS)
    assert result["map"] == 0.0
    assert result["map_50"] == 0.0
    assert all(entry["ap"] == 0.0 and entry["ap_50"] == 0.0 for entry in result["per_class"].values())


def test_wrong_class_scores_zero_and_absent_class_is_none():
    targets = [target([[10, 10, 50, 50]], [WITH])]
    preds = [pred([[10, 10, 50, 50]], [WITHOUT], [0.9])]
    result = coco_map(preds, targets)
    assert result["map"] == 0.0
    assert result["per_class"]["with_mask"]["ap"] == 0.0
    # without_mask has a prediction but no ground truth, incorrect has neither: undefined, not 0 or -1.
    assert result["per_class"]["without_mask"]["ap"] is None
    assert result["per_class"]["without_mask"]["ap_50"] is None
    assert result["per_class"]["mask_weared_incorrect"]["ap"] is None


def test_half_overlap_counts_at_050_not_at_075():
    # IoU of the prediction with the truth is 0.6: a hit at 0.5, a miss at 0.75.
    targets = [target([[0, 0, 100, 100]], [WITH])]
    preds = [pred([[0, 0, 100, 60]], [WITH], [0.8])]
    result = coco_map(preds, targets)
    assert result["map_50"] == pytest.approx(1.0)
    assert result["map_75"] == 0.0
    assert result["per_class"]["with_mask"]["ap_50"] == pytest.approx(1.0)
    assert result["per_class"]["with_mask"]["ap_75"] == 0.0
    assert 0.0 < result["map"] < 1.0


def test_recall_by_iou_tells_loose_boxes_and_wrong_classes_from_missed_faces():
    # with_mask: a large and a small (20 px: COCO's "small" area) box exact, one at IoU 0.62 (found up to the 0.6
    # threshold); without_mask: its face boxed exactly but called with_mask; mask_weared_incorrect: missed.
    targets = [target([[0, 0, 100, 100], [800, 0, 820, 20], [200, 0, 300, 100], [400, 0, 500, 100],
                       [600, 0, 700, 100]], [WITH, WITH, WITH, WITHOUT, INCORRECT])]
    preds = [pred([[0, 0, 100, 100], [800, 0, 820, 20], [200, 0, 300, 62], [400, 0, 500, 100]],
                  [WITH, WITH, WITH, WITH], [0.9, 0.85, 0.8, 0.7])]
    result = compute_coco(preds, targets)
    recall = recall_by_iou(preds, targets, result)
    assert recall["iou_thresholds"][0] == 0.5 and recall["iou_thresholds"][-1] == 0.95
    at = {t: i for i, t in enumerate(recall["iou_thresholds"])}
    with_mask = recall["per_class"]["with_mask"]
    assert with_mask[at[0.5]] == with_mask[at[0.6]] == pytest.approx(1.0)
    assert with_mask[at[0.65]] == with_mask[at[0.95]] == pytest.approx(2 / 3)
    assert sum(with_mask) / len(with_mask) == pytest.approx(result.summary["per_class"]["with_mask"]["recall"])
    assert recall["per_class"]["without_mask"] == [0.0] * 10  # boxed, but as the wrong class
    assert recall["per_class"]["mask_weared_incorrect"] == [0.0] * 10
    # Whatever the class: four of five faces at IoU 0.5, three of five above 0.6.
    assert recall["any_class"][at[0.5]] == pytest.approx(0.8)
    assert recall["any_class"][at[0.95]] == pytest.approx(0.6)
    assert recall["any_class_mar"] == pytest.approx(sum(recall["any_class"]) / 10)


def test_recall_by_iou_leaves_out_classes_without_faces_and_copes_with_no_detections():
    targets = [target([[0, 0, 100, 100]], [WITH])]
    recall = recall_by_iou([no_pred()], targets, compute_coco([no_pred()], targets))
    assert set(recall["per_class"]) == {"with_mask"}
    assert recall["per_class"]["with_mask"] == [0.0] * 10
    assert recall["any_class"] == [0.0] * 10
    # a box of a class no face has: that class gets no row (its recall is undefined, not 0)
    preds = [pred([[300, 300, 400, 400]], [INCORRECT], [0.9])]
    recall = recall_by_iou(preds, targets, compute_coco(preds, targets))
    assert set(recall["per_class"]) == {"with_mask"} and recall["any_class"] == [0.0] * 10
    # boxes but no labelled face at all: nothing to report, and evaluation.txt prints no block
    empty = [target([], [])]
    recall = recall_by_iou(preds, empty, compute_coco(preds, empty))
    assert recall["per_class"] == {} and recall["any_class"] is None and recall["any_class_mar"] is None
    assert recall_lines(recall) == [] and recall_lines(None) == []


def test_the_class_free_row_counts_every_face_a_box_of_its_class_found():
    # 80 with_mask and 40 without_mask faces in one photo, each boxed exactly: 120 boxes, over COCO's 100 per
    # image, but within 100 per class; the class-free row must find all 120, as the class rows do.
    boxes = [[30 * i, 30 * j, 30 * i + 20, 30 * j + 20] for i in range(12) for j in range(10)]
    labels = [WITH] * 80 + [WITHOUT] * 40
    targets = [target(boxes, labels)]
    preds = [pred(boxes, labels, [0.9 - 0.001 * k for k in range(120)])]
    recall = recall_by_iou(preds, targets, compute_coco(preds, targets))
    assert recall["per_class"]["with_mask"] == pytest.approx([1.0] * 10)
    assert recall["per_class"]["without_mask"] == pytest.approx([1.0] * 10)
    assert recall["any_class"] == pytest.approx([1.0] * 10) and recall["any_class_mar"] == pytest.approx(1.0)


def test_per_class_ap_50_agrees_with_torchmetrics_single_threshold():
    from torchmetrics.detection import MeanAveragePrecision

    preds = [pred([[10, 10, 50, 52], [60, 12, 100, 50], [0, 0, 30, 30]], [WITH, WITHOUT, WITH], [0.9, 0.4, 0.7]),
             pred([[22, 20, 70, 75], [80, 80, 120, 120]], [INCORRECT, WITH], [0.6, 0.95])]
    ours = coco_map(preds, TARGETS)
    reference = MeanAveragePrecision(backend="faster_coco_eval", iou_thresholds=[0.5], class_metrics=True)
    reference.update(preds, TARGETS)
    expected = reference.compute()
    for k, label in enumerate(expected["classes"].tolist()):
        name = CONFUSION_LABELS[label - 1]
        assert ours["per_class"][name]["ap_50"] == pytest.approx(float(expected["map_per_class"][k]), abs=1e-6)


def test_pr_curves_come_from_coco_precision():
    preds = [pred([[10, 10, 50, 50], [0, 0, 5, 5]], [WITH, WITH], [0.9, 0.95]), no_pred()]
    result = compute_coco(preds, TARGETS)
    curves = pr_curves(result)
    assert set(curves) == {"with_mask", "without_mask", "mask_weared_incorrect"}
    with_mask = curves["with_mask"]
    assert len(with_mask["recall"]) == len(with_mask["precision"]) == 101
    # 1 of 2 faces found, after one false positive with a higher score: precision 0.5 up to recall 0.5,
    # then 0 (COCO's interpolated curve), and AP@0.5 is the mean of those 101 points.
    by_recall = dict(zip((round(r, 2) for r in with_mask["recall"]), with_mask["precision"]))
    assert by_recall[0.0] == pytest.approx(0.5) and by_recall[0.5] == pytest.approx(0.5)
    assert by_recall[0.51] == 0.0 and by_recall[1.0] == 0.0
    ap_50 = result.summary["per_class"]["with_mask"]["ap_50"]
    assert ap_50 == pytest.approx(sum(with_mask["precision"]) / 101)
    assert max(curves["without_mask"]["precision"]) == 0.0  # never detected


def test_empty_input_gives_undefined_metrics():
    result = coco_map([], [])
    assert result["map"] is None and result["per_class"]["with_mask"]["ap"] is None


def cm(preds, targets, **kwargs):
    matrix, labels = detection_confusion_matrix(preds, targets, **kwargs)
    assert labels == list(CONFUSION_LABELS)
    return matrix


def test_confusion_perfect_is_diagonal():
    preds = [pred(t["boxes"].tolist(), t["labels"].tolist(), [0.9] * len(t["labels"])) for t in TARGETS]
    matrix = cm(preds, TARGETS)
    assert matrix == [[2, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]


def test_confusion_miss_goes_to_background_column():
    matrix = cm([pred([[10, 10, 50, 50]], [WITH], [0.9])],
                [target([[10, 10, 50, 50], [60, 10, 100, 50]], [WITH, WITHOUT])])
    assert matrix[0][0] == 1
    assert matrix[1][BG] == 1  # the without_mask face was missed
    assert sum(map(sum, matrix)) == 2


def test_confusion_spurious_box_goes_to_background_row():
    matrix = cm([pred([[10, 10, 50, 50], [200, 200, 240, 240]], [WITH, INCORRECT], [0.9, 0.8])],
                [target([[10, 10, 50, 50]], [WITH])])
    assert matrix[0][0] == 1
    assert matrix[BG][2] == 1  # a mask_weared_incorrect box where there is no face
    assert sum(map(sum, matrix)) == 2


def test_confusion_class_confusion_is_off_diagonal():
    matrix = cm([pred([[10, 10, 50, 50]], [WITHOUT], [0.9])], [target([[10, 10, 50, 50]], [WITH])])
    assert matrix[0][1] == 1
    assert sum(map(sum, matrix)) == 1


def test_confusion_duplicate_detection_is_spurious():
    # Two boxes on one face: the higher score takes it, the other counts in the background row.
    matrix = cm([pred([[10, 10, 50, 50], [12, 10, 50, 52]], [WITH, WITH], [0.7, 0.9])],
                [target([[10, 10, 50, 50]], [WITH])])
    assert matrix[0][0] == 1
    assert matrix[BG][0] == 1
    assert matrix[0][BG] == 0


def test_confusion_score_and_iou_thresholds():
    targets = [target([[0, 0, 100, 100]], [WITH])]
    low_score = cm([pred([[0, 0, 100, 100]], [WITH], [0.3])], targets, score_threshold=0.5)
    assert low_score[0][BG] == 1 and low_score[BG][0] == 0  # below the threshold: as if absent
    low_iou = cm([pred([[0, 0, 100, 40]], [WITH], [0.9])], targets)  # IoU 0.4
    assert low_iou[0][BG] == 1 and low_iou[BG][0] == 1


def test_compliance_counts():
    summary = compliance([WITH, WITH, WITHOUT, INCORRECT])
    assert summary["faces"] == 4
    assert summary["counts"] == {"with_mask": 2, "without_mask": 1, "mask_weared_incorrect": 1}
    assert summary["percent_properly_masked"] == 50.0
    assert compliance(["with_mask", "without_mask", "without_mask"])["percent_properly_masked"] == pytest.approx(33.33)
    empty = compliance([])
    assert empty["faces"] == 0 and empty["percent_properly_masked"] is None
    assert compliance_line(empty).endswith(": no face kept at the threshold")
    with pytest.raises(ValueError, match="unknown class"):
        compliance([0])


def test_compliance_merge_and_line():
    overall = merge_compliance([compliance([WITH] * 30 + [WITHOUT] * 8), compliance([INCORRECT] * 4)])
    assert overall["faces"] == 42
    assert compliance_line(overall) == ("compliance: 42 faces, 30 with_mask, 8 without_mask, "
                                        "4 mask_weared_incorrect: 71.4% with_mask among the faces kept at the "
                                        "threshold (cc)")  # the count: "properly masked" is the estimate's


def test_a_figure_with_no_face_at_the_threshold_says_it_rests_on_the_detections_below_it():
    """Every detection under the threshold: no face counted, yet the score sums (pcc, pacc, pacc2) give a figure;
    the line read '0 faces, ...: 60.0% properly masked' as if it were of the faces counted."""
    from utils.detection.quantify import prediction_estimates

    soft = {"with_mask": 0.3, "without_mask": 0.2, "mask_weared_incorrect": 0.0}
    records = [{"file": f"{i}.jpg", "detections": [], "soft_counts": soft} for i in range(5)]
    estimate = prediction_estimates(records, None, 0.5, method="pcc", replicates=50)["estimate"]
    assert estimate["percent"] == 60.0  # the estimator's figure stays as it is
    assert compliance_line(compliance([]), estimate) == (
        "compliance: 0 faces, 0 with_mask, 0 without_mask, 0 mask_weared_incorrect: no face kept at the threshold; "
        "the estimate reads the scores below it (2.5 faces by the estimator): 60.0% properly masked "
        "(no interval: every resample of the 5 images gives 60.0%, which shows no spread, not certainty, 5 images; "
        "pcc)")
    many = compliance_line(compliance([]), {**estimate, "faces_estimated": 1234567.8})  # 100k images and more
    assert "the estimate reads the scores below it (1234567.8 faces by the estimator)" in many  # not 1.23457e+06
    counted = compliance([WITH])
    assert compliance_line(counted, {**estimate, "faces_found": 1, "low": 50.0, "high": 70.0}).endswith(
        ": 60.0% properly masked (95% interval 50.0-70.0%, 5 images; pcc)")


def test_no_ground_truth_faces_gives_undefined_not_zero():
    empty_target = target([], [])
    result = compute_coco([pred([[1, 1, 10, 10]], [WITH], [0.9])], [empty_target])
    assert result.summary["map"] is None
    assert all(entry["ap"] is None for entry in result.summary["per_class"].values())
    assert pr_curves(result) == {}
    assert cm([pred([[1, 1, 10, 10]], [WITH], [0.9])], [empty_target])[BG][0] == 1


# -- compliance error: the headline figure against the truth, at the operating threshold

def test_compliance_error_counts_only_detections_at_or_above_the_threshold():
    # image 1: truth 1 with / 1 without; kept at 0.5: with, with (the 0.4 without is dropped)
    # image 2: truth 1 incorrect / 1 with; kept: without, with
    preds = [pred([[0, 0, 1, 1]] * 3, [WITH, WITH, WITHOUT], [0.9, 0.5, 0.4]),
             pred([[0, 0, 1, 1]] * 2, [WITHOUT, WITH], [0.8, 0.7])]
    error = compliance_error(preds, TARGETS, score_threshold=0.5)
    assert error["true"]["counts"] == {"with_mask": 2, "without_mask": 1, "mask_weared_incorrect": 1}
    assert error["predicted"]["counts"] == {"with_mask": 3, "without_mask": 1, "mask_weared_incorrect": 0}
    assert error["true"]["percent_properly_masked"] == 50.0
    assert error["predicted"]["percent_properly_masked"] == 75.0
    assert error["error_points"] == 25.0
    # per image: |100 - 50| and |50 - 50|
    assert error["per_image_mae_points"] == 25.0 and error["images_compared"] == 2
    # a lower threshold keeps the 0.4 box: image 1 reads 66.7 %, the set 60 %
    lower = compliance_error(preds, TARGETS, score_threshold=0.3)
    assert lower["error_points"] == pytest.approx(10.0)
    assert lower["per_image_mae_points"] == pytest.approx((100 * 2 / 3 - 50) / 2, abs=0.01)


def test_compliance_error_counts_images_whose_figure_cannot_be_read():
    preds = [no_pred(), pred([[0, 0, 1, 1]], [WITH], [0.9])]
    targets = [TARGETS[0], target([], [])]
    error = compliance_error(preds, targets, score_threshold=0.5)
    assert error["images_without_detections"] == 1 and error["images_without_faces"] == 1
    assert error["images_compared"] == 0 and error["per_image_mae_points"] is None
    # the set as a whole still has both figures: truth 50 %, predicted 100 %
    assert error["error_points"] == 50.0
    nothing = compliance_error([no_pred()], [TARGETS[0]], score_threshold=0.5)
    assert nothing["predicted"]["percent_properly_masked"] is None and nothing["error_points"] is None


# -- the operating threshold, chosen on labelled images

def test_the_operating_threshold_drops_low_scoring_spurious_boxes():
    faces = [pred(t["boxes"].tolist(), t["labels"].tolist(), [0.9] * len(t["labels"])) for t in TARGETS]
    spurious = [pred([[200, 200, 240, 240]], [WITH], [0.3]), pred([[300, 300, 340, 340]], [WITHOUT], [0.3])]
    preds = [merge_preds(a, b) for a, b in zip(faces, spurious)]
    choice = choose_operating_threshold(preds, TARGETS)
    # 0.35 to 0.9 keep exactly the four faces; the lowest of the equally good thresholds is taken
    assert choice["score_threshold"] == 0.35
    assert choice["f1"] == pytest.approx(1.0) and choice["compliance_error_points"] == 0.0
    assert detection_f1(preds, TARGETS, 0.3)["precision"] == pytest.approx(4 / 6)
    assert [row["score_threshold"] for row in choice["candidates"]][:2] == [0.05, 0.1]


def test_the_operating_threshold_prefers_a_good_detector_to_errors_that_cancel():
    truth = [target([[10, 10, 50, 50], [60, 10, 100, 50], [10, 60, 50, 100], [60, 60, 100, 100]],
                    [WITH, WITH, WITHOUT, WITHOUT])]
    # at 0.9: both masked faces and one unmasked face (the other is missed): 66.7 % against 50 %
    # at 0.2 a spurious unmasked box on the background "fixes" the figure (50 %) with a worse F1
    preds = [pred([[10, 10, 50, 50], [60, 10, 100, 50], [10, 60, 50, 100], [200, 200, 240, 240]],
                  [WITH, WITH, WITHOUT, WITHOUT], [0.9, 0.9, 0.9, 0.2])]
    assert compliance_error(preds, truth, 0.2)["error_points"] == 0.0
    choice = choose_operating_threshold(preds, truth)
    assert choice["score_threshold"] == 0.25
    assert choice["f1"] == pytest.approx(6 / 7) and choice["compliance_error_points"] == pytest.approx(16.67)


def merge_preds(a, b):
    return {key: torch.cat([a[key], b[key]]) for key in a}
