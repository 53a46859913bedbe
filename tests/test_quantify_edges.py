"""The percent properly masked at its edges (utils/detection/quantify.py): what an interval may claim (none from one
image with faces or from images all alike, an exact bound at 0 or 100 %, always its own figure) and the figures per
folder where a folder's images could not be read."""

import numpy as np
import pytest

from helpers import simulated_labelled_images as simulate
from utils.detection.compliance import interval_text
from utils.detection.quantify import Calibration, Units, estimate, prediction_estimates


def labelled(records) -> Calibration:
    return Calibration.from_record({"images": records})


def test_no_interval_from_one_image_with_faces_or_from_replicates_without_spread():
    """A width-zero interval claimed certainty: faces in one image of three (every replicate that finds a face draws
    that image again) read 66.67-66.67 %, images all alike 50.0-50.0 %; now no interval, and the note says why."""
    one = estimate(Units.of([[2, 1, 0], [0, 0, 0], [0, 0, 0]]), "cc", replicates=200)
    assert one["percent"] == pytest.approx(66.67) and one["low"] is one["high"] is None
    assert one["note"] == "faces found in one image of 3: no interval" and "no interval" in interval_text(one)
    alike = estimate(Units.of([[2, 1, 1], [1, 0, 1], [1, 1, 0]]), "cc", replicates=200)
    assert alike["percent"] == 50.0 and alike["low"] is alike["high"] is None and alike["replicates_defined"] == 200
    assert "gives 50.0%, which shows no spread, not certainty" in interval_text(alike)
    # the note's figure as the line's, to one decimal: '61.3% properly masked (... gives 61.25%, ...' before
    tie = estimate(Units.of([[49, 31, 0]] * 3), "cc", replicates=50)
    assert interval_text(tie).startswith("61.3% properly masked (no interval: every resample of the 3 images gives "
                                         "61.3%, which")
    for method in ("pcc", "pacc2"):  # the score sums: an image with scores under the threshold holds some
        soft = Units.of([[2, 1, 0], [0, 0, 0]], [[1.8, 0.9, 0.1], [0.2, 0.1, 0]])
        result = estimate(soft, method, labelled(simulate(np.random.default_rng(2), 30)), replicates=100)
        assert result["low"] is not None and result["low"] <= result["percent"] <= result["high"], method


def test_a_folder_of_skipped_images_alone_is_listed_per_folder_with_a_note():
    images = [{"file": f"site-a/{k}.jpg", "folder": "site-a", "detections": [{"label": "with_mask", "score": 0.9}],
               "soft_counts": None} for k in range(3)]
    skipped = [{"file": "site-b/0.jpg", "reason": "truncated", "folder": "site-b"},
               {"file": "site-a/9.jpg", "reason": "truncated", "folder": "site-a"},
               {"file": "notes.txt", "reason": "not an image file name (extension '.txt')"}]  # no image: no folder
    report = prediction_estimates(images, None, 0.5, skipped=skipped, replicates=20)
    assert list(report["per_folder"]) == ["site-a", "site-b"] and report["estimate"]["units"] == 3
    read, unread = report["per_folder"]["site-a"], report["per_folder"]["site-b"]
    assert (read["percent"], read["units"], read["images_skipped"]) == (100.0, 3, 1)
    assert (unread["percent"], unread["units"], unread["images_skipped"]) == (None, 0, 1)
    assert interval_text(unread).startswith("no figure (every image in it skipped (1;")
    assert "per_folder" not in prediction_estimates(images, None, 0.5, skipped=skipped[1:], replicates=20)


def test_every_face_of_one_kind_has_the_exact_bound_of_its_images():
    """50 photos, every face properly masked: every resample gives 100 %, which read 100.0-100.0 % (certainty), then
    no interval at all, where a sound one exists: the exact (Clopper-Pearson) bound with the images holding faces as
    the trials (their faces are all masked at most as often as their first is): 0.025^(1/50), 92.89-100 %."""
    faces = np.random.default_rng(3).integers(1, 6, 50)
    masked = estimate(Units.of([[k, 0, 0] for k in faces] + [[0, 0, 0]] * 9), "cc", replicates=200)
    assert (masked["percent"], masked["low"], masked["high"]) == (100.0, 92.89, 100.0)
    assert interval_text(masked) == "100.0% properly masked (95% interval 92.9-100.0%, 59 images; cc)"
    assert masked["note"] == ("every resample gives 100%: the exact bound for 50 images with faces, all properly "
                              "masked (images as the trials)")
    none = estimate(Units.of([[0, k, 1] for k in faces[:3]]), "cc", replicates=200)
    assert (none["percent"], none["low"], none["high"]) == (0.0, 0.0, 70.76)  # 1 - 0.025^(1/3)
    # an adjusted figure held at 100 % in every resample (no score sum of the other classes) likewise
    calibration = labelled(simulate(np.random.default_rng(2), 30))
    held = estimate(Units.of([[k, 0, 0] for k in faces[:20]], [[0.9 * k, 0, 0] for k in faces[:20]]), "pacc2",
                    calibration, replicates=100)
    assert (held["percent"], held["low"], held["high"]) == (100.0, 83.16, 100.0)  # 0.025^(1/20)


# 7 labelled images of a detector that confuses the classes a lot, as calibration_image records (a search of random
# ones): pacc on two images read 94.22 % with an interval 0.0-76.86 %, acc 89.84 % with 0.0-89.82 %
ERRATIC = [([3, 2, 3], [[0, 3, 0, 0], [0, 0, 0, 2], [1, 1, 0, 1], [2, 2, 0, 0]],
            [[0, 2, 0], [0, 0, 0], [0.98, 0.63, 0], [0.64, 1.93, 0]]),
           ([0, 1, 3], [[0, 0, 0, 0], [0, 0, 0, 1], [1, 0, 0, 2], [2, 0, 0, 0]], [[0] * 3, [0] * 3, [0.51, 0, 0],
                                                                                   [0.86, 0, 0]]),
           ([1, 0, 3], [[0, 0, 0, 1], [0, 0, 0, 0], [3, 0, 0, 0], [2, 1, 0, 0]], [[0] * 3, [0] * 3, [2.71, 0, 0],
                                                                                   [1.06, 0.98, 0]]),
           ([2, 3, 0], [[0, 0, 2, 0], [1, 1, 0, 1], [0, 0, 0, 0], [2, 1, 1, 0]],
            [[0, 0, 1.62], [0.59, 0.6, 0], [0] * 3, [1.42, 0.74, 0.92]]),
           ([1, 0, 3], [[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 2, 0], [1, 0, 2, 0]],
            [[0.72, 0, 0], [0] * 3, [0, 0.35, 1.04], [0.86, 0, 1.69]]),
           ([3, 2, 2], [[3, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [2, 2, 0, 0]],
            [[2.78, 0, 0], [0.71, 0.57, 0], [0, 0.78, 0.83], [1.09, 1.58, 0]]),
           ([1, 0, 1], [[0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0]], [[0] * 3, [0] * 3, [0, 0, 0.96],
                                                                                   [0, 0, 0.39]])]


def test_an_interval_holds_its_own_figure():
    """A percentile interval need not hold its estimate: the printed line read '94.2% properly masked (95% interval
    0.0-76.9%, ...)', the figure outside its own range. The end the replicates leave short now reaches the figure."""
    calibration = labelled([{"truth": t, "confusion": c, "soft": s} for t, c, s in ERRATIC])
    units = Units.of([[3, 1, 1], [1, 2, 1]], [[1.15, 0.69, 0.53], [0.75, 1.54, 0.84]])
    pacc = estimate(units, "pacc", calibration, replicates=200, seed=271)
    assert (pacc["percent"], pacc["low"], pacc["high"]) == (94.22, 0.0, 94.22)
    assert estimate(units, "acc", calibration, replicates=200, seed=271)["high"] == 89.84
    rng = np.random.default_rng(8)  # and on sets of every size, every estimator, the same: seeded, within 0-100 %
    for size in (2, 3, 5, 12):
        units = Units.from_calibration(labelled(simulate(rng, size)))
        for method in ("cc", "pcc", "acc", "pacc", "pacc2"):
            result = estimate(units, method, calibration, replicates=100, seed=size)
            assert result == estimate(units, method, calibration, replicates=100, seed=size)
            if result["low"] is not None:
                assert 0 <= result["low"] <= result["percent"] <= result["high"] <= 100, (size, method, result)


def test_the_same_images_get_the_same_interval_whatever_their_names_and_order():
    """The bootstrap draws images by position, and they went in the order of their names, which differ by path: the
    same photos in folders site and site-2 read 41.9 % (17.2-69.3 %) from predict on the folder (/in/site-2/x before
    /in/site/y), 41.9 % (18.5-67.5 %) from a merge of its shards (shard-000000.tar:site/y first) and 41.9 %
    (18.9-68.8 %) from the service (the uploads' names, no folder). Now they are drawn in the order of their counts."""
    rng, calibration = np.random.default_rng(5), {"score_threshold": 0.5, "floor": 0.05, "iou_threshold": 0.5,
                                                  "classes": ["with_mask", "without_mask", "mask_weared_incorrect"],
                                                  "images": simulate(np.random.default_rng(2), 60)}
    images = []
    for k in range(12):
        labels = rng.choice(["with_mask", "with_mask", "without_mask", "mask_weared_incorrect"], rng.integers(0, 5))
        images.append({"folder": ("site", "site-2")[k % 2], "detections": [{"label": str(name)} for name in labels],
                       "soft_counts": dict(zip(calibration["classes"], rng.uniform(0, 3, 3).round(4).tolist()))})
    named = {"predict": lambda k, image: f"/in/{image['folder']}/{k:04d}.jpg",
             "merge": lambda k, image: f"shard-00000{k // 5}.tar:{image['folder']}/{k:04d}.jpg",
             "service": lambda k, image: f"{k:04d}.jpg"}
    reports = {path: prediction_estimates([{**image, "file": name(k, image)} for k, image in enumerate(images)],
                                          calibration, 0.5, replicates=200) for path, name in named.items()}
    backwards = [{**image, "file": f"{k:04d}.jpg"} for k, image in reversed(list(enumerate(images)))]
    reports["sent backwards"] = prediction_estimates(backwards, calibration, 0.5, replicates=200)
    assert reports["predict"]["estimate"]["method"] == "pacc2" and reports["predict"]["estimate"]["low"] is not None
    for path, report in reports.items():
        for key in ("estimate", "estimates", "per_folder"):
            assert report[key] == reports["predict"][key], (path, key)
