"""aggregate_folds: the cross-validation summary of the fold models' evaluations (mean and sample std per metric
and class, the estimators ranked by their error), its plot, and the fold files it refuses in one line."""

from __future__ import annotations

import json
import math

import pytest

from helpers import run_script
from utils.classes import CLASSES, RARE_CLASS
from utils.detection.cross_validation import format_summary, mean_std, summarise_folds


def fake_evaluation(value: float, rare_ap=None) -> dict:
    per_class = {name: {"ap": value, "ap_50": value + 0.1, "ap_75": value, "recall": value} for name in CLASSES}
    per_class[RARE_CLASS] = {"ap": rare_ap, "ap_50": rare_ap, "ap_75": rare_ap, "recall": rare_ap}
    return {"map": value, "map_50": value + 0.1, "map_75": value, "mar_100": value, "test_loss": 1.0 + value,
            "compliance": {"error_points": -value * 10, "per_image_mae_points": value * 20},
            "confusion_matrix": {"score_threshold": 0.5}, "per_class": per_class, "num_images": 5, "num_faces": 9}


def test_mean_and_sample_std_per_metric_and_class():
    summary = summarise_folds([fake_evaluation(0.2, 0.4), fake_evaluation(0.4, None), fake_evaluation(0.6, 0.6)],
                              ["evaluation_fold0.json", "evaluation_fold1.json", "evaluation_fold2.json"])
    assert summary["metrics"]["map"]["mean"] == pytest.approx(0.4)
    assert summary["metrics"]["map"]["std"] == pytest.approx(0.2)  # sample std of 0.2, 0.4, 0.6
    assert summary["metrics"]["compliance_abs_error_points"]["mean"] == pytest.approx(4.0)
    rare = summary["per_class"][RARE_CLASS]["ap_50"]
    assert rare["n"] == 2 and rare["mean"] == pytest.approx(0.5) and rare["values"] == [0.4, None, 0.6]
    assert summary["per_class"]["with_mask"]["ap_50"]["mean"] == pytest.approx(0.5)
    assert mean_std([0.3])["std"] is None and mean_std([None, None])["mean"] is None
    assert mean_std(abs(v) for v in (-1.0, 3.0))["values"] == [1.0, 3.0]  # an iterator keeps its values
    assert math.isclose(mean_std([1.0, 3.0])["std"], math.sqrt(2))


def test_an_undefined_metric_is_null_in_the_summary_not_nan(tmp_path):
    """A fold's metric may be NaN (a diverged fold model's held-out loss): it was left out of the mean but kept in
    the per-fold values as NaN, which json writes as a bare NaN token that strict readers (jq, JSON.parse) refuse."""
    from utils.detection.cross_validation import write_summary

    inputs = []
    for fold, loss in enumerate((1.2, float("nan"), 1.4)):
        inputs.append(tmp_path / f"evaluation_fold{fold}.json")
        inputs[-1].write_text(json.dumps({**fake_evaluation(0.2 + fold / 10, 0.3), "test_loss": loss}))
    write_summary(inputs, tmp_path / "out", plot=None)
    text = (tmp_path / "out" / "kfold_summary.json").read_text()
    summary = json.loads(text, parse_constant=lambda token: pytest.fail(f"{token} in kfold_summary.json"))
    loss = summary["metrics"]["held_out_loss"]
    assert loss["values"] == [1.2, None, 1.4] and loss["n"] == 2 and loss["mean"] == pytest.approx(1.3)


def test_the_summary_says_how_each_fold_model_ran():
    folds = [{**fake_evaluation(0.3), "working_size": 768, "tta": True, "box_voting": True},
             {**fake_evaluation(0.4), "working_size": 640, "tta": False, "box_voting": False}, fake_evaluation(0.5)]
    summary = summarise_folds(folds, ["a", "b", "c"])
    assert summary["inference_per_fold"] == [{"working_size": 768, "tta": True, "box_voting": True},
                                             {"working_size": 640, "tta": False, "box_voting": False},
                                             {"working_size": None, "tta": None, "box_voting": None}]
    assert ("ran at (its own choice on its validation images): 768 px + flip TTA + box voting, 640 px, n/a"
            in format_summary(summary))


def with_estimators(evaluation: dict, errors: dict, inside: dict) -> dict:
    """*evaluation* with a quantification block: each estimator's error and whether the truth was inside."""
    estimates = {method: {"error_points": error, "truth_inside": inside[method]} for method, error in errors.items()}
    return {**evaluation, "quantification": {"estimates": estimates}}


def test_the_compliance_estimators_are_ranked_by_their_error_across_folds():
    folds = [with_estimators(fake_evaluation(0.3, 0.3), {"cc": 8.0, "pcc": -3.0, "acc": 1.0},
                             {"cc": False, "pcc": True, "acc": True}),
             with_estimators(fake_evaluation(0.5, 0.5), {"cc": 6.0, "pcc": 2.0, "acc": None},
                             {"cc": False, "pcc": True, "acc": None})]
    summary = summarise_folds(folds, ["evaluation_fold0.json", "evaluation_fold1.json"])
    estimators = summary["compliance_estimators"]
    assert estimators["estimators"]["cc"]["abs_error_points"]["mean"] == pytest.approx(7.0)
    assert estimators["estimators"]["pcc"]["error_points"]["mean"] == pytest.approx(-0.5)
    covered = {name: entry["folds_covered"] for name, entry in estimators["estimators"].items()}
    assert covered["pcc"] == 2 and covered["cc"] == 0
    # acc is undefined on one fold: it cannot win on one fold's error
    assert estimators["smallest_mean_abs_error"] == "pcc"
    text = format_summary(summary)
    assert "smallest mean |error| over every fold: pcc" in text and "2 of 2 folds (yes, yes)" in text
    # each fold said, not only how many (it read '0 of 2 folds', '1 of 1 folds': which one?)
    assert "0 of 2 folds (no, no)" in text and "1 of 1 folds (yes, n/a)" in text
    assert summarise_folds([fake_evaluation(0.3, 0.3)] * 2, ["a", "b"])["compliance_estimators"] is None  # older files


def test_aggregate_job_writes_the_summary_and_names_a_bad_file(tmp_path, root, capsys):
    inputs = []
    for fold, value in enumerate((0.3, 0.5)):
        inputs.append(tmp_path / f"evaluation_fold{fold}.json")
        inputs[-1].write_text(json.dumps(fake_evaluation(value, value)))
    assert run_script(root, "aggregate_folds", ["--inputs", *inputs, "--output-dir", tmp_path / "out"]) == 0
    summary = json.loads((tmp_path / "out" / "kfold_summary.json").read_text())
    assert summary["folds"] == 2 and summary["metrics"]["map_50"]["mean"] == pytest.approx(0.5)
    text = (tmp_path / "out" / "kfold_summary.txt").read_text()
    assert "mAP@0.5" in text and "0.5000 ± 0.1414" in text and "held-out fold" in text
    assert (tmp_path / "out" / "kfold_folds.png").stat().st_size > 0
    broken = tmp_path / "evaluation_fold9.json"
    broken.write_text(json.dumps({"map": 0.1}))
    capsys.readouterr()
    assert run_script(root, "aggregate_folds", ["--inputs", inputs[0], broken, "--output-dir", tmp_path / "o2"]) == 2
    error = capsys.readouterr().err.strip()
    assert str(broken) in error and "\n" not in error


def test_a_summary_whose_plot_cannot_be_written_leaves_the_last_runs_files_as_one_set(tmp_path, monkeypatch):
    """The summary, its text and its plot were written one after the other: a plot that failed (a full disk) left
    the new folds' summary beside the last run's plot of other folds."""
    import errno

    import matplotlib.figure

    from utils.detection.cross_validation import write_summary

    inputs = []
    for fold, value in enumerate((0.3, 0.5)):
        inputs.append(tmp_path / f"evaluation_fold{fold}.json")
        inputs[-1].write_text(json.dumps(fake_evaluation(value, value)))
    out = tmp_path / "out"
    write_summary(inputs, out)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    inputs[1].write_text(json.dumps(fake_evaluation(0.7, 0.7)))

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    with pytest.raises(OSError, match="kfold_folds.png"):
        write_summary(inputs, out)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before  # no temporary file left either


def test_aggregate_refuses_a_missing_or_repeated_fold_and_non_numeric_metrics(tmp_path, root, capsys):
    for fold in range(3):
        (tmp_path / f"evaluation_fold{fold}.json").write_text(json.dumps(fake_evaluation(0.1 * (fold + 1))))
    fold = [tmp_path / f"evaluation_fold{i}.json" for i in range(3)]
    cases = [([fold[0], fold[2]], "the folds given are [0, 2], not 0 to 1 (missing [1])"),
             ([fold[0], fold[0], fold[1]], "given twice")]
    copied = tmp_path / "copy" / "evaluation_fold1.json"  # fold 0's file under fold 1's name: one fold, not two
    copied.parent.mkdir()
    copied.write_bytes(fold[0].read_bytes())
    cases.append(([fold[0], copied], f"{copied}: the same evaluation as {fold[0]} (a fold's file copied"))
    odd = tmp_path / "evaluation_fold1b.json"
    odd.write_text(json.dumps({**fake_evaluation(0.2), "map": "abc"}))
    cases.append(([fold[0], odd], "a metric holds 'abc', not a number"))
    for inputs, words in cases:
        capsys.readouterr()
        assert run_script(root, "aggregate_folds", ["--inputs", *inputs, "--output-dir", tmp_path / "out"]) == 2
        error = capsys.readouterr().err.strip()
        assert words in error and "\n" not in error, error


@pytest.mark.parametrize("estimates, said", [
    (["cc"], "quantification.estimates is not a mapping"),
    ({"cc": "7.5"}, "quantification.estimates.cc is not a mapping"),
    ({"pacc2": {"error_points": "7", "truth_inside": True}}, "quantification.estimates.pacc2.error_points holds '7'"),
    ({"cc": {"error_points": 1.0, "truth_inside": "yes"}}, "quantification.estimates.cc.truth_inside holds 'yes'"),
])
def test_aggregate_job_names_a_fold_whose_estimators_are_malformed(tmp_path, root, capsys, estimates, said):
    good = tmp_path / "evaluation_fold0.json"
    good.write_text(json.dumps(with_estimators(fake_evaluation(0.3, 0.3), {"cc": 1.0}, {"cc": True})))
    bad = tmp_path / "evaluation_fold1.json"
    bad.write_text(json.dumps({**fake_evaluation(0.5, 0.5), "quantification": {"estimates": estimates}}))
    capsys.readouterr()
    assert run_script(root, "aggregate_folds", ["--inputs", good, bad, "--output-dir", tmp_path / "out"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"aggregate_folds: error: {bad}: ") and said in error and "Traceback" not in error
    assert not (tmp_path / "out" / "kfold_summary.json").exists()


def test_the_fold_plot_of_folds_without_labelled_faces_says_so_without_a_matplotlib_warning(tmp_path):
    import warnings

    from utils.detection.cross_validation import plot_folds

    empty = fake_evaluation(0.0, None)
    for key in ("map", "map_50", "map_75", "mar_100"):
        empty[key] = None
    empty["per_class"] = {name: dict.fromkeys(("ap", "ap_50", "ap_75", "recall")) for name in CLASSES}
    partial = {**fake_evaluation(0.4, 0.4), "map": None}  # fold 0's mAP undefined: the legend came from it
    for folds in ([empty, empty], [partial, fake_evaluation(0.5, 0.5)]):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # it printed "No artists with labels found to put in legend"
            plot_folds(summarise_folds(folds, ["a", "b"]), tmp_path / "folds.png")
        assert (tmp_path / "folds.png").stat().st_size > 0
