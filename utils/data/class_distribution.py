"""Objects per class per split: counts from split.csv, a CSV table and a grouped bar chart."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # jobs run without a display
import matplotlib.pyplot as plt  # noqa: E402

from ..atomic import atomic_path, write_text  # noqa: E402
from ..classes import CLASS_COLOURS, CLASSES, NO_LABEL_MAP, LabelMap  # noqa: E402
from .pairs import read_csv_rows, read_pairs_csv  # noqa: E402
from .split import SPLITS  # noqa: E402
from .voc import VocError, parse_voc  # noqa: E402


def count_objects(split_csv, images_dir=None, annotations_dir=None, classes=CLASSES,
                  label_map: LabelMap = NO_LABEL_MAP):
    """Count objects and images per class per split, object names read through *label_map*.

    Returns (counts, problems): counts[split] = {"images": n, "objects": {class: n},
    "images_with": {class: n}}; problems lists {"file", "problem"} for annotations that
    could not be read (skipped) and objects of unknown classes (not counted).
    """
    counts = {split: {"images": 0, "objects": dict.fromkeys(classes, 0), "images_with": dict.fromkeys(classes, 0)}
              for split in SPLITS}
    problems = []
    split_names = [row["split"] for row in read_csv_rows(split_csv, required=("image", "annotation", "split"))]
    # read_pairs_csv keeps the rows' order, so the two lists line up.
    for split, pair in zip(split_names, read_pairs_csv(split_csv, images_dir, annotations_dir)):
        if split not in counts:
            problems.append({"file": pair.image.name, "problem": f"unknown split {split!r}; skipped"})
            continue
        try:
            ann = parse_voc(pair.annotation, label_map)
        except VocError as exc:
            problems.append({"file": Path(exc.file).name, "problem": f"{exc.problem}; skipped"})
            continue
        entry = counts[split]
        entry["images"] += 1
        for obj in ann.objects:
            if obj.name in entry["objects"]:
                entry["objects"][obj.name] += 1
            else:
                problems.append({"file": pair.annotation.name,
                                 "problem": f"unknown class {obj.name!r} not counted"})
        for name in {obj.name for obj in ann.objects} & set(classes):
            entry["images_with"][name] += 1
    return counts, problems


def write_counts_csv(path, counts) -> Path:
    """Long table: split, class, objects, images (images containing the class); plus an "all" split."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["split", "class", "objects", "images"])
    classes = list(next(iter(counts.values()))["objects"])
    for split, entry in counts.items():
        for name in classes:
            writer.writerow([split, name, entry["objects"][name], entry["images_with"][name]])
    for name in classes:
        writer.writerow(["all", name, sum(e["objects"][name] for e in counts.values()),
                         sum(e["images_with"][name] for e in counts.values())])
    return write_text(path, buffer.getvalue())


def plot_counts(path, counts, title: str = "Objects per class per split") -> Path:
    """Grouped bars: one group per split, one bar per class in the project's class colours."""
    splits = list(counts)
    classes = list(next(iter(counts.values()))["objects"])
    width = 0.8 / len(classes)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    try:
        for k, name in enumerate(classes):
            xs = [i + (k - (len(classes) - 1) / 2) * width for i in range(len(splits))]
            values = [counts[s]["objects"][name] for s in splits]
            colour = tuple(c / 255 for c in CLASS_COLOURS.get(name, (128, 128, 128)))
            bars = ax.bar(xs, values, width, label=name, color=colour)
            ax.bar_label(bars, padding=2, fontsize=8)
        ax.set_xticks(range(len(splits)), [f"{s}\n({counts[s]['images']} images)" for s in splits])
        ax.set_ylabel("objects")
        ax.set_title(title)
        ax.legend()
        ax.margins(y=0.12)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
    return Path(path)
