"""utils.data.augment and bin/augment.py: counts, box validity, flips, reproducibility, read-back, bad input."""

from __future__ import annotations

import csv
import json
import shutil
import tarfile

import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from helpers import load_script, run_script
from utils.data.augment import augment_copy, augment_set, build_transform, torch_threads
from utils.classes import CLASSES, RARE_CLASS
from utils.data.dataset import VocDetectionDataset
from utils.data.pairs import pack_folder, pair_folders
from utils.data.voc import VocAnnotation, VocObject, parse_voc, write_voc


def rare_stems(sample_dir):
    return {p.stem for p in (sample_dir / "annotations").glob("*.xml")
            if any(o.name == RARE_CLASS for o in parse_voc(p).objects)}


@pytest.fixture(scope="module")
def augmented(sample_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("aug") / "train"
    report = augment_set(sample_dir / "images", sample_dir / "annotations", copies=2, rare_factor=3, noise_std=6,
                         seed=5, output_dir=out, progress=False)
    return out, report


def test_the_originals_are_the_photos_themselves(sample_dir, augmented):
    """A k-fold's held-out fold is cut from these originals and evaluated: a second JPEG generation (quality 95)
    made its figures those of other pixels than predict reads (utils/data/preprocess.py write_photo)."""
    out, _ = augmented
    for photo in (sample_dir / "images").glob("*.jpg"):
        assert (out / f"train_{photo.name}").read_bytes() == photo.read_bytes(), photo.name


def test_counts_and_names(sample_dir, augmented):
    out, report = augmented
    rare = rare_stems(sample_dir)
    assert 0 < len(rare) < 24
    expected = 24 * (1 + 2) + 3 * len(rare)
    images = sorted(p.name for p in out.glob("*.jpg"))
    assert len(images) == expected == report["originals"] + report["copies"]
    assert report["rare_images"] == len(rare) and report["rare_extra_copies"] == 3 * len(rare)
    assert report["copies_without_boxes"] == []
    stems = {p.stem for p in (sample_dir / "images").glob("*.jpg")}
    assert {n for n in images if n.startswith("train_")} == {f"train_{s}.jpg" for s in stems}
    for k in (1, 2):
        assert {n for n in images if n.startswith(f"aug{k}_")} == {f"aug{k}_{s}.jpg" for s in stems}
    for k in (3, 4, 5):
        assert {n for n in images if n.startswith(f"aug{k}_")} == {f"aug{k}_{s}.jpg" for s in rare}
    assert (out.parent / "train.report.json").is_file()


def test_boxes_valid_and_read_back_by_dataset(sample_dir, augmented):
    out, _ = augmented
    pairs = pair_folders(out, out).pairs
    total_objects = 0
    for pair in pairs:
        ann = parse_voc(pair.annotation)
        with Image.open(pair.image) as img:
            assert img.mode == "RGB" and (ann.width, ann.height) == img.size
            assert max(img.size) == 160  # scale jitter returns to the original longest side
        assert ann.filename == pair.image.name
        assert ann.objects, pair.annotation.name
        for obj in ann.objects:
            assert obj.name in CLASSES
            assert 0 <= obj.xmin < obj.xmax <= ann.width and 0 <= obj.ymin < obj.ymax <= ann.height
            assert obj.xmax - obj.xmin >= 2 and obj.ymax - obj.ymin >= 2
        total_objects += len(ann.objects)
    dataset = VocDetectionDataset(pairs)
    loaded = 0
    for index in range(0, len(dataset), 7):
        image, target = dataset[index]
        assert image.dtype == torch.float32 and image.shape[0] == 3
        assert len(target["boxes"]) == len(target["labels"]) == len(parse_voc(pairs[index].annotation).objects)
        loaded += 1
    assert loaded > 10 and dataset.object_problems == {}


def test_copies_differ_from_originals(augmented):
    out, _ = augmented
    stem = sorted(p.stem.removeprefix("train_") for p in out.glob("train_*.jpg"))[0]
    original = Image.open(out / f"train_{stem}.jpg").convert("RGB")
    copy = Image.open(out / f"aug1_{stem}.jpg").convert("RGB")
    assert original.size != copy.size or original.tobytes() != copy.tobytes()


def test_flip_maps_box_to_its_mirror():
    image = Image.new("RGB", (100, 60), (50, 60, 70))
    ann = VocAnnotation("a.jpg", 100, 60, objects=[VocObject("with_mask", 10, 5, 30, 25),
                                                   VocObject(RARE_CLASS, 60, 20, 95, 58)])
    flip_only = build_transform(noise_std=0, flip_p=1.0, zoom_out_p=0, crop_p=0, colour_p=0)
    out, out_ann = augment_copy(image, ann, flip_only, seed=1)
    assert out.size == (100, 60)
    assert [(o.name, o.box) for o in out_ann.objects] == [("with_mask", (70, 5, 90, 25)), (RARE_CLASS, (5, 20, 40, 58))]
    # Pixels move with the box: a bright patch inside the first box ends up in the mirrored box.
    marked = image.copy()
    marked.paste((255, 255, 255), (12, 7, 28, 23))
    flipped, _ = augment_copy(marked, ann, flip_only, seed=1)
    assert flipped.getpixel((80, 15)) == (255, 255, 255) and flipped.getpixel((20, 15)) == (50, 60, 70)


def test_full_pipeline_keeps_boxes_sane_for_many_seeds():
    image = Image.new("RGB", (120, 90), (90, 90, 90))
    ann = VocAnnotation("a.jpg", 120, 90, objects=[VocObject("with_mask", 10, 10, 40, 45),
                                                   VocObject("without_mask", 70, 40, 110, 85)])
    transform = build_transform(noise_std=10)
    state = torch.get_rng_state()
    with torch_threads(1):
        for seed in range(40):
            out, out_ann = augment_copy(image, ann, transform, seed)
            assert max(out.size) == 120
            for obj in out_ann.objects:
                assert 0 <= obj.xmin < obj.xmax <= out.width and 0 <= obj.ymin < obj.ymax <= out.height
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is left alone


def test_reproducible_for_a_seed_and_tar_with_split(root, sample_dir, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    pairs = pair_folders(sample_dir / "images", sample_dir / "annotations").pairs[:6]
    for pair in pairs:
        shutil.copy(pair.image, flat)
        shutil.copy(pair.annotation, flat)
    pack_folder(flat, tmp_path / "set.tar")
    split_csv = tmp_path / "split.csv"
    with open(split_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "annotation", "split"])
        for index, pair in enumerate(pairs):
            writer.writerow([f"x/{pair.image.name}", f"y/{pair.annotation.name}", "train" if index < 4 else "val"])
    cli = load_script(root, "augment")

    def run(seed, name):
        args = cli.get_args_parser().parse_args(
            ["--images", str(tmp_path / "set.tar"), "--split-csv", str(split_csv), "--split", "train",
             "--copies", "2", "--rare-factor", "0", "--noise-std", "5", "--seed", str(seed),
             "--output-tar", str(tmp_path / name), "--no-progress"])
        assert cli.main(args) == 0
        with tarfile.open(tmp_path / name) as tar:
            return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}

    first, again, other = run(3, "a.tar"), run(3, "b.tar"), run(4, "c.tar")
    assert len(first) == 2 * 4 * 3
    assert first == again
    assert {k for k in first if k.startswith("aug")} == {k for k in other if k.startswith("aug")}
    assert any(first[k] != other[k] for k in first if k.startswith("aug") and k.endswith(".jpg"))
    assert all(first[k] == other[k] for k in first if k.startswith("train_"))


def test_bad_inputs_and_boxless_copies_are_reported(sample_dir, tmp_path, monkeypatch, root, capsys):
    src = tmp_path / "src"
    src.mkdir()
    pairs = pair_folders(sample_dir / "images", sample_dir / "annotations").pairs[:2]
    for pair in pairs:
        shutil.copy(pair.image, src)
        shutil.copy(pair.annotation, src)
    (src / "broken.jpg").write_bytes(pairs[0].image.read_bytes()[:200])
    shutil.copy(pairs[0].annotation, src / "broken.xml")
    write_voc(src / "orphan.xml", VocAnnotation("orphan.jpg", 10, 10))

    import utils.data.augment as augment_module

    def drop_every_box(image, target):
        keep = torch.zeros(len(target["labels"]), dtype=torch.bool)
        boxes = tv_tensors.wrap(target["boxes"][keep], like=target["boxes"])
        return image, {"boxes": boxes, "labels": target["labels"][keep]}

    monkeypatch.setattr(augment_module, "build_transform", lambda noise_std: drop_every_box)
    cli = load_script(root, "augment")
    args = cli.get_args_parser().parse_args(
        ["--images", str(src), "--copies", "1", "--rare-factor", "0", "--output-dir", str(tmp_path / "out"),
         "--report", str(tmp_path / "r.json"), "--no-progress"])
    assert cli.main(args) == 0
    printed = capsys.readouterr().err  # a line a skipped input or left-out copy
    report = json.loads((tmp_path / "r.json").read_text())
    assert {s["file"] for s in report["skipped"]} == {"broken.jpg", "orphan.xml"}
    assert "truncated" in next(s["problem"] for s in report["skipped"] if s["file"] == "broken.jpg")
    assert sorted(c["file"] for c in report["copies_without_boxes"]) == sorted(f"aug1_{p.stem}" for p in pairs)
    assert len(report["copies_redrawn"]) == 2 * 4  # every attempt but the last is logged
    assert report["originals"] == 2 and report["copies"] == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*.jpg")) == sorted(f"train_{p.stem}.jpg" for p in pairs)
    assert "broken.jpg" in printed and f"aug1_{pairs[0].stem}" in printed


def test_bad_arguments(sample_dir, tmp_path):
    with pytest.raises(ValueError, match="negative"):
        augment_set(sample_dir / "images", sample_dir / "annotations", copies=-1, output_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="noise"):
        augment_set(sample_dir / "images", sample_dir / "annotations", copies=1, noise_std=-2,
                    output_dir=tmp_path / "o")


def test_copies_0_after_copies_1_into_one_folder_leaves_no_old_copy(root, sample_dir, tmp_path):
    """The set replaces the output folder whole: the copies of a --copies 1 run do not linger after a --copies 0
    run into the same folder (its report says 0 copies, and a later train --images would have used them)."""
    out = tmp_path / "augd"
    argv = ["--images", sample_dir / "images", "--annotations", sample_dir / "annotations", "--rare-factor", "0",
            "--output-dir", out, "--no-progress"]
    assert run_script(root, "augment", [*argv, "--copies", "1"]) == 0
    assert len(list(out.glob("aug1_*"))) == 2 * 24
    assert run_script(root, "augment", [*argv, "--copies", "0"]) == 0
    report = json.loads((tmp_path / "augd.report.json").read_text())
    assert report["copies"] == 0 and report["originals"] == report["files_written"] // 2 == 24
    pairs = pair_folders(out, out).pairs
    assert len(pairs) == 24 and all(pair.stem.startswith("train_") for pair in pairs)
    assert sorted(p.name for p in out.iterdir()) == sorted([".set_files.json", *(
        path.name for pair in pairs for path in (pair.image, pair.annotation))])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["augd", "augd.report.json"]  # no hidden folder left
