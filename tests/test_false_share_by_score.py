"""bench/false_share_by_score.py: its pacc2 is the jobs' pacc2, and its per-band form is exact on its own rates."""

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import load_bench
from utils.detection import quantify as Q

BENCH = Path(__file__).resolve().parents[1] / "bench" / "false_share_by_score.py"


def simulated(rng, n: int, background_scores=(0.05, 0.6)) -> list[dict]:
    """Images of 0-5 faces, each giving one to three detections of distinct classes, and 0-4 on no face (row 3)."""
    images = []
    for _ in range(n):
        truth = [0, 0, 0]
        detections = []
        for _ in range(rng.integers(0, 6)):
            face = int(rng.choice(3, p=[0.75, 0.2, 0.05]))
            truth[face] += 1
            for column in rng.choice(3, size=rng.integers(1, 4), replace=False):  # its own class scores higher
                low, high = (0.5, 1.0) if column == face else (0.05, 0.4)
                detections.append([face, int(column), round(float(rng.uniform(low, high)), 4)])
        for _ in range(rng.integers(0, 5)):
            detections.append([3, int(rng.integers(0, 3)), round(float(rng.uniform(*background_scores)), 4)])
        images.append({"truth": truth, "detections": detections})
    return images


def quantify_record(images: list[dict]) -> dict:
    """The same images as quantify's calibration records: truth and score sums by true row and class."""
    records = []
    for image in images:
        soft = np.zeros((4, 3))
        for row, column, score in image["detections"]:
            soft[row, column] += score
        records.append({"truth": image["truth"], "confusion": np.zeros((4, 4)).tolist(), "soft": soft.tolist()})
    return {"images": records}


def test_its_pacc2_is_the_jobs_pacc2():
    rng = np.random.default_rng(5)
    calibration, target = simulated(rng, 80), simulated(rng, 120, background_scores=(0.05, 0.2))
    figures = load_bench("false_share_by_score").estimates(calibration, target)
    rates = Q.Calibration.from_record(quantify_record(calibration))
    labelled = Q.Calibration.from_record(quantify_record(target))
    units = Q.Units.from_calibration(labelled)
    share, _ = Q.point_estimate("pacc2", units.counts.sum(axis=0), units.soft.sum(axis=0),
                                (rates.confusion.sum(axis=0), rates.soft.sum(axis=0), rates.truth.sum(axis=0)))
    assert figures["percent"]["pacc2"] == pytest.approx(100 * share, abs=0.01)
    assert figures["true_percent"] == pytest.approx(Q.true_percent(labelled), abs=0.01)


def test_every_form_is_exact_on_its_own_rates_and_one_band_is_plain_pacc2(monkeypatch):
    bench = load_bench("false_share_by_score")
    rng = np.random.default_rng(6)
    images = simulated(rng, 150)
    assert all(error == pytest.approx(0.0, abs=0.01) for error in bench.estimates(images, images)["errors"].values())
    calibration, target = simulated(rng, 80), simulated(rng, 120, background_scores=(0.05, 0.2))
    banded = bench.estimates(calibration, target)["percent"]
    assert banded["pacc2, by band"] != pytest.approx(banded["pacc2"], abs=0.1)  # the bands see the low false scores
    monkeypatch.setattr(bench, "BANDS", (0.05,))
    one_band = bench.estimates(calibration, target)["percent"]
    assert one_band["pacc2, by band"] == pytest.approx(one_band["pacc2"], abs=1e-6)


def test_a_set_without_labelled_faces_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    images = simulated(np.random.default_rng(7), 30)
    empty = [{"truth": [0, 0, 0], "detections": image["detections"]} for image in images]
    records = tmp_path / "records.json"
    records.write_text(json.dumps({"sets": [{"kind": "fold", "model": "m.pt", "target": "t", "val": images,
                                             "held_out": empty}]}))
    monkeypatch.setattr(sys, "argv", [str(BENCH), "--from-records", str(records)])
    with pytest.raises(SystemExit) as refused:
        runpy.run_path(str(BENCH), run_name="__main__")
    assert refused.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "m.pt on t" in error and "a target set of 30 images holds no labelled face" in error


@pytest.mark.parametrize("sets, problem", [
    ([], "no set"),
    ([{"val": [], "held_out": []}], "set 0: no val images"),
    ([{"val": [{"truth": [1, 0], "detections": []}], "held_out": []}], "a truth that is not three face counts"),
    ([{"val": [{"truth": [1, 0, 0], "detections": [[0, 1]]}], "held_out": []}], "detections that are not"),
    ([{"val": [{"truth": [1, 0, 0], "detections": [[7, 1, 0.5]]}], "held_out": []}], "detections that are not"),
])
def test_a_records_file_it_cannot_use_is_refused_by_name(sets, problem, tmp_path, monkeypatch, capsys):
    records = tmp_path / "records.json"
    records.write_text(json.dumps({"sets": sets}))
    monkeypatch.setattr(sys, "argv", [str(BENCH), "--from-records", str(records)])
    with pytest.raises(SystemExit) as refused:
        runpy.run_path(str(BENCH), run_name="__main__")
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert refused.value.code == 2 and f"--from-records {records}: not a records file" in error and problem in error


def test_a_floor_reads_pacc2_of_the_detections_above_it():
    bench = load_bench("false_share_by_score")
    rng = np.random.default_rng(8)
    calibration, target = simulated(rng, 80), simulated(rng, 120, background_scores=(0.05, 0.9))
    figures = bench.estimates(calibration, target)["percent"]
    for floor in bench.FLOORS:
        def above(images, floor=floor):
            return [{**image, "detections": [d for d in image["detections"] if d[2] >= floor]} for image in images]
        assert figures[f"pacc2, floor {floor:g}"] == pytest.approx(
            bench.estimates(above(calibration), above(target))["percent"]["pacc2"], abs=1e-6)
        assert figures[f"pacc2, floor {floor:g}"] != pytest.approx(figures["pacc2"], abs=0.05)


def test_its_detection_rows_sum_to_soft_confusion():
    import torch

    from utils.detection.metrics import soft_confusion

    bench = load_bench("false_share_by_score")
    rng = np.random.default_rng(9)
    for faces, detections in [(0, 5), (4, 0), (3, 12), (6, 30)]:
        corners = rng.uniform(0, 80, (faces, 2))
        target = {"boxes": torch.tensor(np.hstack([corners, corners + rng.uniform(10, 30, (faces, 2))]),
                                        dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.tensor(rng.integers(1, 4, faces), dtype=torch.int64)}
        near = rng.uniform(0, 80, (detections, 2))
        boxes = np.hstack([near, near + rng.uniform(10, 30, (detections, 2))])
        if faces:  # half the detections jittered copies of a face
            picked = rng.integers(0, faces, detections // 2)
            boxes[: detections // 2] = target["boxes"].numpy()[picked] + rng.normal(0, 2, (detections // 2, 4))
        pred = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "scores": torch.tensor(rng.uniform(0.0, 1.0, detections), dtype=torch.float32),
                "labels": torch.tensor(rng.integers(1, 4, detections), dtype=torch.int64)}
        sums = np.zeros((4, 3))
        for row, column, score in bench.detection_rows(pred, target):
            sums[row, column] += score
        assert sums == pytest.approx(np.asarray(soft_confusion(pred, target)), abs=1e-3)
