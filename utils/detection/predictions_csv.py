"""predictions.csv, a row per detection, apart from the predict job's module: merge_predictions writes it too, and
importing it through utils.detection.prediction loaded torch and torchvision (~750 MB, ~4 s) into a job that only
reads JSON."""

from __future__ import annotations

import csv
from pathlib import Path

PREDICTION_CSV_FIELDS = ("file", "xmin", "ymin", "xmax", "ymax", "label", "score")


def write_predictions_csv(images, path: Path) -> None:
    """predictions.csv of image records (predict's, or merge_predictions' of every part), a row per detection,
    streamed to *path*."""
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(PREDICTION_CSV_FIELDS)
        for image in images:
            for det in image["detections"]:
                writer.writerow([image["file"], *det["box"], det["label"], det["score"]])
