"""bench/detections_cap.py: which photos the detections-per-image cap (utils/defaults.py: DETECTIONS_PER_IMAGE) may
have cut, each pass of flip TTA counted apart."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_box_voting import flat_set


@pytest.fixture()
def bench(root, monkeypatch):
    monkeypatch.syspath_prepend(str(root / "bench"))  # as when run: bench/ first on sys.path (box_voting)
    spec = importlib.util.spec_from_file_location("detections_cap_bench", root / "bench" / "detections_cap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_photo_whose_pass_reached_the_cap_is_listed_as_cut_above_the_floor(bench, sample_dir, tiny_model_file,
                                                                              tmp_path):
    """Under flip TTA the cap bites each pass before weighted box fusion, and a pass at the cap always cut boxes at
    or above the floor (the model emits none under it); the fused boxes' lowest score, which can be half a pass's,
    cannot say so. Each listed photo names its file and each pass's detections."""
    from utils.detection.evaluation import labelled_pairs, load_trained_model

    model, _, _, _ = load_trained_model(tiny_model_file, torch.device("cpu"), tta=True)
    folder = flat_set(sample_dir, tmp_path / "set", 3)
    pairs = labelled_pairs(folder, folder)[0]
    cap = 3
    model.roi_heads.detections_per_img = cap  # the untrained model gives every proposal a box of each class
    rows = bench.images_at_cap(model, pairs, tta=True, cap=cap)
    assert [row["file"] for row in rows] == [pair.image.name for pair in pairs]
    for row in rows:
        assert len(row["pass_detections"]) == 2 and max(row["pass_detections"]) == cap  # plain and flipped
        assert row["cut_above_floor"] is True
    assert bench.images_at_cap(model, pairs, tta=True, cap=10_000) == []

