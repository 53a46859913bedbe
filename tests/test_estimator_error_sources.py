"""bench/estimator_error_sources.py: its decomposition of pacc2's error, and its refusal of records it cannot use."""

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import load_bench
from helpers import simulated_labelled_images as simulate

BENCH = Path(__file__).resolve().parents[1] / "bench" / "estimator_error_sources.py"


def test_a_set_read_with_its_own_rates_has_no_error_in_any_pacc2_column():
    # rates measured on the target itself: both parts are the target's, so pacc2 and its part-swapped forms are exact
    images = simulate(np.random.default_rng(3), 200)
    row = load_bench("estimator_error_sources").set_row("own", "fold", {"images": images}, {"images": images})
    for column in ("pacc2", "pacc2, target's false share", "pacc2, target's per-face rates"):
        assert row["errors"][column] == pytest.approx(0.0, abs=0.01), column
    assert row["rates"]["validation"] == row["rates"]["target"]


@pytest.mark.parametrize("part", ["held_out", "rates"])
def test_a_set_without_labelled_faces_is_refused_by_name_not_read_as_nan(part, tmp_path, monkeypatch, capsys):
    images = simulate(np.random.default_rng(4), 40)
    empty = [{**image, "truth": [0] * len(image["truth"])} for image in images]
    records = tmp_path / "records.json"
    records.write_text(json.dumps({"folds": [{"rates": {"images": images}, "held_out": {"images": images}},
                                             {"rates": {"images": images}, "held_out": {"images": images},
                                              part: {"images": empty}}]}))
    monkeypatch.setattr(sys, "argv", [str(BENCH), "--records", str(records)])
    with pytest.raises(SystemExit) as refused:
        runpy.run_path(str(BENCH), run_name="__main__")
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert refused.value.code == 2
    assert f"{records}" in error and "records fold 1: its" in error and "hold no labelled face" in error
