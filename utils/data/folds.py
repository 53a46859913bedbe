"""k-fold assignment of the train+val pool for cross-validation, and how a preprocessed set's
file names map back to the pool's images.

Folds are group-aware and stratified exactly like the train/val/test split
(utils.data.split): the split's own units (an image, or every image of one near-duplicate
group) are the groups, so a group never straddles two folds, and the label stratified on is
"the image holds the rare class" (mask_weared_incorrect). scikit-learn's StratifiedGroupKFold
(shuffled with the seed) spreads the units over the folds; the assignment depends on the
seed and the images, not on their order. The workflow spreads the train split and the val split
each on its own (``split_of``): a fold model trains on the other folds' train images and validates
on their val images (bin/make_fold.py), so every fold needs some of both. A split with fewer
images than folds of either class is spread without stratifying.

The workflow's sets name their files ``<prefix><stem>.<ext>``: ``train_<stem>`` and
``val_<stem>`` (originals, from augment and preprocess) and ``aug<k>_<stem>`` (augmented
copies of a training image). :func:`source_stem` reads the original image's stem back.
"""

from __future__ import annotations

import csv
import io
import re
import warnings
from pathlib import Path

from ..classes import NO_LABEL_MAP, RARE_CLASS, LabelMap
from ..errors import InputError
from .split import _units, image_classes

FOLDS_CSV_FIELDS = ("image", "fold")
# Prefixes the workflow's data jobs give their files (bin/augment.py, bin/preprocess.py --prefix).
ORIGINAL_PREFIXES = ("train_", "val_")
COPY_PREFIX = re.compile(r"^aug\d+_")


class FoldError(InputError):
    """Fold parameters or a folds.csv that cannot be used; str() says why."""


def assign_folds(pairs, folds: int, duplicate_groups=(), seed: int = 0,
                 classes_of: dict[str, set[str]] | None = None, rare_class: str = RARE_CLASS,
                 label_map: LabelMap = NO_LABEL_MAP, split_of: dict[str, str] | None = None,
                 setting: str = "--folds") -> dict[str, int]:
    """{image file name: fold 0..folds-1} for *pairs* (objects with .image and .annotation paths).
    *setting*: how errors name the setting (an experiment file's key where one gave it).

    duplicate_groups: lists of image file names that must share a fold (the validation report's).
    classes_of: class names per image file name; read from the annotations when omitted.
    split_of: the split (train / val) per image file name. When given, each split is spread over the
    folds on its own (the split keeps near-duplicates in one split, so no group straddles two), so that
    every fold model finds training and validation images in the other folds (bin/make_fold.py).
    """
    pairs = list(pairs)
    if folds < 2:
        raise FoldError(f"{setting} {folds}: cross-validation needs at least 2 folds")
    names = [pair.image.name for pair in pairs]
    if len(set(names)) != len(names):
        raise FoldError("image file names must be unique to assign folds")
    if classes_of is None:
        classes_of = image_classes(pairs, label_map)
    if split_of is None:
        return _assign(pairs, folds, duplicate_groups, seed, classes_of, rare_class, "the train+val pool", setting)
    assignment = {}
    for split in sorted({split_of[name] for name in names}):
        assignment.update(_assign([pair for pair in pairs if split_of[pair.image.name] == split], folds,
                                  duplicate_groups, seed, classes_of, rare_class, f"the {split} split", setting))
    return {name: assignment[name] for name in names}


def _assign(pairs: list, folds: int, duplicate_groups, seed: int, classes_of: dict, rare_class: str,
            what: str, setting: str) -> dict[str, int]:
    import numpy as np
    from sklearn.model_selection import StratifiedGroupKFold

    names = [pair.image.name for pair in pairs]
    units = _units(pairs, duplicate_groups)
    if len(units) < folds:
        raise FoldError(f"{setting} {folds}: {what} has only {len(units)} groups of images "
                        f"({len(pairs)} images); every fold needs at least one")
    unit_of = {pair.image.name: index for index, unit in enumerate(units) for pair in unit}
    order = sorted(names)  # input order must not matter
    groups = np.array([unit_of[name] for name in order])
    # Each image's own label: the splitter balances the rare images per fold, moving whole groups.
    labels = np.array([int(rare_class in classes_of.get(name, ())) for name in order])
    if np.bincount(labels).max() < folds:  # too few images to stratify (a small val split): spread them only
        labels = np.zeros_like(labels)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # "The least populated class in y has only n members": fewer rare images than folds is
        # allowed; those folds simply hold none.
        warnings.simplefilter("ignore", UserWarning)
        assignment = {}
        try:
            for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(order)), labels, groups)):
                for index in held_out:
                    assignment[order[index]] = fold
        except ValueError as error:  # scikit-learn's own check of the counts, in its words
            raise FoldError(f"{setting} {folds}: {error}") from None
    return assignment


def folds_csv_text(assignment: dict[str, int]) -> str:
    """folds.csv: image (file name), fold; sorted by image name."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(FOLDS_CSV_FIELDS)
    for name in sorted(assignment):
        writer.writerow([name, assignment[name]])
    return buffer.getvalue()


def read_folds_csv(path) -> dict[str, int]:
    """{image file name: fold} of a folds.csv; FoldError naming the file and row when it cannot be used."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: a spreadsheet's byte-order mark
            reader = csv.DictReader(handle)
            missing = [field for field in FOLDS_CSV_FIELDS if field not in (reader.fieldnames or ())]
            if missing:
                raise FoldError(f"{path}: missing column(s) {', '.join(missing)} (need image, fold)")
            assignment = {}
            for line, row in enumerate(reader, start=2):
                name = Path(row["image"] or "").name
                try:
                    fold = int(row["fold"])
                except (TypeError, ValueError):
                    raise FoldError(f"{path}: line {line}: fold {row['fold']!r} is not a whole number") from None
                if not name or fold < 0:
                    raise FoldError(f"{path}: line {line}: need an image name and a fold of 0 or more")
                if name in assignment:
                    raise FoldError(f"{path}: line {line}: image {name} is listed twice")
                assignment[name] = fold
    except FileNotFoundError:
        raise FoldError(f"{path}: folds file not found") from None
    except (UnicodeDecodeError, csv.Error, IsADirectoryError) as error:
        raise FoldError(f"{path}: not a readable folds CSV ({' '.join(str(error).split())[:120]})") from None
    if not assignment:
        raise FoldError(f"{path}: no images")
    return assignment


def source_stem(stem: str) -> tuple[str, bool] | None:
    """(original image stem, is an augmented copy) of a set's file stem, or None for a name
    the workflow's data jobs do not write."""
    for prefix in ORIGINAL_PREFIXES:
        if stem.startswith(prefix):
            return stem[len(prefix):], False
    match = COPY_PREFIX.match(stem)
    if match:
        return stem[match.end():], True
    return None


def fold_of_stems(assignment: dict[str, int], where="folds.csv") -> dict[str, int]:
    """{image stem: fold}: the sets name files by stem; two images of one stem would be ambiguous."""
    by_stem: dict[str, int] = {}
    seen: dict[str, str] = {}
    for name, fold in assignment.items():
        stem = Path(name).stem
        if stem in seen:
            raise FoldError(f"{where}: images {seen[stem]} and {name} share the stem {stem!r}, which the "
                            "preprocessed sets cannot tell apart")
        seen[stem], by_stem[stem] = name, fold
    return by_stem
