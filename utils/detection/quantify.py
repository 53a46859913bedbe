"""The compliance figure as an estimate of a proportion, with a 95 % interval.

p, the share of the true faces in a set of photos that are properly masked (with_mask), is a
prevalence to estimate. Counting the faces a detector keeps at its threshold is one estimator
of it, biased whenever recall or confusion differ by class (on the real test split with_mask
faces are found more often than the others, so the count over-states compliance). The
estimators (the quantification literature's classify-and-count family):

  cc    classify and count: the faces kept at the operating threshold, per class.
  pcc   probabilistic count: per class, the sum of the scores of every detection at or above the
        detection floor. torchvision emits, per proposal, one box per class whose softmax score
        passes its floor, so the sums estimate how many faces of each class were found.
  acc   adjusted count: the kept counts corrected with the detector's rates on the validation
        images at the same threshold. M[i][j] = P(a true face of class i is kept, labelled j) (a
        missed face leaves its row short of 1), b[j] = share of kept class-j boxes on no face;
        C_j (1 - b_j) = sum_i T_i M[i][j] is solved for T >= 0 (non-negative least squares).
  pacc  the same correction of the score sums, with the validation images' score-sum rates.
  pacc2 pacc for two classes, properly masked or not: the two other classes' faces, rates and sums
        pooled. The quantity is binary, and the rates of a class seen a few times (13 mask_weared_incorrect
        faces on a split's validation images) barely differ from with_mask's, which lets the three-class
        solve trade one for the other; pooled, the system stays well conditioned. The price: the pooled
        row assumes the validation images' mix of without_mask and mask_weared_incorrect.

Every estimate has a seeded percentile bootstrap interval: each replicate resamples the target
images (a video: blocks of consecutive frames) and, given the calibration images, those too, so
the interval covers both the sampling of images and the estimator's own error:

  acc, pacc, pacc2  their rates are re-estimated from each replicate's calibration images;
  cc, pcc    they have no rates, but their error on the calibration images (estimate minus the true
             share there) is their own bias as far as labelled images can say: each replicate also
             gives the estimate less that error, and the interval spans the percentiles of both the
             estimate and the corrected estimate. The point estimate stays the plain count; the
             interval stretches towards where the validation images say the truth lies.

Without calibration images (a model file from before they were recorded, a threshold other than
the one they were measured at) cc and pcc intervals cover image sampling only, and say so.

Everything works from plain numbers that JSON and torch.load(weights_only=True) can hold:
  a target image: counts[3] (kept at the threshold) and soft[3] (score sums above the floor);
  a calibration image: truth[3], confusion[4][4] (metrics.detection_confusion_matrix: rows true
  class + background, columns predicted + background) and soft[4][3] (metrics.soft_confusion).
Classes are in utils.classes.CLASSES order.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls

from .. import defaults as D
from ..classes import CLASSES, NAME_OF
from ..figures import one_decimal

METHODS = ("cc", "pcc", "acc", "pacc", "pacc2")
METHOD_NAMES = {"cc": "classify and count", "pcc": "probabilistic count (score sums)",
                "acc": "adjusted count (validation rates)", "pacc": "adjusted probabilistic count",
                "pacc2": "adjusted probabilistic count, masked or not"}
CALIBRATED = ("acc", "pacc", "pacc2")  # the estimators that need the model's calibration (validation) images
BOOTSTRAP_CHUNK_DRAWS = 1_000_000  # draw counts per matrix of replicates (8 MB): memory stays flat in n
UNADJUSTED = ("cc", "pcc")   # the estimators whose interval the calibration images widen by their error there
SCORE_SUMS = ("pcc", "pacc", "pacc2")  # the estimators that read the score sums, not the kept counts
# what stands in when an estimator cannot be computed: cc for both adjusted ones, because over the folds of
# the real data (bench/RESULTS.md) pcc erred twice as much as cc (its score sums lean away from with_mask)
FALLBACK = {"acc": "cc", "pacc": "cc", "pacc2": "cc", "pcc": "cc"}
CONFIDENCE = D.INTERVAL_CONFIDENCE
CALIBRATION_IOU = D.MATCH_IOU  # the confusion matrix's own matching
WITH_MASK = CLASSES.index("with_mask")
K = len(CLASSES)


# ----------------------------------------------------------------------------- per-image records

def class_sums(labels, scores=None, floor: float = 0.0) -> list[float]:
    """Per class (CLASSES order): how many *labels* (ints 1..3 or names), or the sum of their *scores*
    at or above *floor*."""
    sums = [0.0] * K
    for k, label in enumerate(labels):
        name = label if isinstance(label, str) else NAME_OF[int(label)]
        if scores is None:
            sums[CLASSES.index(name)] += 1
        elif scores[k] >= floor:
            sums[CLASSES.index(name)] += float(scores[k])
    return sums


def soft_counts(labels, scores, floor: float = D.DETECTION_FLOOR) -> dict:
    """{class: sum of the scores of its detections at or above *floor*}: one image's probabilistic count."""
    return {name: round(value, 4) for name, value in zip(CLASSES, class_sums(labels, list(scores), floor))}


def calibration_image(pred: dict, target: dict, score_threshold: float, floor: float = D.DETECTION_FLOOR) -> dict:
    """One labelled image's record: its true faces per class, its confusion matrix at *score_threshold*
    and its score sums by true and predicted class (detections at or above *floor*)."""
    from .metrics import detection_confusion_matrix, soft_confusion

    matrix, _ = detection_confusion_matrix([pred], [target], iou_threshold=CALIBRATION_IOU,
                                           score_threshold=score_threshold)
    truth = [int(faces) for faces in class_sums(target["labels"].tolist())]
    soft = soft_confusion(pred, target, iou_threshold=CALIBRATION_IOU, floor=floor)
    return {"truth": truth, "confusion": matrix, "soft": [[round(v, 4) for v in row] for row in soft]}


def calibration_record(preds, targets, score_threshold: float, chosen_on: str = "validation",
                       floor: float = D.DETECTION_FLOOR, tta: bool = False, working_size: int | None = None) -> dict:
    """What the adjusted estimators need from the labelled images a model's threshold was chosen on, per image,
    so that a bootstrap can resample them (stored in the model file's meta as "quantification"). *tta* and
    *working_size* say how the predictions were made (flip TTA or not, the longer side in px): a detector's
    rates change with both, so they hold only for counts made the same way."""
    return {"chosen_on": chosen_on, "score_threshold": score_threshold, "floor": floor, "tta": bool(tta),
            "working_size": None if working_size is None else int(working_size),
            "iou_threshold": CALIBRATION_IOU, "classes": list(CLASSES),
            "images": [calibration_image(p, t, score_threshold, floor) for p, t in zip(preds, targets, strict=True)]}


def calibration_problem(calibration: dict | None, score_threshold: float, tta: bool = False,
                        working_size: int | None = None) -> str | None:
    """Why the model's calibration record cannot correct counts made at *score_threshold*, with flip TTA or
    not as *tta* says, at *working_size* px (None: it can). A record or a caller that does not know its
    working size is not held to one (evaluation.load_trained_model fills it in for model files from before
    2026-12-05, which do not record it)."""
    if not calibration:
        return ("the model file holds no validation rates (trained before they were stored, or without "
                "validation images; an ensemble has none of its own)")
    if not calibration.get("images"):
        return "the model's validation rates rest on no image"
    if list(calibration.get("classes", [])) != list(CLASSES):
        return f"the model's validation rates are for classes {calibration.get('classes')}"
    if not math.isclose(float(calibration["score_threshold"]), float(score_threshold)):
        return (f"the validation rates were measured at score >= {calibration['score_threshold']:g}, "
                f"the counts are made at {score_threshold:g}")
    measured = bool(calibration.get("tta", False))  # records from before 2026-12-05 hold no key: without TTA
    if bool(tta) != measured:
        return ("the validation rates were measured with flip TTA, these counts without it (--no-tta)" if measured
                else "the validation rates were measured without flip TTA, these counts with it (--tta)")
    measured_size = calibration.get("working_size")
    if measured_size is not None and working_size is not None and int(measured_size) != int(working_size):
        return (f"the validation rates were measured at a working size of {int(measured_size)} px, these counts "
                f"at {int(working_size)} px (--image-size)")
    return None


@dataclass
class Calibration:
    """A calibration record as arrays: truth (m, K), confusion (m, K+1, K+1), soft (m, K+1, K)."""

    truth: np.ndarray
    confusion: np.ndarray
    soft: np.ndarray

    @classmethod
    def from_record(cls, record: dict) -> Calibration:
        """ValueError saying what is wrong when the record is not one calibration_record wrote."""
        images = record["images"]
        truth = np.asarray([image["truth"] for image in images], dtype=np.float64).reshape(len(images), -1)
        confusion = np.asarray([image["confusion"] for image in images], dtype=np.float64)
        soft = np.asarray([image["soft"] for image in images], dtype=np.float64)
        if truth.shape[1:] != (K,) or confusion.shape[1:] != (K + 1, K + 1) or soft.shape[1:] != (K + 1, K):
            raise ValueError(f"calibration images of shapes {truth.shape}, {confusion.shape}, {soft.shape}")
        if not all(np.isfinite(a).all() and (a >= 0).all() for a in (truth, confusion, soft)):  # NaN: a traceback
            raise ValueError("calibration counts or scores that are negative, NaN or infinite")
        return cls(truth, confusion, soft)

    def __len__(self) -> int:
        return len(self.truth)


@dataclass
class Units:
    """The target's resampling units: kept counts (n, K) and score sums (n, K; None where not recorded)."""

    counts: np.ndarray
    soft: np.ndarray | None

    @classmethod
    def of(cls, counts, soft=None) -> Units:
        return cls(np.asarray(counts, dtype=np.float64).reshape(-1, K),
                   None if soft is None else np.asarray(soft, dtype=np.float64).reshape(-1, K))

    @classmethod
    def from_calibration(cls, calibration: Calibration) -> Units:
        """Labelled images seen as targets: kept = column sums of the confusion matrix (no background
        column), score sums = column sums of the soft matrix."""
        return cls(calibration.confusion[:, :, :K].sum(axis=1), calibration.soft.sum(axis=1))

    def __len__(self) -> int:
        return len(self.counts)

    def blocks(self, size: int) -> Units:
        """Consecutive units summed in blocks of *size* (the last may be shorter): a block bootstrap's units."""
        if not len(self):
            return self
        starts = np.arange(0, len(self), max(1, size))
        return Units(np.add.reduceat(self.counts, starts),
                     None if self.soft is None else np.add.reduceat(self.soft, starts))


# ----------------------------------------------------------------------------- the estimators

def rates_per_face(rates: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(per_face (k, k), false_share (k)) from summed *rates* (k+1, k): what the calibration faces of each true
    class (last row: no face) produced per predicted class; truth (k): calibration faces per class. per_face[i][j]:
    what one true class-i face produces as class j (a row of zeros for a class without calibration faces);
    false_share[j]: the share of class j's production on no face. Stacks (..., k+1, k), (..., k): row by row."""
    k = truth.shape[-1]
    per_face = np.divide(rates[..., :k, :], truth[..., :, None], out=np.zeros(rates.shape[:-2] + (k, k)),
                         where=truth[..., :, None] > 0)
    produced = rates.sum(axis=-2)
    return per_face, np.divide(rates[..., k, :], produced, out=np.zeros(produced.shape), where=produced > 0)


def masked_or_not(observed: np.ndarray, rates: np.ndarray, truth: np.ndarray) -> tuple:
    """*observed* (K), *rates* (K+1, K) and *truth* (K) with the classes other than with_mask pooled:
    (2), (3, 2) and (2), with_mask first (pacc2). Also on stacks (..., K), (..., K+1, K), (..., K)."""
    other = [k for k in range(K) if k != WITH_MASK]
    rows = np.stack([rates[..., WITH_MASK, :], rates[..., other, :].sum(axis=-2), rates[..., K, :]], axis=-2)
    return (np.stack([observed[..., WITH_MASK], observed[..., other].sum(axis=-1)], axis=-1),
            np.stack([rows[..., WITH_MASK], rows[..., other].sum(axis=-1)], axis=-1),
            np.stack([truth[..., WITH_MASK], truth[..., other].sum(axis=-1)], axis=-1))


def counts_from_parts(per_face, false_share, observed) -> np.ndarray:  # one row: nnls takes no stack
    return nnls(per_face.T, observed * (1.0 - false_share))[0]


def adjusted_counts(observed: np.ndarray, rates: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """The true faces per class T >= 0 (K) that best explain *observed* (K, per predicted class), with
    the rates of rates_per_face. A class without calibration faces has no rates: its column of the
    system is zero and its estimate 0."""
    return counts_from_parts(*rates_per_face(rates, truth), observed)


def _adjusted_shares(method: str, counts, soft, confusion, soft_rates, truth) -> tuple[np.ndarray, np.ndarray]:
    """(share with_mask, estimated faces) of adjusted_counts for each row of stacked sums: pooled and rated all
    rows at once, solved a row at a time (a row at a time for all, 1000 replicates cost a folder ~42 ms)."""
    if method not in CALIBRATED:
        raise ValueError(f"unknown estimator {method!r}: expected one of {', '.join(METHODS)}")
    (observed, rates), with_mask = (counts, confusion[..., :K]) if method == "acc" else (soft, soft_rates), WITH_MASK
    if method == "pacc2":
        (observed, rates, truth), with_mask = masked_or_not(observed, rates, truth), 0
    per_face, false_share = rates_per_face(rates, truth)
    estimated = np.array([counts_from_parts(per_face[r], false_share[r], observed[r]) for r in range(len(observed))])
    total = estimated.sum(axis=1)
    return np.divide(estimated[:, with_mask], total, out=np.full(len(total), math.nan), where=total > 0), total


def point_estimate(method: str, counts: np.ndarray, soft: np.ndarray | None,
                   calibration: tuple | None = None) -> tuple[float, float]:
    """(share with_mask, faces it counts) from summed kept *counts* and score sums *soft* of a target;
    *calibration* is (confusion sums (K+1, K+1), soft sums (K+1, K), truth sums (K)) for the adjusted estimators."""
    if method in UNADJUSTED:  # cc: the kept counts; pcc: the score sums
        sums = np.asarray(counts if method == "cc" else soft, dtype=np.float64)
        return float(_shares(sums[None])[0]), float(sums.sum())
    shares, faces = _adjusted_shares(method, *(a if a is None else a[None] for a in (counts, soft, *calibration)))
    return float(shares[0]), float(faces[0])


def _draw_counts(rng: np.random.Generator, replicates: int, n: int) -> np.ndarray:
    """How often each of *n* units is drawn in each of *replicates* replicates (replicates x n; n draws with replacement
    a row), from doubles, one per element with nothing carried between calls: the same rows whatever the chunks."""
    drawn = np.floor(rng.random((replicates, n)) * n).astype(np.int64) + n * np.arange(replicates)[:, None]
    return np.bincount(drawn.ravel(), minlength=replicates * n).reshape(replicates, n).astype(np.float64)


def _shares(sums: np.ndarray) -> np.ndarray:
    """_share of every row of *sums* (replicates x K); NaN where a row has no face."""
    total = sums.sum(axis=1)
    return np.divide(sums[:, WITH_MASK], total, out=np.full(len(total), math.nan), where=total > 0)


def _replicate_shares(method: str, counts: np.ndarray, soft: np.ndarray | None, calibration: Calibration | None,
                      calibration_weights: np.ndarray | None) -> np.ndarray:
    """point_estimate's share for every replicate: *counts* and *soft* are the target's sums per replicate
    (replicates x K), *calibration_weights* the calibration images' draw counts (replicates x images)."""
    if method == "cc":
        return _shares(counts)
    if method == "pcc":
        return _shares(soft)
    return _adjusted_shares(method, counts, soft, np.tensordot(calibration_weights, calibration.confusion, axes=1),
                            np.tensordot(calibration_weights, calibration.soft, axes=1),
                            calibration_weights @ calibration.truth)[0]


def _rounded(value: float | None, digits: int = 2):
    return None if value is None or not math.isfinite(value) else round(value, digits)


# The note of an adjusted estimate that finds no face where faces were found (it said "no faces found").
NONE_ESTIMATED = "no face estimated: the validation rates put every face found down to false detections"


def estimate(units: Units, method: str, calibration: Calibration | None = None, unit: str = "image",
             replicates: int = D.BOOTSTRAP_REPLICATES, seed: int = D.SEED, confidence: float = CONFIDENCE) -> dict:
    """The percent properly masked by *method*, with its seeded percentile bootstrap interval.

    Each replicate draws the target *units* with replacement and, given *calibration*, the calibration
    images too (acc, pacc, pacc2: their rates; cc and pcc: their error there, which widens the interval;
    see the module docstring). Replicates in which no face is found are left out (replicates_defined
    says how many remain). Percent, low and high are None (and `note` says why) when no face is found; the interval
    is None below two units holding what the estimator counts (one image says nothing about how much images vary)
    and where every replicate gives one figure other than 0 or 100 % (no spread is not certainty; at 0 or 100 %:
    the exact bound, the units as the trials), and it always holds the estimate."""
    if method in CALIBRATED and calibration is None:
        raise ValueError(f"{method} needs the model's calibration images")
    if method in SCORE_SUMS and units.soft is None:
        raise ValueError(f"{method} needs the score sums of every image")
    # drawn by position: in the order of their numbers, not their names (which differ by path, see image_units)
    order = np.lexsort((units.counts if units.soft is None else np.hstack([units.counts, units.soft])).T)
    units, n = Units(units.counts[order], None if units.soft is None else units.soft[order]), len(units)
    labelled = Units.from_calibration(calibration) if calibration is not None and method in UNADJUSTED else None

    def errors_on_calibration(calibration_weights: np.ndarray) -> np.ndarray:
        """Per row of draw counts (replicates x calibration images): the estimator's share minus the true
        share on the calibration images so weighted."""
        found = _shares(calibration_weights @ (labelled.counts if method == "cc" else labelled.soft))
        return found - _shares(calibration_weights @ calibration.truth)

    # cc and pcc measured against the truth on the calibration images: their own error (module docstring).
    # Undefined when those images hold no face, or the estimator finds none there: then not widened.
    own = (float(errors_on_calibration(np.ones((1, len(calibration))))[0])
           if method in UNADJUSTED and calibration is not None and len(calibration) else math.nan)
    own_error = math.isfinite(own)
    resamples_calibration = method in CALIBRATED or own_error
    calibration_sums = ((calibration.confusion.sum(axis=0), calibration.soft.sum(axis=0), calibration.truth.sum(axis=0))
                        if method in CALIBRATED else None)
    share, faces = point_estimate(method, units.counts.sum(axis=0),
                                  None if units.soft is None else units.soft.sum(axis=0), calibration_sums)
    result = {"method": method, "estimator": METHOD_NAMES[method], "percent": _rounded(100 * share),
              "low": None, "high": None, "confidence": confidence, "units": n, "unit": unit,
              "faces_found": int(units.counts.sum()), "faces_estimated": _rounded(faces, 1),
              "replicates": replicates, "replicates_defined": 0, "seed": seed,
              "calibration_images": len(calibration) if resamples_calibration else None,
              "resampled": f"{unit}s and the calibration images" if resamples_calibration else f"{unit}s"}
    if own_error:
        result["calibration_error_points"] = _rounded(100 * own)
    elif method in UNADJUSTED and calibration is not None:
        result["not_widened"] = ("the validation images hold no face, or none was found there: the interval "
                                 "covers the sampling of images only")
    if not math.isfinite(share):  # an adjusted estimator can also put every face found down to false detections
        why = "no faces found" if not result["faces_found"] else NONE_ESTIMATED
        return {**result, "note": why if n else f"no {unit}s"}
    if n < 2:
        return {**result, "note": f"one {unit}: no interval"}
    if (holding := int(np.count_nonzero((units.counts if method in ("cc", "acc") else units.soft).sum(axis=1)))) < 2:
        # the other units draw nothing: every replicate's target would be that one unit's, whatever its spread
        return {**result, "note": f"faces found in one {unit} of {n}: no interval"}
    # One stream for the target's draws and one for the calibration images', so that the target's replicates
    # are the same whether or not the calibration images are drawn too (a widened interval holds the plain one).
    target_rng, calibration_rng = (np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(2))
    # The replicates' draw counts as rows of a matrix and the estimators on all rows at once (a request of
    # a few images to the service costs milliseconds), in chunks of at most BOOTSTRAP_CHUNK_DRAWS counts
    # per matrix (a collection of 100k images must not hold replicates x images numbers).
    widest = max(n, len(calibration) if resamples_calibration else 0)
    chunk = max(1, min(replicates, BOOTSTRAP_CHUNK_DRAWS // widest))
    values, corrected = [np.zeros(0)], [np.zeros(0)]
    for start in range(0, replicates, chunk):
        rows = min(chunk, replicates - start)
        weights = _draw_counts(target_rng, rows, n)
        calibration_weights = _draw_counts(calibration_rng, rows, len(calibration)) if resamples_calibration else None
        shares = _replicate_shares(method, weights @ units.counts,
                                   None if units.soft is None else weights @ units.soft, calibration,
                                   calibration_weights)
        values.append(shares)
        if own_error:  # less the estimator's error on the same replicate's calibration images
            corrected.append(np.clip(shares - errors_on_calibration(calibration_weights), 0.0, 1.0))
    values, corrected = (found[np.isfinite(found)] for found in (np.concatenate(values), np.concatenate(corrected)))
    result["replicates_defined"] = int(len(values))
    if len(values):
        tail = 100 * (1 - confidence) / 2
        low, high = np.percentile(values, [tail, 100 - tail])
        if len(corrected):
            corrected_low, corrected_high = np.percentile(corrected, [tail, 100 - tail])
            low, high = min(low, corrected_low), max(high, corrected_high)
        # a percentile interval need not hold its own estimate (pacc read 94.22 % with 0.0-76.86 %: test_quantify_edges)
        low, high = _rounded(100 * min(float(low), share)), _rounded(100 * max(float(high), share))
        if low == high and 0 < low < 100:  # every replicate the same (the units alike): no spread is not certainty
            return {**result, "note": f"no interval: every resample of the {n} {unit}s gives {one_decimal(low)}%, "
                                      "which shows no spread, not certainty"}
        if low == high:  # all 0 or 100 % (it read 100.0-100.0 %): the exact bound, the units as trials (design.md)
            every, bound = low, _rounded(100 * ((1 - confidence) / 2) ** (1 / holding))
            low, high = (bound, 100.0) if every else (0.0, _rounded(100 - bound))
            result["note"] = (f"every resample gives {every:g}%: the exact bound for {holding} {unit}s with faces, "
                              f"{'all' if every else 'none'} properly masked ({unit}s as the trials)")
        result["low"], result["high"] = low, high
    return result


# ----------------------------------------------------------------------------- sets of images

def available_methods(units: Units, calibration: Calibration | None, calibration_note: str | None) -> dict:
    """{method: None if it can be computed, else why not}."""
    no_soft = "the score sums of the detections were not recorded (predictions made before they were)"
    return {m: ((calibration_note if m in CALIBRATED and calibration is None else None)
                or (no_soft if m in SCORE_SUMS and units.soft is None else None)) for m in METHODS}


def headline_problems(available: dict, calibration: Calibration | None) -> dict:
    """*available*, with the adjusted estimators also barred from the headline (not from the table) when
    their rates rest on fewer than CALIBRATION_MIN_FACES labelled faces: the rates of a class seen a few
    times are noisy, and correcting a count by them can err more than not correcting it (the make run
    sample's 40 validation faces put pacc 22 points off where cc was 14)."""
    if calibration is None or (faces := int(calibration.truth.sum())) >= D.CALIBRATION_MIN_FACES:
        return available
    few = (f"its validation rates rest on {faces} labelled faces, fewer than the {D.CALIBRATION_MIN_FACES} "
           "an adjusted headline needs (utils/defaults.py CALIBRATION_MIN_FACES)")
    return {m: (why or few) if m in CALIBRATED else why for m, why in available.items()}


def chosen_method(method: str, available: dict) -> tuple[str, str | None]:
    """(the estimator to report, why it stands in for *method*, or None when it is *method*)."""
    if method not in METHODS:
        raise ValueError(f"unknown estimator {method!r}: expected one of {', '.join(METHODS)}")
    wanted = method
    while available[method] is not None:
        method = FALLBACK[method]
    return method, None if method == wanted else f"{method} instead of {wanted}: {available[wanted]}"


def set_estimates(units: Units, calibration: Calibration | None, calibration_note: str | None = None,
                  method: str = D.COMPLIANCE_ESTIMATOR, unit: str = "image", headline_only: bool = False,
                  **bootstrap) -> dict:
    """{"estimate": the headline (method, or its fallback, said so), "estimates": every estimator that
    can be computed (*headline_only*: the headline's alone), "unavailable": {estimator: why}}. Each estimator
    seeds its own bootstrap, so the headline is the same whichever others are computed beside it."""
    available = available_methods(units, calibration, calibration_note)
    chosen, fallback = chosen_method(method, headline_problems(available, calibration))
    estimates = {m: estimate(units, m, calibration, unit=unit, **bootstrap)
                 for m in METHODS if available[m] is None and (m == chosen or not headline_only)}
    headline = dict(estimates[chosen])
    if fallback:
        headline["fallback"] = fallback
    return {"estimate": headline, "estimates": estimates,
            "unavailable": {m: why for m, why in available.items() if why is not None}}


def image_units(images: list[dict]) -> Units:
    """Units of prediction records ({detections [{label, score}], soft_counts}), in any order: estimate orders them
    by their numbers, so that the same photos get the same interval from predict (named by their paths), a merge of
    its shards (shard-000000.tar:siteA/x.jpg) and the service (the uploads' names), in subfolders or not."""
    counts = [class_sums([d["label"] for d in image["detections"]]) for image in images]
    if any(image.get("soft_counts") is None for image in images):
        return Units.of(counts, None)
    return Units.of(counts, [[image["soft_counts"][name] for name in CLASSES] for image in images])


def prediction_estimates(images: list[dict], calibration_record_: dict | None, score_threshold: float,
                         tta: bool = False, method: str = D.COMPLIANCE_ESTIMATOR, working_size: int | None = None,
                         skipped=(), **bootstrap) -> dict:
    """compliance.json's estimates for prediction records made at *score_threshold*, with flip TTA or not, at
    *working_size* px: overall, and per folder when the images, those *skipped* ({file, reason, folder}) too, sit in
    two or more folders ("per_folder": {folder: headline estimate}; "" is the top level). A folder's images that could
    not be read are its "images_skipped"; one of them alone has no figure and a note saying so (it was left out)."""
    note = calibration_problem(calibration_record_, score_threshold, tta, working_size)
    calibration = None if note else Calibration.from_record(calibration_record_)
    report = set_estimates(image_units(images), calibration, note, method, **bootstrap)
    # Grouped in one pass (a scan of every image per folder cost 10^9 steps for 100k images in folders of ten),
    # and only the headline bootstrapped per folder: the figure per folder keeps nothing else.
    by_folder: dict[str, list[dict]] = {}
    for image in images:
        by_folder.setdefault(image.get("folder", ""), []).append(image)
    unread = Counter(entry["folder"] for entry in skipped if isinstance(entry.get("folder"), str))
    if len(folders := sorted(by_folder.keys() | unread.keys())) > 1:
        report["per_folder"] = {}
        for folder in folders:
            result = set_estimates(image_units(by_folder.get(folder, [])), calibration, note, method,
                                   headline_only=True, **bootstrap)["estimate"]
            result.update({"images_skipped": unread[folder]} if unread[folder] else {})
            if folder not in by_folder:
                result["note"] = f"every image in it skipped ({unread[folder]}; the skipped list names them)"
            report["per_folder"][folder] = result
    report["calibration"] = calibration_summary(calibration_record_, note)
    return report


def calibration_summary(record: dict | None, note: str | None) -> dict:
    """What the adjusted estimators rest on, for the outputs (not the per-image record itself)."""
    if note:
        return {"used": False, "why_not": note}
    return {"used": True, "chosen_on": record.get("chosen_on"), "images": len(record["images"]),
            "faces": int(sum(sum(image["truth"]) for image in record["images"])),
            "score_threshold": record["score_threshold"], "floor": record["floor"], "tta": bool(record.get("tta")),
            "working_size": record.get("working_size")}


# ----------------------------------------------------------------------------- against the truth

def true_percent(calibration: Calibration) -> float | None:
    total = float(calibration.truth.sum())
    return 100 * float(calibration.truth[:, WITH_MASK].sum()) / total if total else None


def judge(result: dict, truth: float | None) -> None:
    """Set an estimate's error against the true percent *truth* and whether *truth* is inside its interval."""
    percent = result["percent"]
    result["error_points"] = None if truth is None or percent is None else round(percent - truth, 2)
    result["truth_inside"] = (None if truth is None or result["low"] is None
                              else bool(result["low"] <= round(truth, 2) <= result["high"]))
