"""split_pairs and bin/split_data.py: determinism, fractions, rare-class spread, duplicate groups, tiny sets."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from utils.classes import RARE_CLASS
from utils.data.pairs import Pair, write_pairs_csv
from utils.data.split import SPLITS, SplitError, split_pairs


def make_pairs(n, rare_every=0):
    pairs = [Pair(Path(f"img{k:03d}.jpg"), Path(f"img{k:03d}.xml")) for k in range(n)]
    classes_of = {p.image.name: ({RARE_CLASS, "with_mask"} if rare_every and k % rare_every == 0 else {"with_mask"})
                  for k, p in enumerate(pairs)}
    return pairs, classes_of


def splits_of(rows):
    return {Path(r["image"]).name: r["split"] for r in rows}


def test_fractions_are_met_and_result_is_deterministic():
    pairs, classes_of = make_pairs(200, rare_every=10)
    rows = split_pairs(pairs, [], (0.7, 0.1, 0.2), seed=3, classes_of=classes_of)
    assert Counter(r["split"] for r in rows) == {"train": 140, "val": 20, "test": 40}
    assert [r["image"] for r in rows] == [p.image for p in pairs]  # input order kept
    again = split_pairs(list(reversed(pairs)), [], (0.7, 0.1, 0.2), seed=3, classes_of=classes_of)
    assert splits_of(again) == splits_of(rows)  # independent of input order
    other_seed = split_pairs(pairs, [], (0.7, 0.1, 0.2), seed=4, classes_of=classes_of)
    assert splits_of(other_seed) != splits_of(rows)


def test_rare_class_images_are_spread_proportionally():
    pairs, classes_of = make_pairs(300, rare_every=15)  # 20 rare images
    rows = split_pairs(pairs, [], seed=0, classes_of=classes_of)
    rare = Counter(r["split"] for r in rows if RARE_CLASS in classes_of[r["image"].name])
    assert rare == {"train": 14, "val": 2, "test": 4}


@pytest.mark.parametrize("seed", range(5))
def test_three_rare_images_reach_every_split(seed):
    pairs, classes_of = make_pairs(60, rare_every=20)  # rare: img000, img020, img040
    rows = split_pairs(pairs, [], seed=seed, classes_of=classes_of)
    assert {r["split"] for r in rows if RARE_CLASS in classes_of[r["image"].name]} == set(SPLITS)


def test_duplicate_groups_never_straddle_splits():
    pairs, classes_of = make_pairs(40, rare_every=4)
    groups = [["img000.jpg", "img001.jpg", "img002.jpg", "img003.jpg"], ["img010.jpg", "img011.jpg"],
              ["img020.jpg", "excluded_copy.jpg"]]  # names absent from the pairs are ignored
    for seed in range(10):
        split_of = splits_of(split_pairs(pairs, groups, seed=seed, classes_of=classes_of))
        for group in groups:
            assert len({split_of[name] for name in group if name in split_of}) == 1


@pytest.mark.parametrize("n, expected", [(1, {"train": 1}), (2, {"train": 1, "test": 1}),
                                         (3, {"train": 1, "val": 1, "test": 1}),
                                         (4, {"train": 2, "val": 1, "test": 1}),
                                         (10, {"train": 7, "val": 1, "test": 2})])
def test_tiny_datasets_give_each_split_an_image_when_possible(n, expected):
    pairs, classes_of = make_pairs(n, rare_every=3)
    rows = split_pairs(pairs, [], seed=1, classes_of=classes_of)
    assert Counter(r["split"] for r in rows) == expected


def test_big_group_cannot_empty_other_splits_when_avoidable():
    pairs, classes_of = make_pairs(5)
    rows = split_pairs(pairs, [["img000.jpg", "img001.jpg", "img002.jpg"]], seed=0, classes_of=classes_of)
    counts = Counter(r["split"] for r in rows)
    assert set(counts) == set(SPLITS) and sorted(counts.values()) == [1, 1, 3]


def test_zero_fraction_leaves_split_empty_and_bad_fractions_fail():
    pairs, classes_of = make_pairs(10)
    rows = split_pairs(pairs, [], (0.8, 0, 0.2), seed=0, classes_of=classes_of)
    assert Counter(r["split"] for r in rows) == {"train": 8, "test": 2}
    with pytest.raises(SplitError):
        split_pairs(pairs, [], (0.5, -0.1, 0.6), classes_of=classes_of)
    with pytest.raises(SplitError):
        split_pairs(pairs, [], (1.0, 0.0), classes_of=classes_of)


def test_classes_are_read_from_annotations_when_not_given(tmp_path):
    pairs = []
    for k in range(6):
        name = RARE_CLASS if k < 3 else "with_mask"
        (tmp_path / f"a{k}.xml").write_text(
            f"<annotation><size><width>50</width><height>50</height></size><object><name>{name}</name>"
            "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>20</xmax><ymax>20</ymax></bndbox></object></annotation>")
        pairs.append(Pair(tmp_path / f"a{k}.jpg", tmp_path / f"a{k}.xml"))
    rows = split_pairs(pairs, [], seed=0)
    assert {r["split"] for r in rows[:3]} == set(SPLITS)


def test_cli_writes_split_csv_and_run_record(tmp_path, root):
    annotations = tmp_path / "annotations_clean"
    annotations.mkdir()
    rows = []
    for k in range(20):
        name = RARE_CLASS if k % 5 == 0 else "without_mask"
        (annotations / f"p{k}.xml").write_text(
            f"<annotation><size><width>50</width><height>50</height></size><object><name>{name}</name>"
            "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>20</xmax><ymax>20</ymax></bndbox></object></annotation>")
        rows.append({"image": f"/data/images/p{k}.jpg", "annotation": f"annotations_clean/p{k}.xml"})
    write_pairs_csv(tmp_path / "clean_manifest.csv", rows)
    (tmp_path / "validation_report.json").write_text(json.dumps({"duplicate_groups": [["p1.jpg", "p2.jpg"]]}))
    out = tmp_path / "runs" / "split.csv"
    command = [sys.executable, str(root / "bin" / "split_data.py"), "--manifest", str(tmp_path / "clean_manifest.csv"),
               "--report", str(tmp_path / "validation_report.json"), "--output", str(out), "--seed", "7"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"images_with_{RARE_CLASS}=" in proc.stdout
    with open(out, newline="") as handle:
        written = list(csv.DictReader(handle))
    assert Counter(r["split"] for r in written) == {"train": 14, "val": 2, "test": 4}
    by_image = {r["image"]: r for r in written}
    assert by_image["p1.jpg"]["split"] == by_image["p2.jpg"]["split"]  # absent images are named only
    assert Path(by_image["p1.jpg"]["annotation"]) == annotations / "p1.xml"  # resolved, usable from anywhere
    assert json.loads(out.with_name("split_run.json").read_text())["job"] == "split_data"
    again = out.with_name("again.csv")
    subprocess.run(command[:-4] + ["--output", str(again), "--seed", "7"], check=True, capture_output=True)
    assert again.read_text() == out.read_text()


def test_cli_fails_with_one_line_on_missing_manifest(tmp_path, root):
    proc = subprocess.run([sys.executable, str(root / "bin" / "split_data.py"), "--manifest",
                           str(tmp_path / "nope.csv"), "--output", str(tmp_path / "s.csv")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "nope.csv" in proc.stderr and "Traceback" not in proc.stderr
