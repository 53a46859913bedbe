"""Objects per class per split: counts, CSV, PNG, name resolution with --annotations, broken entries."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

from PIL import Image

from utils.data.class_distribution import count_objects, plot_counts, write_counts_csv
from utils.data.pairs import write_pairs_csv

ANNOTATIONS = {
    "a": ["with_mask", "with_mask", "without_mask"],
    "b": ["mask_weared_incorrect"],
    "c": ["without_mask", "mask_weared_incorrect"],
    "d": ["with_mask"],
}
SPLIT_OF = {"a": "train", "b": "train", "c": "val", "d": "test"}


def xml(names) -> str:
    objects = "".join(f"<object><name>{n}</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax>"
                      f"</bndbox></object>" for n in names)
    return f"<annotation><size><width>20</width><height>20</height></size>{objects}</annotation>"


def make_split(tmp_path, annotation_entry=lambda stem: f"ann/{stem}.xml"):
    (tmp_path / "ann").mkdir(exist_ok=True)
    for stem, names in ANNOTATIONS.items():
        (tmp_path / "ann" / f"{stem}.xml").write_text(xml(names))
    rows = [{"image": f"{stem}.jpg", "annotation": annotation_entry(stem), "split": SPLIT_OF[stem]}
            for stem in ANNOTATIONS]
    return write_pairs_csv(tmp_path / "split.csv", rows, fields=("image", "annotation", "split"))


def test_counts_per_split_and_class(tmp_path):
    counts, problems = count_objects(make_split(tmp_path))
    assert problems == []
    assert counts["train"]["objects"] == {"with_mask": 2, "without_mask": 1, "mask_weared_incorrect": 1}
    assert counts["train"]["images_with"] == {"with_mask": 1, "without_mask": 1, "mask_weared_incorrect": 1}
    assert counts["val"]["objects"] == {"with_mask": 0, "without_mask": 1, "mask_weared_incorrect": 1}
    assert counts["test"]["images"] == 1


def test_annotations_resolved_by_name_in_a_flat_folder(tmp_path):
    # Entries point nowhere useful; --annotations DIR is where the staged files are.
    split_csv = make_split(tmp_path, annotation_entry=lambda stem: f"/elsewhere/deep/{stem}.xml")
    counts, problems = count_objects(split_csv, annotations_dir=tmp_path / "ann")
    assert problems == [] and sum(c["images"] for c in counts.values()) == 4


def test_csv_and_png_are_written(tmp_path):
    counts, _ = count_objects(make_split(tmp_path))
    write_counts_csv(tmp_path / "dist.csv", counts)
    with open(tmp_path / "dist.csv", newline="") as handle:
        rows = {(r["split"], r["class"]): (int(r["objects"]), int(r["images"])) for r in csv.DictReader(handle)}
    assert rows[("train", "with_mask")] == (2, 1)
    assert rows[("all", "mask_weared_incorrect")] == (2, 2)
    assert rows[("all", "with_mask")] == (3, 2)
    plot_counts(tmp_path / "dist.png", counts)
    with Image.open(tmp_path / "dist.png") as image:
        assert image.format == "PNG" and image.width > 300


def test_unreadable_annotation_unknown_class_and_split_are_reported(tmp_path):
    split_csv = make_split(tmp_path)
    (tmp_path / "ann" / "b.xml").write_text("<annotation>")
    (tmp_path / "ann" / "d.xml").write_text(xml(["with_mask", "helmet"]))
    with open(split_csv, "a") as handle:
        handle.write("e.jpg,ann/a.xml,holdout\n")
    counts, problems = count_objects(split_csv)
    by_file = {p["file"]: p["problem"] for p in problems}
    assert "not well-formed" in by_file["b.xml"] and "skipped" in by_file["b.xml"]
    assert "helmet" in by_file["d.xml"]
    assert "holdout" in by_file["e.jpg"]
    assert counts["train"]["images"] == 1 and counts["test"]["objects"]["with_mask"] == 1


def test_cli(tmp_path, root):
    split_csv = make_split(tmp_path, annotation_entry=lambda stem: f"{stem}.xml")
    script = str(root / "bin" / "plot_class_distribution.py")
    proc = subprocess.run([sys.executable, script, "--split-csv", str(split_csv),
                           "--annotations", str(tmp_path / "ann"),
                           "--output", str(tmp_path / "out" / "class_distribution.png"),
                           "--output-csv", str(tmp_path / "out" / "class_distribution.csv")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "train: 2 images" in proc.stdout
    assert (tmp_path / "out" / "class_distribution.png").stat().st_size > 0
    record = json.loads((tmp_path / "out" / "class_distribution_run.json").read_text())
    assert record["job"] == "plot_class_distribution" and record["params"]["problems"] == []
    # Without --annotations the bare names resolve next to split.csv, where they are not: a clear failure.
    proc = subprocess.run([sys.executable, script, "--split-csv", str(split_csv), "--output", str(tmp_path / "x.png"),
                           "--output-csv", str(tmp_path / "x.csv")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no readable annotation" in proc.stderr and "a.xml" in proc.stderr
    assert not (tmp_path / "x.png").exists()
