"""The compliance figure as an estimate with an interval (utils/detection/quantify.py), on synthetic
per-image data whose true rates are known."""

import numpy as np
import pytest
import torch

from helpers import simulated_labelled_images as simulate
from utils.detection.compliance import interval_text
from utils import defaults as D
from utils.detection.quantify import (Calibration, Units, adjusted_counts, calibration_image, calibration_problem,
                                      estimate, image_units, masked_or_not,
                                      prediction_estimates, set_estimates, soft_counts)


def labelled(records) -> Calibration:
    return Calibration.from_record({"images": records})


def test_adjusted_count_recovers_the_truth_where_classify_and_count_is_biased():
    rng = np.random.default_rng(1)
    calibration, target = labelled(simulate(rng, 400)), labelled(simulate(rng, 400))
    truth = 100 * target.truth[:, 0].sum() / target.truth.sum()
    units = Units.from_calibration(target)
    cc = estimate(units, "cc", replicates=200)
    acc = estimate(units, "acc", calibration, replicates=200)
    pacc = estimate(units, "pacc", calibration, replicates=200)
    assert cc["percent"] - truth > 8  # counting over-states compliance, and its interval misses the truth
    assert not cc["low"] <= truth <= cc["high"]
    for adjusted in (acc, pacc):  # inverting the rates removes the bias (and widens the interval)
        assert abs(adjusted["percent"] - truth) < 0.4 * abs(cc["percent"] - truth)
        assert adjusted["low"] <= truth <= adjusted["high"]
        assert adjusted["high"] - adjusted["low"] > cc["high"] - cc["low"]
    assert acc["calibration_images"] == 400 and cc["calibration_images"] is None
    assert acc["faces_found"] == cc["faces_found"] == int(units.counts.sum())


def test_a_sets_own_rates_give_back_its_true_faces_per_class():
    # bench/calibration_rates.py reads an adjusted estimate's error as its rates' error: that holds only
    # because the set's own rates solve back to exactly its faces per class, for counts and score sums
    target = labelled(simulate(np.random.default_rng(3), 60))
    units = Units.from_calibration(target)
    truth = target.truth.sum(axis=0)
    for observed, rates in ((units.counts.sum(axis=0), target.confusion.sum(axis=0)[:, :3]),
                            (units.soft.sum(axis=0), target.soft.sum(axis=0))):
        np.testing.assert_allclose(adjusted_counts(observed, rates, truth), truth, atol=1e-6)


def test_pooled_rates_give_back_a_sets_own_faces_masked_or_not():
    target = labelled(simulate(np.random.default_rng(3), 60))
    observed, rates, truth = masked_or_not(Units.from_calibration(target).soft.sum(axis=0),
                                           target.soft.sum(axis=0), target.truth.sum(axis=0))
    assert rates.shape == (3, 2) and truth.tolist() == [target.truth[:, 0].sum(), target.truth[:, 1:].sum()]
    np.testing.assert_allclose(adjusted_counts(observed, rates, truth), truth, atol=1e-6)


# incorrectly worn masks found and labelled almost as with_mask faces are (the real data's seed-11 split:
# per-face score rates [0.84, 0.11, 0.08] and [0.81, 0.19, 0.15]), and few of them among the faces
LOOKALIKE_RATES = ((0.70, 0.05, 0.03), (0.10, 0.55, 0.03), (0.62, 0.08, 0.08))
LOOKALIKE_SHARES = (0.78, 0.17, 0.05)


def _errors_and_widths(method, shares, target_shares, runs=12):
    """|error| and interval width of *method* over *runs* simulations: new calibration and target images
    each time (60 and 120), the target drawn with the class mix *target_shares*."""
    errors, widths = [], []
    for run in range(runs):
        rng = np.random.default_rng(500 + run)
        calibration = labelled(simulate(rng, 60, shares, LOOKALIKE_RATES))
        target = labelled(simulate(rng, 120, target_shares, LOOKALIKE_RATES))
        truth = 100 * target.truth[:, 0].sum() / target.truth.sum()
        result = estimate(Units.from_calibration(target), method, calibration, replicates=200, seed=run)
        errors.append(abs(result["percent"] - truth))
        widths.append(result["high"] - result["low"])
    return np.mean(errors), np.mean(widths)


def test_pooling_keeps_the_solve_conditioned_where_a_rare_class_looks_like_with_mask():
    """pacc's three-class solve trades with_mask faces for look-alike incorrect ones: its figure wanders
    and its interval spans most of 0-100 %; pacc2 pools the two other classes and stays near the truth."""
    pacc_error, pacc_width = _errors_and_widths("pacc", LOOKALIKE_SHARES, LOOKALIKE_SHARES)
    pacc2_error, pacc2_width = _errors_and_widths("pacc2", LOOKALIKE_SHARES, LOOKALIKE_SHARES)
    assert pacc2_error < 5 < 10 < pacc_error and pacc2_width < 0.5 * pacc_width


def test_pooling_assumes_the_calibration_mix_of_the_other_classes():
    """pacc2's price: a target with six times the calibration's share of incorrect (look-alike) faces reads
    high, because the pooled row expects fewer with_mask-like productions from the unmasked faces."""
    same, _ = _errors_and_widths("pacc2", LOOKALIKE_SHARES, LOOKALIKE_SHARES)
    shifted, _ = _errors_and_widths("pacc2", LOOKALIKE_SHARES, (0.55, 0.15, 0.30))
    assert shifted > same + 5


@pytest.mark.parametrize("method, first_seed", [("acc", 100), ("cc", 200), ("pacc2", 300)])
def test_the_interval_covers_the_truth_in_most_simulations(method, first_seed):
    """A real coverage check: new calibration and target images every time, the truth of each target. acc and
    pacc2 (the headline) correct with the calibration images' rates; cc's interval spans its error on them (plain
    cc: 1 of 40)."""
    covered, runs = 0, 40
    for run in range(runs):
        rng = np.random.default_rng(first_seed + run)
        calibration, target = labelled(simulate(rng, 80)), labelled(simulate(rng, 80))
        truth = 100 * target.truth[:, 0].sum() / target.truth.sum()
        result = estimate(Units.from_calibration(target), method, calibration, replicates=300, seed=run)
        covered += result["low"] <= truth <= result["high"]
    assert covered >= 0.85 * runs, f"the 95 % interval covered the truth in {covered} of {runs} runs"


def test_the_counts_interval_spans_their_error_on_the_calibration_images():
    """cc and pcc keep their plain point estimate; given calibration images, their interval also spans
    the estimate less their error there, so it reaches the truth that the plain interval misses."""
    rng = np.random.default_rng(1)
    calibration, target = labelled(simulate(rng, 400)), labelled(simulate(rng, 400))
    truth = 100 * target.truth[:, 0].sum() / target.truth.sum()
    units = Units.from_calibration(target)
    for method in ("cc", "pcc"):
        plain = estimate(units, method, replicates=200)
        widened = estimate(units, method, calibration, replicates=200)
        assert widened["percent"] == plain["percent"] and widened["calibration_images"] == 400
        assert widened["low"] <= plain["low"] <= plain["high"] <= widened["high"]
        assert widened["low"] <= widened["percent"] <= widened["high"]
        if not plain["low"] <= truth <= plain["high"]:  # cc's bias: outside plainly, inside widened
            assert widened["low"] <= truth <= widened["high"]
    cc = estimate(units, "cc", calibration, replicates=200)
    assert cc["calibration_error_points"] > 8 and cc["resampled"] == "images and the calibration images"


def test_the_replicates_do_not_depend_on_chunks_or_on_the_calibration_draws(monkeypatch):
    """The same seed gives the same interval in one chunk or many, and a widened count interval holds the
    plain one: the target's draws have a stream of their own."""
    from utils.detection import quantify

    rng = np.random.default_rng(4)
    calibration, units = labelled(simulate(rng, 60)), Units.from_calibration(labelled(simulate(rng, 50)))
    whole = {m: estimate(units, m, calibration, replicates=150, seed=9) for m in ("cc", "pcc", "acc")}
    plain = estimate(units, "cc", replicates=150, seed=9)
    monkeypatch.setattr(quantify, "BOOTSTRAP_CHUNK_DRAWS", 130)  # 2 rows a chunk
    assert {m: estimate(units, m, calibration, replicates=150, seed=9) for m in whole} == whole
    assert estimate(units, "cc", replicates=150, seed=9) == plain
    assert whole["cc"]["low"] <= plain["low"] <= plain["high"] <= whole["cc"]["high"]


# estimate(..., replicates=300, seed=11) of simulate(default_rng(5)): 40 calibration images, then targets of 3 and
# 12 images; [percent, low, high, replicates_defined] as the code before the replicates were solved as a stack gave
# (on the targets in the order of their numbers, the order estimate draws them in since 2026-12-07; 3/acc: every
# replicate read 0.0, an interval 0.0-0.0 before; now the exact bound of its 3 images, test_quantify_edges).
ADJUSTED_GOLDEN = {"3/acc": [0.0, 0.0, 70.76, 300], "3/pacc": [0.0, 0.0, 10.6, 300], "3/pacc2": [0.0, 0.0, 6.98, 300],
                   "12/acc": [37.96, 0.0, 75.4, 300], "12/pacc": [58.35, 45.05, 70.02, 300],
                   "12/pacc2": [57.83, 43.55, 72.45, 300]}


def test_the_adjusted_bootstrap_pools_and_rates_all_replicates_at_once_with_the_same_figures(monkeypatch):
    # A folder's bootstrap pooled the classes and took the rates one replicate at a time in Python: ~42 ms a
    # folder, 7 minutes for 10k folders in predict and again in merge_predictions. Now once per chunk of
    # replicates, each replicate's share bit for bit what one row alone gives, and the figures as before.
    from utils.detection import quantify
    from utils.detection.quantify import K, WITH_MASK

    rng = np.random.default_rng(5)
    calibration = labelled(simulate(rng, 40))
    targets = {size: Units.from_calibration(labelled(simulate(rng, size))) for size in (3, 12)}
    calls = {"rates_per_face": 0, "masked_or_not": 0}

    def counted(name, function):
        def call(*args):
            calls[name] += 1
            return function(*args)
        return call

    for name in calls:
        monkeypatch.setattr(quantify, name, counted(name, getattr(quantify, name)))
    found = {}
    for size, units in targets.items():
        for method in ("acc", "pacc", "pacc2"):
            result = estimate(units, method, calibration, replicates=300, seed=11)
            found[f"{size}/{method}"] = [result["percent"], result["low"], result["high"], result["replicates_defined"]]
    assert found == ADJUSTED_GOLDEN
    assert calls == {"rates_per_face": 2 * 6, "masked_or_not": 2 * 2}  # the point estimate's and the replicates'

    weights = np.random.default_rng(3).integers(0, 3, (50, len(calibration))).astype(np.float64)
    counts, soft = weights[:, :12] @ targets[12].counts, weights[:, :12] @ targets[12].soft
    stacked = (np.tensordot(weights, calibration.confusion, axes=1), np.tensordot(weights, calibration.soft, axes=1),
               weights @ calibration.truth)
    confusion, soft_rates, truth = stacked
    alone = {"acc": lambda r: (adjusted_counts(counts[r], confusion[r][:, :K], truth[r]), WITH_MASK),
             "pacc": lambda r: (adjusted_counts(soft[r], soft_rates[r], truth[r]), WITH_MASK),
             "pacc2": lambda r: (adjusted_counts(*masked_or_not(soft[r], soft_rates[r], truth[r])), 0)}
    for method, solve in alone.items():  # a replicate's share as the code before solved it, one row alone
        one_by_one = [estimated[with_mask] / estimated.sum() if estimated.sum() > 0 else np.nan
                      for estimated, with_mask in map(solve, range(len(weights)))]
        assert np.array_equal(quantify._replicate_shares(method, counts, soft, calibration, weights), one_by_one,
                              equal_nan=True), method


def test_calibration_images_without_a_face_leave_the_count_interval_plain_and_say_so():
    rng = np.random.default_rng(5)
    units = Units.from_calibration(labelled(simulate(rng, 40)))
    faceless = labelled([{"truth": [0, 0, 0], "confusion": [[0] * 4] * 3 + [[1, 0, 0, 0]],
                          "soft": [[0] * 3] * 3 + [[0.9, 0, 0]]}] * 5)
    plain, given = estimate(units, "cc", replicates=100), estimate(units, "cc", faceless, replicates=100)
    assert (given["low"], given["high"]) == (plain["low"], plain["high"])
    assert given["calibration_images"] is None and "calibration_error_points" not in given
    assert "sampling of images only" in given["not_widened"]
    assert estimate(units, "cc", faceless, replicates=0)["low"] is None  # no replicate, no interval, no crash



def test_an_adjusted_estimate_that_finds_no_face_where_faces_were_found_does_not_say_none_were_found():
    """Validation rates under which every box of the classes detected was a false one (no true face of them in the
    validation images) make acc, pacc and pacc2 estimate no face at all: their note said 'no faces found' beside
    faces_found 5, and the printed line, the plot per folder and the report's estimates table repeated it."""
    conf, soft = np.zeros((4, 4)), np.zeros((4, 3))
    conf[0, 0], conf[3, 2], soft[0, 0], soft[3, 2] = 2, 1, 1.8, 0.9  # with_mask found; a background box as incorrect
    calibration = Calibration(np.array([[2.0, 0, 0]] * 2), np.stack([conf, conf]), np.stack([soft, soft]))
    units = Units.of([[0, 0, 3], [0, 0, 2]], [[0, 0, 2.7], [0, 0, 1.8]])
    for method in ("acc", "pacc", "pacc2"):
        result = estimate(units, method, calibration, replicates=50)
        assert result["percent"] is None and result["faces_found"] == 5
        assert result["note"] != "no faces found" and "false detections" in result["note"], method
    assert estimate(units, "cc", calibration, replicates=50)["percent"] == 0.0

def test_same_seed_same_interval_and_another_seed_another():
    rng = np.random.default_rng(3)
    calibration, units = labelled(simulate(rng, 30)), Units.from_calibration(labelled(simulate(rng, 30)))
    first = estimate(units, "acc", calibration, replicates=200, seed=5)
    assert estimate(units, "acc", calibration, replicates=200, seed=5) == first
    other = estimate(units, "acc", calibration, replicates=200, seed=6)
    assert (other["low"], other["high"]) != (first["low"], first["high"])
    assert other["percent"] == first["percent"]
    assert first["low"] <= first["percent"] <= first["high"]


def test_no_images_no_faces_and_one_image_give_n_a_not_a_crash():
    empty = estimate(Units.of(np.zeros((0, 3)), np.zeros((0, 3))), "pcc")
    assert empty["percent"] is None and empty["low"] is None and empty["note"] == "no images"
    faceless = estimate(Units.of(np.zeros((4, 3)), np.zeros((4, 3))), "cc")
    assert faceless["percent"] is None and faceless["note"] == "no faces found"
    assert "no figure (no faces found" in interval_text(faceless)
    single = estimate(Units.of([[2, 1, 0]]), "cc")
    assert single["percent"] == pytest.approx(66.67) and single["low"] is None
    assert "no interval" in interval_text(single)
    # rates from calibration images without a face of some class: that class is estimated as 0, not a crash
    record = {"truth": [2, 0, 0], "confusion": [[2, 0, 0, 0], [0] * 4, [0] * 4, [0] * 4],
              "soft": [[1.5, 0, 0]] + [[0] * 3] * 3}
    result = estimate(Units.of([[1, 1, 0], [2, 0, 0]], [[1, 1, 0], [2, 0, 0]]), "acc", labelled([record]))
    assert result["percent"] == 100.0


def test_a_missing_calibration_falls_back_and_says_why():
    units = Units.of([[3, 1, 0], [1, 1, 1]])
    report = set_estimates(units, None, calibration_problem(None, 0.5), method="acc", replicates=20)
    assert report["estimate"]["method"] == "cc"
    assert "validation rates" in report["estimate"]["fallback"]
    assert set(report["estimates"]) == {"cc"}
    assert set(report["unavailable"]) == {"pcc", "acc", "pacc", "pacc2"}
    # an adjusted estimator stands in with cc even where pcc could be computed (pcc erred more over the folds)
    with_soft = Units.of([[3, 1, 0], [1, 1, 1]], [[2.5, 1.2, 0.1], [0.9, 1.1, 0.8]])
    report = set_estimates(with_soft, None, calibration_problem(None, 0.5), method="pacc", replicates=20)
    assert report["estimate"]["method"] == "cc" and report["estimate"]["fallback"].startswith("cc instead of pacc")
    assert set(report["estimates"]) == {"cc", "pcc"}
    # rates from too few labelled faces: every estimator is still computed, but cc is the headline
    few, enough = labelled(simulate(np.random.default_rng(2), 8)), labelled(simulate(np.random.default_rng(2), 60))
    assert few.truth.sum() < D.CALIBRATION_MIN_FACES <= enough.truth.sum()
    report = set_estimates(with_soft, few, method="pacc", replicates=20)
    assert report["estimate"]["method"] == "cc" and "labelled faces" in report["estimate"]["fallback"]
    assert set(report["estimates"]) == {"cc", "pcc", "acc", "pacc", "pacc2"} and not report["unavailable"]
    report = set_estimates(with_soft, enough, method="pacc", replicates=20)
    assert report["estimate"]["method"] == "pacc" and "fallback" not in report["estimate"]
    record = {"images": simulate(np.random.default_rng(0), 3), "score_threshold": 0.6,
              "classes": ["with_mask", "without_mask", "mask_weared_incorrect"]}
    assert "measured at score >= 0.6" in calibration_problem(record, 0.5)
    assert "--tta" in calibration_problem(record, 0.6, tta=True)
    assert calibration_problem(record, 0.6) is None
    # rates measured with flip TTA (the model chose it on validation) hold for counts made with it only
    with_tta = {**record, "tta": True}
    assert calibration_problem(with_tta, 0.6, tta=True) is None
    assert "--no-tta" in calibration_problem(with_tta, 0.6)
    # and at the working size they were measured at: a model chosen at 768 px counts differently at 512 px
    at_768 = {**record, "working_size": 768}
    assert calibration_problem(at_768, 0.6, working_size=768) is None
    assert "working size of 768 px, these counts at 512 px" in calibration_problem(at_768, 0.6, working_size=512)
    assert calibration_problem(at_768, 0.6) is None  # a caller that does not know its size is not held to one
    assert calibration_problem(record, 0.6, working_size=512) is None  # nor a record from before the size was kept


def test_video_frames_resample_in_blocks():
    units = Units.of(np.arange(21).reshape(7, 3), np.ones((7, 3)))
    blocks = units.blocks(3)
    assert len(blocks) == 3 and blocks.counts.sum() == units.counts.sum()
    assert blocks.counts[-1].tolist() == [18, 19, 20] and blocks.soft[0].tolist() == [3, 3, 3]


def test_one_figure_per_folder_in_file_order():
    images = [{"file": f"{folder}/{k}.jpg", "folder": folder, "detections": [{"label": label, "score": 0.9}],
               "soft_counts": {"with_mask": 0.9 * (label == "with_mask"), "without_mask": 0.9 * (label != "with_mask"),
                               "mask_weared_incorrect": 0.0}}
              for folder, label in (("site-a", "with_mask"), ("site-b", "without_mask")) for k in range(3)]
    report = prediction_estimates(images, None, 0.5, replicates=50)
    assert set(report["per_folder"]) == {"site-a", "site-b"}
    assert report["per_folder"]["site-a"]["percent"] == 100.0 and report["per_folder"]["site-b"]["percent"] == 0.0
    assert report["per_folder"]["site-a"]["units"] == 3
    assert report["estimate"]["percent"] == 50.0 and report["calibration"]["used"] is False
    # the order images come in does not move the interval: a merge of shards equals one job
    assert prediction_estimates(images[::-1], None, 0.5, replicates=50) == report
    flat = prediction_estimates([{**image, "folder": ""} for image in images], None, 0.5, replicates=50)
    assert "per_folder" not in flat
    assert image_units(images).soft is not None
    assert image_units([{**images[0], "soft_counts": None}]).soft is None


def test_the_figures_per_folder_cost_one_pass_over_the_images_and_one_bootstrap_each(monkeypatch):
    """100k images in folders of ten: each image's folder read once (not once per folder: 10^9 reads), and only
    the headline bootstrapped per folder (its other estimators were computed and thrown away)."""
    import utils.detection.quantify as Q

    class Image(dict):
        folder_reads = 0

        def get(self, key, default=None):
            Image.folder_reads += key == "folder"
            return super().get(key, default)

    calls = []
    real_estimate = Q.estimate
    monkeypatch.setattr(Q, "estimate", lambda *args, **kw: calls.append(args[1]) or real_estimate(*args, **kw))
    record = {"images": simulate(np.random.default_rng(2), 60), "score_threshold": 0.5, "floor": 0.05,
              "classes": ["with_mask", "without_mask", "mask_weared_incorrect"]}
    for count in (100, 400):
        Image.folder_reads, calls[:] = 0, []
        images = [Image({"file": f"f{k // 10}/{k}.jpg", "folder": f"f{k // 10}", "soft_counts": None,
                         "detections": [{"label": ("with_mask", "without_mask")[k % 2], "score": 0.9}]})
                  for k in range(count)]
        report = prediction_estimates(images, record, 0.5, method="acc", replicates=5)
        assert len(report["per_folder"]) == count // 10 and Image.folder_reads <= 2 * count
        assert calls.count("acc") == 1 + count // 10 and len(calls) == 2 + count // 10  # overall: cc and acc
        alone = set_estimates(image_units(images[:10]), Calibration.from_record(record), method="acc",
                              replicates=5)["estimate"]
        assert report["per_folder"]["f0"] == alone  # the headline per folder as when every estimator is run


def test_calibration_image_counts_a_labelled_image():
    target = {"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), "labels": torch.tensor([1, 2])}
    pred = {"boxes": torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]]),
            "labels": torch.tensor([1, 2, 1]), "scores": torch.tensor([0.9, 0.08, 0.7])}
    record = calibration_image(pred, target, score_threshold=0.5)
    assert record["truth"] == [1, 1, 0]
    assert record["confusion"][0][0] == 1 and record["confusion"][1][3] == 1 and record["confusion"][3][0] == 1
    # the low without_mask box on the with_mask face counts in the soft sums only, on that face's row
    assert record["soft"][0] == pytest.approx([0.9, 0.08, 0.0]) and record["soft"][3] == pytest.approx([0.7, 0, 0])


def test_cross_fitted_rates_bench_pools_the_other_folds_rate_images():
    # bench/cross_fitted_rates.py: one detector's folds, each corrected with the others' pooled images
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "cross_fitted_rates", Path(__file__).resolve().parents[1] / "bench" / "cross_fitted_rates.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = np.random.default_rng(5)
    folds = [{"images": simulate(rng, 300)} for _ in range(3)]  # random folds of one pool of images
    for i, fold in enumerate(folds):
        result = bench.against_truth(fold, bench.pooled(folds[:i] + folds[i + 1:]))
        assert result["rate_images"] == 600 and result["images"] == 300
        # the other folds' rates are the same detector's, measured on other images: off by sampling only
        assert abs(result["error_points"]) < 5 and result["truth_inside"]
        assert result["percent"] - result["error_points"] == pytest.approx(result["true_percent"], abs=0.02)
        assert bench.against_truth(fold, fold)["error_points"] == pytest.approx(0.0, abs=0.02)  # own rates: exact
    # fold models that chose different working sizes: applying one's rates to another is the bench's experiment
    sized = [{**fold, "working_size": size} for fold, size in zip(folds, (512, 640, 768))]
    assert len(bench.pooled(sized)["images"]) == 900 and bench.pooled(sized)["working_size"] is None


@pytest.mark.slow  # a bench script in a process of its own: imports torch, runs the model
def test_cross_fitted_rates_bench_runs_fold_models_and_writes_its_inputs(tiny_model_file, sample_dir, tmp_path,
                                                                         monkeypatch, capsys):
    import json
    import runpy
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from helpers import calibrated_model_file

    root = Path(__file__).resolve().parents[1]
    # rates at the model's own threshold (the default 0.5: the file records no operating threshold)
    model = calibrated_model_file(tiny_model_file, tmp_path / "calibrated.pt", score_threshold=0.5)
    held_out = tmp_path / "held_out"  # one flat folder of images and their VOC files, as make_fold writes
    held_out.mkdir()
    for path in [*sorted((sample_dir / "images").iterdir())[:6], *sorted((sample_dir / "annotations").iterdir())[:6]]:
        shutil.copy(path, held_out / path.name)
    out = tmp_path / "cross_fitted.json"
    command = [sys.executable, str(root / "bench" / "cross_fitted_rates.py"), "--fold", str(model), str(held_out),
               "--fold", str(model), str(held_out), "--final", str(model), str(held_out), "--output", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["inputs"]["folds"] == [[str(model), str(held_out)]] * 2
    assert figures["inputs"]["final"] == [str(model), str(held_out)]
    assert len(figures["folds"]) == 2 and figures["final"]["cross_fitted_rates"]["rate_images"] == 12
    # the same model on the same images twice: each fold is corrected with the other's identical record
    assert figures["folds"][0]["cross_fitted_rates"] == figures["folds"][1]["cross_fitted_rates"]
    assert figures["folds"][0]["cross_fitted_rates"]["rate_images"] == 6
    # the refusal in-process (runpy, as `python bench/...` runs it): a process added only the seconds of torch's import
    monkeypatch.setattr(sys, "argv", [command[1], *command[2:3], str(tmp_path / "none.pt"), *command[4:]])
    with pytest.raises(SystemExit) as missing:
        runpy.run_path(command[1], run_name="__main__")
    assert missing.value.code == 2 and "none.pt: model file not found" in capsys.readouterr().err


@pytest.mark.slow  # a bench script in a process of its own: imports torch, runs the model
def test_class_mix_shift_bench_reads_back_the_records_it_wrote(tiny_model_file, sample_dir, tmp_path, monkeypatch):
    # bench/class_mix_shift.py: the figures from the models and from the records they wrote are the same
    import json
    import runpy
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from helpers import calibrated_model_file

    root = Path(__file__).resolve().parents[1]
    model = calibrated_model_file(tiny_model_file, tmp_path / "calibrated.pt", score_threshold=0.5, images=60)
    held_out = tmp_path / "held_out"
    held_out.mkdir()
    for path in [*sorted((sample_dir / "images").iterdir())[:6], *sorted((sample_dir / "annotations").iterdir())[:6]]:
        shutil.copy(path, held_out / path.name)
    bench = [sys.executable, str(root / "bench" / "class_mix_shift.py")]
    records, first, second = tmp_path / "records.json", tmp_path / "first.json", tmp_path / "second.json"
    done = subprocess.run([*bench, "--fold", str(model), str(held_out), "--fold", str(model), str(held_out),
                           "--final", str(model), str(held_out), "--records", str(records), "--output", str(first)],
                          capture_output=True, text=True, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # the rerun from the records in-process (runpy, as `python bench/...` runs it): no torch start-up again
    monkeypatch.syspath_prepend(str(root / "bench"))  # as python puts the script's folder first
    monkeypatch.setattr(sys, "argv", [bench[1], "--from-records", str(records), "--output", str(second)])
    with pytest.raises(SystemExit) as again:
        runpy.run_path(bench[1], run_name="__main__")
    assert again.value.code == 0
    from_models, from_records = json.loads(first.read_text()), json.loads(second.read_text())
    assert from_models["folds"] == from_records["folds"] and from_models["final"] == from_records["final"]
    fold = from_models["folds"][0]["parts"]
    truth = [image["truth"] for image in json.loads(records.read_text())["folds"][0]["held_out"]["images"]]
    assert fold["all"]["images"] == len(truth) == 6
    assert fold["incorrect"] is None or fold["incorrect"]["images"] == sum(t[2] > 0 for t in truth)
    assert fold["with only"] is None or fold["with only"]["true_percent"] == 100.0
    assert set(fold["all"]["estimates"]) == {"cc", "pcc", "acc", "pacc", "pacc2"}
    assert from_models["folds_summary"]["all"]["sets"] == 2
    bad = subprocess.run([*bench, "--from-records", str(records), "--fold", str(model), str(held_out)],
                         capture_output=True, text=True, cwd=root, timeout=300)
    assert bad.returncode == 2 and "either --fold" in bad.stderr


def test_evaluate_sums_an_images_scores_as_predict_does_so_pcc_reads_the_same():
    from utils.detection.evaluation import evaluation_estimates

    # A column of the soft matrix spreads over its rows (the face each detection overlaps, or none); rounding each
    # cell to 4 decimals and then summing gave 0.2000 where predict rounds the image's sum 0.20008 to 0.2001.
    faces = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    pred = {"boxes": torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]]),
            "labels": torch.tensor([1, 1, 2]), "scores": torch.tensor([0.10004, 0.10004, 0.3])}
    target = {"boxes": faces, "labels": torch.tensor([1, 2])}
    preds, targets = [pred] * 4, [target] * 4
    soft = soft_counts(pred["labels"].tolist(), pred["scores"].tolist())
    records = [{"file": f"{i}.jpg", "soft_counts": soft,
                "detections": [{"label": "with_mask"}, {"label": "with_mask"}, {"label": "without_mask"}]}
               for i in range(4)]
    evaluated = evaluation_estimates(preds, targets, 0.05, None, replicates=50)["estimates"]["pcc"]
    predicted = prediction_estimates(records, None, 0.05, replicates=50)["estimates"]["pcc"]
    assert image_units(records).soft[0].tolist() == [0.2001, 0.3, 0.0]
    assert (evaluated["percent"], evaluated["faces_estimated"]) == (predicted["percent"], predicted["faces_estimated"])
