"""The synthetic sample generator and bin/make_sample_data.py."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from helpers import load_script, run_script
from utils.classes import CLASSES
from utils.data.dataset import VocDetectionDataset
from utils.data.pairs import pair_folders
from utils.data.sample_data import make_sample_dataset, render_sample
from utils.data.voc import parse_voc


def file_bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_files_and_prefix_stable(tmp_path):
    make_sample_dataset(tmp_path / "a", num_images=4, seed=3, image_size=(96, 72))
    make_sample_dataset(tmp_path / "b", num_images=4, seed=3, image_size=(96, 72))
    make_sample_dataset(tmp_path / "c", num_images=2, seed=3, image_size=(96, 72))
    make_sample_dataset(tmp_path / "d", num_images=4, seed=4, image_size=(96, 72))
    a, b, c, d = (file_bytes(tmp_path / x) for x in "abcd")
    assert a == b
    assert len(a) == 8
    # The first images do not depend on how many are made.
    assert all(a[name] == data for name, data in c.items())
    assert a != d


def test_layout_and_annotations_are_valid(sample_dir):
    pairing = pair_folders(sample_dir / "images", sample_dir / "annotations")
    assert len(pairing.pairs) == 24
    assert not pairing.images_without_annotation and not pairing.annotations_without_image
    counts = Counter()
    for pair in pairing.pairs:
        assert pair.image.suffix == ".jpg"
        with Image.open(pair.image) as img:
            assert img.mode == "RGB" and img.size == (160, 120)
        ann = parse_voc(pair.annotation)
        assert (ann.width, ann.height, ann.depth) == (160, 120, 3)
        assert ann.filename == pair.image.name
        assert ann.folder == "images"
        assert 1 <= len(ann.objects) <= 6
        for obj in ann.objects:
            assert obj.name in CLASSES
            assert 0 <= obj.xmin < obj.xmax <= 160 and 0 <= obj.ymin < obj.ymax <= 120
            # Faces scale with the image: about 7-40 px tall here, plus ears, hair and tilt.
            assert 6 <= obj.ymax - obj.ymin <= 60
        counts.update(o.name for o in ann.objects)
    assert set(counts) == set(CLASSES), counts


def test_class_mix_and_face_sizes_over_many_images():
    rng_seeds = range(40)
    counts, heights, per_image = Counter(), [], []
    for index in rng_seeds:
        image, objects = render_sample(np.random.default_rng([11, index]), (256, 192))
        assert image.size == (256, 192)
        per_image.append(len(objects))
        counts.update(o.name for o in objects)
        heights += [o.ymax - o.ymin for o in objects]
    total = sum(counts.values())
    # Expected 45/35/20; the bounds catch a broken mix, not sampling noise (about 145 faces).
    assert 0.35 < counts["with_mask"] / total < 0.6
    assert 0.22 < counts["without_mask"] / total < 0.45
    assert 0.1 < counts["mask_weared_incorrect"] / total < 0.3
    assert min(per_image) >= 1 and max(per_image) <= 6 and len(set(per_image)) >= 4
    assert min(heights) < 20 and max(heights) > 50  # varied scales: faces 12-64 px tall at this size


def test_boxes_overlap_only_slightly():
    for index in range(30):
        _, objects = render_sample(np.random.default_rng([5, index]), (200, 150))
        for i, a in enumerate(objects):
            for b in objects[i + 1:]:
                ix = max(0.0, min(a.xmax, b.xmax) - max(a.xmin, b.xmin))
                iy = max(0.0, min(a.ymax, b.ymax) - max(a.ymin, b.ymin))
                assert ix * iy <= 0.15 * min(a.area, b.area) + 1e-6


def test_mask_classes_differ_in_what_is_covered():
    """The same face drawn per class differs only where the mask is: more of it for with_mask."""
    from utils.data.sample_data import _face_patch

    def covered_fraction(label, index):
        masked = _face_patch(np.random.default_rng([1, index]), 60, label)
        bare = _face_patch(np.random.default_rng([1, index]), 60, "without_mask")
        alpha = np.asarray(bare.getchannel("A")) > 128
        changed = np.abs(np.asarray(masked.convert("RGB"), float) - np.asarray(bare.convert("RGB"), float))
        return float((changed.sum(axis=2) > 30)[alpha].mean())

    for index in range(8):
        assert covered_fraction("without_mask", index) == 0.0
        with_mask, incorrect = covered_fraction("with_mask", index), covered_fraction("mask_weared_incorrect", index)
        assert with_mask > incorrect > 0.05, (index, with_mask, incorrect)


def test_dataset_reads_the_sample(sample_dir):
    pairs = pair_folders(sample_dir / "images", sample_dir / "annotations").pairs
    dataset = VocDetectionDataset(pairs)
    image, target = dataset[0]
    assert image.shape == (3, 120, 160)
    assert len(target["boxes"]) == len(parse_voc(pairs[0].annotation).objects) >= 1
    assert dataset.object_problems == {}


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_images"):
        make_sample_dataset("unused", num_images=0, seed=0)
    with pytest.raises(ValueError, match="too small"):
        make_sample_dataset("unused", num_images=1, seed=0, image_size=(10, 10))
    with pytest.raises(ValueError, match="min_faces"):
        make_sample_dataset("unused", num_images=1, seed=0, min_faces=3, max_faces=2)


def test_cli_writes_and_replaces_atomically(root, tmp_path, capsys):
    cli = load_script(root, "make_sample_data")
    out = tmp_path / "sample"
    assert cli.main(cli.get_args_parser().parse_args(
        ["--out", str(out), "--num-images", "5", "--seed", "1", "--image-size", "96", "72"])) == 0
    assert "wrote 5 images" in capsys.readouterr().out
    assert len(list((out / "images").glob("*.jpg"))) == 5
    assert len(list((out / "annotations").glob("*.xml"))) == 5
    record = json.loads((out / "run_record.json").read_text())
    assert record["job"] == "make_sample_data" and record["params"]["seed"] == 1
    # A second, smaller run leaves exactly its own files (no stale images from the first).
    assert cli.main(cli.get_args_parser().parse_args(
        ["--out", str(out), "--num-images", "3", "--seed", "1", "--image-size", "96", "72"])) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"sample_{i:04d}.jpg" for i in range(3)]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert run_script(root, "make_sample_data", ["--out", out, "--num-images", "0"]) == 2
    assert "make_sample_data: error: num_images must be at least 1" in capsys.readouterr().err
