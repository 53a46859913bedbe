"""Train/val/test split: deterministic, group-aware and stratified on the rare class.

Algorithm. Images are first joined into units: all images named in one duplicate
group (only images present in the pairs count) form one unit, so a group never
straddles two splits. Units are sorted by name and shuffled with
``random.Random(seed)``, so the result depends on the seed and not on input order.
Target images per split come from the fractions by largest remainder, with at least
one image for every split with a positive fraction while images last (tiny data sets:
3 images give 1/1/1, 2 give train and test, 1 gives train). Units containing
RARE_CLASS (mask_weared_incorrect) are assigned first, against their own targets
computed the same way -- so with 3+ rare images each split gets at least one -- then
the other units fill what is left of each split's overall target. Each unit goes,
larger units first, to the split furthest below its target. A final pass moves one
unit into any split left empty (only possible with large duplicate groups).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

from .. import defaults as D
from ..classes import NO_LABEL_MAP, RARE_CLASS, LabelMap
from ..errors import InputError, read_json
from .voc import parse_voc

SPLITS = ("train", "val", "test")


class SplitError(InputError):
    """Split parameters or inputs that cannot be used; str() says why."""


def check_fractions(fractions) -> tuple[float, ...]:
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != len(SPLITS):
        raise SplitError(f"need {len(SPLITS)} fractions (train val test), got {len(fractions)}")
    if any(not math.isfinite(f) or f < 0 for f in fractions) or sum(fractions) <= 0:
        raise SplitError(f"fractions must be non-negative with a positive sum, got {fractions}")
    total = sum(fractions)
    return tuple(f / total for f in fractions)


def _targets(num_images: int, fractions) -> list[int]:
    """Images per split by largest remainder, then at least one per active split while images last."""
    raw = [num_images * f for f in fractions]
    targets = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - targets[i]), -fractions[i], i))
    for i in order[:num_images - sum(targets)]:
        targets[i] += 1
    active = sorted((i for i, f in enumerate(fractions) if f > 0), key=lambda i: (-fractions[i], i))
    needs_one = active[:num_images]
    for i in needs_one:
        if targets[i] == 0:
            donor = max(range(len(targets)), key=lambda j: (targets[j] - (j in needs_one), fractions[j]))
            targets[donor] -= 1
            targets[i] += 1
    return targets


def _assign(units, targets, fractions, per_split) -> list[int]:
    """Give each unit (larger first) to the active split furthest below its target; returns images per split."""
    counts = [0] * len(fractions)
    active = [i for i, f in enumerate(fractions) if f > 0]
    for unit in sorted(units, key=len, reverse=True):  # stable: keeps the shuffled order within a size
        best = max(active, key=lambda i: (targets[i] - counts[i], fractions[i], -i))
        per_split[best].append(unit)
        counts[best] += len(unit)
    return counts


def _fill_empty(per_split, active, fractions, prefer=lambda unit: 0):
    """Give each empty active split one unit taken from the split holding most units (if it has 2+)."""
    for i in sorted(active, key=lambda i: -fractions[i]):
        if per_split[i]:
            continue
        donor = max(active, key=lambda j: (len(per_split[j]), fractions[j]))
        if len(per_split[donor]) < 2:
            return
        # The smallest unit moves (least disturbance); *prefer* ranks which kind moves first.
        unit = min(per_split[donor], key=lambda u: (prefer(u), len(u)))
        per_split[donor].remove(unit)
        per_split[i].append(unit)


def _units(pairs, duplicate_groups):
    by_name = {pair.image.name: pair for pair in pairs}
    parent = {name: name for name in by_name}

    def find(name):
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for group in duplicate_groups or ():
        present = [Path(name).name for name in group if Path(name).name in by_name]
        for name in present[1:]:
            a, b = find(present[0]), find(name)
            if a != b:
                parent[max(a, b)] = min(a, b)
    units = {}
    for name in sorted(by_name):
        units.setdefault(find(name), []).append(by_name[name])
    return list(units.values())


def read_duplicate_groups(report_path) -> list[list[str]]:
    """The duplicate_groups of a validation_report.json (lists of image file names)."""
    report = read_json(report_path, "validation report", SplitError)
    groups = report.get("duplicate_groups", []) if isinstance(report, dict) else None
    if not isinstance(groups, list):
        raise SplitError(f"{report_path}: duplicate_groups must be a list of lists of image names")
    return groups


def image_classes(pairs, label_map: LabelMap = NO_LABEL_MAP) -> dict[str, set[str]]:
    """Class names present in each pair's annotation (names read through *label_map*), by image file name
    (VocError if unreadable)."""
    return {pair.image.name: {obj.name for obj in parse_voc(pair.annotation, label_map).objects} for pair in pairs}


def split_pairs(pairs, duplicate_groups=(), fractions=D.SPLIT_FRACTIONS, seed: int = D.SEED,
                classes_of: dict[str, set[str]] | None = None, rare_class: str = RARE_CLASS,
                label_map: LabelMap = NO_LABEL_MAP) -> list[dict]:
    """Rows {image, annotation, split} for *pairs*, in input order.

    duplicate_groups: lists of image file names that must share a split.
    classes_of: class names per image file name; read from the annotations (through *label_map*) when omitted.
    """
    pairs = list(pairs)
    fractions = check_fractions(fractions)
    names = [p.image.name for p in pairs]
    if len(set(names)) != len(names):
        duplicates = sorted(n for n, c in Counter(names).items() if c > 1)
        raise SplitError(f"image file names must be unique, repeated: {', '.join(duplicates[:5])}")
    if classes_of is None:
        classes_of = image_classes(pairs, label_map)
    units = _units(pairs, duplicate_groups)

    def is_rare(unit):
        return any(rare_class in classes_of.get(p.image.name, ()) for p in unit)

    rng = random.Random(seed)
    rare_units = [u for u in units if is_rare(u)]
    common_units = [u for u in units if not is_rare(u)]
    rng.shuffle(rare_units)
    rng.shuffle(common_units)
    per_split = [[] for _ in SPLITS]
    targets = _targets(sum(len(u) for u in units), fractions)
    rare_counts = _assign(rare_units, _targets(sum(len(u) for u in rare_units), fractions), fractions, per_split)
    # The common units fill what the rare ones left of each split's overall target.
    common_targets = [max(0, t - r) for t, r in zip(targets, rare_counts)]
    _assign(common_units, common_targets, fractions, per_split)
    active = [i for i, f in enumerate(fractions) if f > 0]
    # Only groups larger than one image can leave a split empty here; moving a common unit keeps the rare spread.
    _fill_empty(per_split, active, fractions, prefer=lambda unit: int(is_rare(unit)))
    split_of = {pair.image.name: SPLITS[i] for i, units_ in enumerate(per_split) for unit in units_ for pair in unit}
    return [{"image": pair.image, "annotation": pair.annotation, "split": split_of[pair.image.name]} for pair in pairs]


def split_summary(rows, classes_of: dict[str, set[str]], rare_class: str = RARE_CLASS) -> dict:
    """Images and rare-class images per split."""
    summary = {name: {"images": 0, f"images_with_{rare_class}": 0} for name in SPLITS}
    for row in rows:
        entry = summary[row["split"]]
        entry["images"] += 1
        entry[f"images_with_{rare_class}"] += rare_class in classes_of.get(Path(row["image"]).name, ())
    return summary

