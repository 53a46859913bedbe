"""bench/false_share_by_score.py: its pacc2 is the jobs' pacc2, and its per-band form is exact on its own rates."""

import importlib.util
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from utils.detection import quantify as Q

BENCH = Path(__file__).resolve().parents[1] / "bench" / "false_share_by_score.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("false_share_by_score", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


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
    figures = load_bench().estimates(calibration, target)
    rates = Q.Calibration.from_record(quantify_record(calibration))
    labelled = Q.Calibration.from_record(quantify_record(target))
    units = Q.Units.from_calibration(labelled)
    share, _ = Q.point_estimate("pacc2", units.counts.sum(axis=0), units.soft.sum(axis=0),
                                (rates.confusion.sum(axis=0), rates.soft.sum(axis=0), rates.truth.sum(axis=0)))
    assert figures["percent"]["pacc2"] == pytest.approx(100 * share, abs=0.01)
    assert figures["true_percent"] == pytest.approx(Q.true_percent(labelled), abs=0.01)


def test_every_form_is_exact_on_its_own_rates_and_one_band_is_plain_pacc2(monkeypatch):
    bench = load_bench()
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
    assert "a target set of 30 images holds no labelled face" in capsys.readouterr().err.strip().splitlines()[-1]
