"""k-fold cross-validation: the mean and spread of every evaluation metric over the fold models.

Each fold model is evaluated (bin/evaluate.py) on its held-out fold; this module reads those
evaluation_fold<i>.json files and writes kfold_summary.json, kfold_summary.txt and a plot of
the per-fold values. The spread is the sample standard deviation over the folds (ddof=1);
a metric a fold cannot define (a class absent from its held-out images: AP None) is left
out of that metric's mean, and ``n`` says over how many folds it was taken.

A fold model never trains or validates on its held-out fold: bin/make_fold.py gives it the
train-split images of the other folds to train on and their val-split images to validate on
(where train chooses the score threshold and measures the rates the adjusted compliance
estimators correct with), as the final model has train and val. So the compliance estimators'
errors and interval coverage are not measured on the images their rates came from. One thing
is shared: every fold model trains with the HPO job's best parameters, chosen on the whole val
split, about 1/K of which lies in each held-out fold.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from ..atomic import atomic_files, dump_json
from ..classes import CLASSES
from ..errors import InputError
from ..naming import output_names
from .quantify import METHODS

# (key in kfold_summary.json, how to read it from an evaluation.json, label in the text and plot)
OVERALL_METRICS = (
    ("map", lambda e: e["map"], "mAP@[0.5:0.95]"),
    ("map_50", lambda e: e["map_50"], "mAP@0.5"),
    ("map_75", lambda e: e["map_75"], "mAP@0.75"),
    ("mar_100", lambda e: e["mar_100"], "mAR@100"),
    ("held_out_loss", lambda e: e["test_loss"], "held-out loss"),
    ("compliance_error_points", lambda e: e["compliance"]["error_points"], "compliance error (points)"),
    ("compliance_abs_error_points", lambda e: _abs(e["compliance"]["error_points"]), "|compliance error| (points)"),
    ("per_image_mae_points", lambda e: e["compliance"]["per_image_mae_points"], "per-image MAE (points)"),
    ("score_threshold", lambda e: e["confusion_matrix"]["score_threshold"], "score threshold"),
)
PER_CLASS_METRICS = ("ap", "ap_50", "ap_75", "recall")
THRESHOLD_NOTE = ("Each fold model was trained on the train-split images of the other folds and validated on "
                  "their val-split images (its score threshold and the adjusted estimators' rates come from "
                  "there), never on its held-out fold, where every figure here is measured; the HPO parameters "
                  "all fold models share were chosen on the whole val split.")
ESTIMATOR_NOTE = ("Compliance estimators: the error is the estimate minus the true percent on the held-out fold; "
                  "acc, pacc and pacc2 correct with rates measured on the fold model's validation images, which are "
                  "not in that fold; the default estimator (utils/defaults.py COMPLIANCE_ESTIMATOR) should be "
                  "the one with the smallest mean |error| over the folds.")


class FoldSummaryError(InputError):
    """An evaluation file of a fold cannot be used; str() names it."""


def _abs(value):
    return None if value is None else abs(value)


def mean_std(values) -> dict:
    """{mean, std, n, values}: over the defined values (None and NaN left out, None in "values": a NaN there made
    kfold_summary.json JSON that strict readers refuse); std is the sample std (ddof=1), None below two values."""
    values = [None if v is None or not math.isfinite(float(v)) else float(v) for v in values]
    defined = [v for v in values if v is not None]
    n = len(defined)
    mean = statistics.fmean(defined) if n else None
    std = statistics.stdev(defined) if n > 1 else None
    return {"mean": mean, "std": std, "n": n, "values": values}


def _metric(value) -> bool:
    """A metric as evaluation.json holds one: a number (NaN allowed: undefined), or None."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _check_estimates(quantification) -> None:
    """TypeError saying what is wrong when evaluation.json's quantification is not of the shape estimator_errors
    reads (an estimator's entry not a mapping, its error not a number, truth_inside not true, false or null)."""
    if quantification is None:
        return
    if not isinstance(quantification, dict):
        raise TypeError("quantification is not a mapping")
    estimates = quantification.get("estimates") or {}
    if not isinstance(estimates, dict):
        raise TypeError("quantification.estimates is not a mapping")
    for method in METHODS:
        result = estimates.get(method) or {}
        if not isinstance(result, dict):
            raise TypeError(f"quantification.estimates.{method} is not a mapping")
        if not _metric(result.get("error_points")):
            raise TypeError(f"quantification.estimates.{method}.error_points holds {result['error_points']!r}, "
                            "not a number")
        if result.get("truth_inside") not in (True, False, None):
            raise TypeError(f"quantification.estimates.{method}.truth_inside holds {result['truth_inside']!r}, "
                            "not true, false or null")


def read_evaluations(paths) -> list[dict]:
    """The evaluation.json of every fold, in the order given; FoldSummaryError naming a bad file, a file given
    twice or copied (the same content), or a fold missing or repeated among files named evaluation_fold<i>.json
    (as the workflow names them: K files must be folds 0 to K-1, or the summary would call K-1 folds and a copy
    a K-fold run)."""
    import re

    evaluations, seen = [], {}
    for path in map(Path, paths):
        key = path.resolve()
        if key in seen:
            raise FoldSummaryError(f"{path}: given twice (also as {seen[key]})")
        seen[key] = path
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            values = [read(data) for _, read, _ in OVERALL_METRICS]
            values += [data["per_class"][name][key] for name in CLASSES for key in PER_CLASS_METRICS]
            bad = next((value for value in values if not _metric(value)), "ok")
            if bad != "ok":
                raise TypeError(f"a metric holds {bad!r}, not a number")
            _check_estimates(data.get("quantification"))
        except FileNotFoundError:
            raise FoldSummaryError(f"{path}: evaluation file not found") from None
        except (ValueError, KeyError, TypeError, RecursionError) as error:  # RecursionError: nested too deep
            raise FoldSummaryError(f"{path}: not an evaluation.json of bin/evaluate.py ({error!r} missing or "
                                   "unreadable)") from None
        copied_from = next((paths[i] for i, earlier in enumerate(evaluations) if earlier == data), None)
        if copied_from is not None:  # two folds' evaluations never agree in every figure: a file copied
            raise FoldSummaryError(f"{path}: the same evaluation as {copied_from} (a fold's file copied: "
                                   "K folds need K different evaluations)")
        evaluations.append(data)
    folds = [re.fullmatch(r"evaluation_fold(\d+)\.json", Path(path).name) for path in paths]
    if all(folds):
        numbers = sorted(int(match.group(1)) for match in folds)
        if numbers != list(range(len(numbers))):
            missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
            repeated = sorted({n for n in numbers if numbers.count(n) > 1})
            raise FoldSummaryError(f"{paths[0]}: the folds given are {numbers}, not 0 to {len(numbers) - 1}"
                                   + (f" (missing {missing})" if missing else "")
                                   + (f" (repeated {repeated})" if repeated else ""))
    return evaluations


def estimator_errors(evaluations: list[dict]) -> dict | None:
    """Per compliance estimator (evaluation.json's quantification) over the folds: the error on each
    fold (mean ± std), the mean absolute error, whether the truth lay inside each fold's 95 % interval,
    and the estimator with the smallest mean |error| among those defined on every fold. None when no
    fold was evaluated with the estimators (evaluation files written before them)."""
    if not any(e.get("quantification") for e in evaluations):
        return None
    per_method = {}
    for method in METHODS:
        results = [((e.get("quantification") or {}).get("estimates") or {}).get(method) or {} for e in evaluations]
        errors = [result.get("error_points") for result in results]
        inside = [result.get("truth_inside") for result in results]
        per_method[method] = {"error_points": mean_std(errors), "abs_error_points": mean_std(map(_abs, errors)),
                              "truth_inside": inside, "folds_covered": sum(value is True for value in inside),
                              "folds_judged": sum(value is not None for value in inside)}
    complete = {m: entry for m, entry in per_method.items() if entry["abs_error_points"]["n"] == len(evaluations)}
    best = (min(complete, key=lambda m: (complete[m]["abs_error_points"]["mean"], METHODS.index(m)))
            if complete else None)
    return {"estimators": per_method, "smallest_mean_abs_error": best, "note": ESTIMATOR_NOTE}


def summarise_folds(evaluations: list[dict], names: list[str]) -> dict:
    """kfold_summary.json: mean and std of every metric over the folds, overall and per class."""
    if len(evaluations) < 2:
        raise FoldSummaryError(f"{len(evaluations)} evaluation file(s): a cross-validation summary needs 2 or more")
    return {
        "folds": len(evaluations),
        "evaluations": names,
        "images_per_fold": [e.get("num_images") for e in evaluations],
        "faces_per_fold": [e.get("num_faces") for e in evaluations],
        # how each fold model ran, as it chose on its own validation images (None: an older evaluation file)
        "inference_per_fold": [{key: e.get(key) for key in ("working_size", "tta", "box_voting")} for e in evaluations],
        "spread": "sample standard deviation over the folds (ddof=1); n = folds where the metric is defined",
        "metrics": {key: mean_std([read(e) for e in evaluations]) for key, read, _ in OVERALL_METRICS},
        "per_class": {name: {key: mean_std([e["per_class"][name][key] for e in evaluations])
                             for key in PER_CLASS_METRICS} for name in CLASSES},
        "compliance_estimators": estimator_errors(evaluations),
        "note": THRESHOLD_NOTE,
    }


def _pm(stats: dict, digits: int = 4) -> str:
    if stats["mean"] is None:
        return "n/a"
    spread = "n/a" if stats["std"] is None else f"{stats['std']:.{digits}f}"
    missing = f" (n={stats['n']})" if stats["n"] < len(stats["values"]) else ""
    return f"{stats['mean']:.{digits}f} ± {spread}{missing}"


def _inference_label(entry: dict) -> str:
    """'768 px + flip TTA + box voting', '512 px' or 'n/a' (an evaluation file that does not say)."""
    if entry.get("working_size") is None:
        return "n/a"
    return (f"{entry['working_size']} px" + (" + flip TTA" if entry.get("tta") else "")
            + (" + box voting" if entry.get("box_voting") else ""))


def format_summary(summary: dict) -> str:
    """kfold_summary.txt: mean ± std per metric and class."""
    lines = [f"{summary['folds']}-fold cross-validation on the train+val pool "
             f"(held-out images per fold: {', '.join(str(n) for n in summary['images_per_fold'])})",
             "mean ± sample std over the folds"]
    runs = [_inference_label(entry) for entry in summary.get("inference_per_fold") or []]
    if runs:
        lines.append(f"each fold model ran at (its own choice on its validation images): {', '.join(runs)}")
    lines.append("")
    for key, _, label in OVERALL_METRICS:
        digits = 2 if "points" in key else 4
        lines.append(f"{label:<30}{_pm(summary['metrics'][key], digits)}")
    lines += ["", f"{'class':<24}" + "".join(f"{key:>26}" for key in PER_CLASS_METRICS)]
    for name in CLASSES:
        lines.append(f"{name:<24}" + "".join(f"{_pm(summary['per_class'][name][key]):>26}"
                                             for key in PER_CLASS_METRICS))
    estimators = summary.get("compliance_estimators")
    if estimators:
        lines += ["", "Percent properly masked, per estimator (error = estimate - truth on each held-out fold):",
                  f"{'estimator':<10}{'error (points)':>22}{'mean |error|':>15}  truth inside 95% interval (each fold)"]
        for method, entry in estimators["estimators"].items():
            # which folds, not only how many: a fold whose interval missed the truth is the one to look at
            each = ", ".join({True: "yes", False: "no"}.get(value, "n/a") for value in entry["truth_inside"])
            judged = entry["folds_judged"]
            inside = f"{entry['folds_covered']} of {judged} folds ({each})" if judged else "n/a"
            mae = entry["abs_error_points"]
            lines.append(f"{method:<10}{_pm(entry['error_points'], 2):>22}"
                         f"{'n/a' if mae['mean'] is None else format(mae['mean'], '.2f'):>15}  {inside}")
        lines.append(f"smallest mean |error| over every fold: {estimators['smallest_mean_abs_error'] or 'n/a'}")
        lines.append(estimators["note"])
    lines += ["", summary["note"]]
    return "\n".join(lines) + "\n"


def plot_folds(summary: dict, path) -> None:
    """Per-fold values (dots) with mean ± std (bar and whisker) of mAP, mAP@0.5 and each class's AP@0.5, written
    at *path* as it is (write_summary's temporary path of it)."""
    from .plots import _write_figure, plt

    series = [("mAP", summary["metrics"]["map"]), ("mAP@0.5", summary["metrics"]["map_50"])]
    series += [(f"AP50\n{name}", summary["per_class"][name]["ap_50"]) for name in CLASSES]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    labelled = False  # the first dot drawn carries the legend's label (fold 0's mAP may be undefined)
    for x, (_label, stats) in enumerate(series):
        if stats["mean"] is not None:
            ax.bar(x, stats["mean"], color="#9ecae1", width=0.6,
                   yerr=stats["std"] or 0.0, capsize=6, ecolor="#08519c")
        for fold, value in enumerate(stats["values"]):
            if value is not None and math.isfinite(value):
                ax.plot(x + (fold - (len(stats["values"]) - 1) / 2) * 0.08, value, "o", color="#e6550d",
                        markersize=4, label=None if labelled else "one fold")
                labelled = True
    ax.set_xticks(range(len(series)), [label for label, _ in series], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out value")
    ax.set_title(f"{summary['folds']}-fold cross-validation: mean ± std (bars) and each fold (dots)")
    if labelled:  # else matplotlib warns on stderr that there is nothing to put in a legend
        ax.legend(loc="upper right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no fold defines these metrics (no labelled faces)", ha="center", va="center",
                transform=ax.transAxes)
    _write_figure(fig, path)


def write_summary(evaluation_paths, output_dir, plot: str | None = output_names("aggregate_folds")["plot"]) -> dict:
    """Read the folds' evaluation files, write kfold_summary.json/.txt (and the plot); returns the summary."""
    output_dir = Path(output_dir)
    paths = [Path(p) for p in evaluation_paths]
    summary = summarise_folds(read_evaluations(paths), [p.name for p in paths])
    names = output_names("aggregate_folds")
    # one set: a plot that fails (a full disk) left the new summary beside the last run's plot of other folds
    with atomic_files() as files:
        with files.writing(output_dir / names["summary"]) as tmp:
            dump_json(summary, tmp)
        with files.writing(output_dir / names["summary_txt"]) as tmp:
            tmp.write_text(format_summary(summary), encoding="utf-8")
        if plot:
            with files.writing(output_dir / plot) as tmp:
                plot_folds(summary, tmp)
    return summary
