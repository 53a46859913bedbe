"""utils.data.preprocess and bin/preprocess.py: photos kept or re-encoded, size cap, prefixes, tar, split, bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import load_script, run_script
from utils.data.pairs import pack_folder, pair_folders
from utils.data.preprocess import NothingProcessedError, preprocess_set
from utils.data.voc import VocAnnotation, VocObject, parse_voc, write_voc
from utils.errors import InputError


def flat_copy(sample_dir, dest, limit=None):
    """The sample as one flat folder (image and XML side by side), as jobs receive it."""
    dest.mkdir(parents=True, exist_ok=True)
    pairs = pair_folders(sample_dir / "images", sample_dir / "annotations").pairs[:limit]
    for pair in pairs:
        shutil.copy(pair.image, dest / pair.image.name)
        shutil.copy(pair.annotation, dest / pair.annotation.name)
    return dest


def write_pair(folder, stem, image: Image.Image, suffix, boxes=((10, 10, 30, 40),), name="with_mask", **save):
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / f"{stem}{suffix}", **save)
    write_voc(folder / f"{stem}.xml", VocAnnotation(f"{stem}{suffix}", image.width, image.height,
                                                    objects=[VocObject(name, *b) for b in boxes]))


def test_a_set_kept_at_its_own_size_is_written_without_importing_torch(sample_dir, tmp_path, root):
    """torch (about 4 s of each job's start) is imported only when --max-size shrinks a photo."""
    code = ("import runpy, sys\nsys.argv = sys.argv[1:]\n"  # the script's own argv, as python SCRIPT gives it
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as stop:\n    print('exit', stop.code, 'torch' in sys.modules)\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", code, str(root / "bin" / "preprocess.py"), "--images",
                           str(sample_dir / "images"), "--annotations", str(sample_dir / "annotations"),
                           "--output-dir", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=120, cwd=root)
    assert proc.stdout.splitlines()[-1] == "exit 0 False", proc.stdout + proc.stderr
    assert len(list(out.glob("*.xml"))) == 24


def test_max_size_scales_image_and_boxes(sample_dir, tmp_path):
    report = preprocess_set(sample_dir / "images", sample_dir / "annotations", "val_", output_dir=tmp_path / "out",
                            max_size=80, progress=False)
    assert report["images_processed"] == 24 and report["images_skipped"] == 0 and report["images_shrunk"] == 24
    for pair in pair_folders(sample_dir / "images", sample_dir / "annotations").pairs:
        out_image = tmp_path / "out" / f"val_{pair.stem}.png"  # shrunk: lossless PNG (--format source)
        with Image.open(out_image) as img:
            assert img.size == (80, 60)
        original, scaled = parse_voc(pair.annotation), parse_voc(tmp_path / "out" / f"val_{pair.stem}.xml")
        assert (scaled.width, scaled.height, scaled.filename) == (80, 60, out_image.name)
        assert [o.name for o in scaled.objects] == [o.name for o in original.objects]
        for a, b in zip(original.objects, scaled.objects):
            np.testing.assert_allclose(np.array(b.box), np.array(a.box) * 0.5, atol=0.011)


def test_no_cap_keeps_size_and_boxes_and_never_enlarges(sample_dir, tmp_path):
    preprocess_set(sample_dir / "images", sample_dir / "annotations", "test_", output_dir=tmp_path / "out",
                   max_size=1000, progress=False)
    pairs = pair_folders(tmp_path / "out", tmp_path / "out").pairs
    assert len(pairs) == 24 and all(p.image.name.startswith("test_") for p in pairs)
    for pair in pairs:
        original = parse_voc(sample_dir / "annotations" / f"{pair.stem.removeprefix('test_')}.xml")
        assert parse_voc(pair.annotation).objects == original.objects
        with Image.open(pair.image) as img:
            assert img.size == (160, 120)
    # The report goes next to the output folder, never inside it.
    assert (tmp_path / "out.report.json").is_file()
    # Inside it: the pairs, and (hidden from every reader) the list of them that the next run may replace.
    shown = [p for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")]
    assert sorted({p.suffix for p in shown}) == [".jpg", ".xml"]
    assert sorted(json.loads((tmp_path / "out" / ".set_files.json").read_text())["files"]) == sorted(
        p.name for p in shown)


def test_modes_become_rgb_jpeg(tmp_path):
    src = tmp_path / "src"
    rgba = Image.new("RGBA", (64, 48), (200, 10, 10, 128))
    write_pair(src, "rgba", rgba, ".png")
    deep = Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16))
    write_pair(src, "deep", deep, ".png")
    write_pair(src, "grey", Image.new("L", (64, 48), 90), ".jpg")
    palette = Image.new("P", (64, 48), 3)
    palette.putpalette([i % 256 for i in range(768)])
    write_pair(src, "palette", palette, ".png")
    write_pair(src, "bitmap", Image.new("RGB", (64, 48), (1, 2, 3)), ".bmp")
    report = preprocess_set(src, src, "val_", output_dir=tmp_path / "out", image_format="jpg", progress=False)
    assert report["images_processed"] == 5
    for stem in ("rgba", "deep", "grey", "palette", "bitmap"):
        with Image.open(tmp_path / "out" / f"val_{stem}.jpg") as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (64, 48))
        assert parse_voc(tmp_path / "out" / f"val_{stem}.xml").filename == f"val_{stem}.jpg"
    # Alpha is composited on white: half-transparent red becomes light red.
    r, g, b = Image.open(tmp_path / "out" / "val_rgba.jpg").getpixel((30, 20))
    assert r > 200 and 100 < g < 160


def test_png_format_option(sample_dir, tmp_path):
    preprocess_set(sample_dir / "images", sample_dir / "annotations", "val_", output_tar=tmp_path / "val.tar",
                   image_format="png", progress=False)
    with tarfile.open(tmp_path / "val.tar") as tar:
        names = tar.getnames()
    assert len(names) == 48 and sum(n.endswith(".png") for n in names) == 24
    with pytest.raises(ValueError, match="format"):
        preprocess_set(sample_dir / "images", sample_dir / "annotations", "val_", output_dir=tmp_path / "x",
                       image_format="gif")


def test_tar_in_tar_out_with_split_selection(root, sample_dir, tmp_path, capsys):
    flat = flat_copy(sample_dir, tmp_path / "flat")
    pack_folder(flat, tmp_path / "set.tar")
    pairs = pair_folders(flat, flat).pairs
    split_csv = tmp_path / "split.csv"
    with open(split_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "annotation", "split"])
        for index, pair in enumerate(pairs):
            # Paths as another machine wrote them: only the names must match.
            writer.writerow([f"/elsewhere/images/{pair.image.name}", f"/elsewhere/ann/{pair.annotation.name}",
                             ("train", "val", "test")[index % 3]])
    cli = load_script(root, "preprocess")
    args = cli.get_args_parser().parse_args(
        ["--images", str(tmp_path / "set.tar"), "--annotations", str(tmp_path / "set.tar"),
         "--split-csv", str(split_csv), "--split", "test", "--prefix", "test_", "--max-size", "100",
         "--output-tar", str(tmp_path / "out" / "test.tar"), "--no-progress"])
    assert cli.main(args) == 0
    assert "8 images written to" in (out := capsys.readouterr().out) and "(8 inputs, 0 skipped;" in out
    expected = sorted(f"test_{p.stem}{ext}" for p in pairs[2::3] for ext in (".png", ".xml"))  # shrunk: PNG
    with tarfile.open(tmp_path / "out" / "test.tar") as tar:
        assert sorted(tar.getnames()) == expected
    report = json.loads((tmp_path / "out" / "test.report.json").read_text())
    assert report["images_processed"] == 8 and report["run_record"]["params"]["split"] == "test"
    assert report["run_record"]["inputs_sha256"]


def test_bad_inputs_are_skipped_and_reported(sample_dir, tmp_path, root, capsys):
    src = flat_copy(sample_dir, tmp_path / "src", limit=3)
    good = sorted(p for p in src.glob("*.jpg"))[0]
    truncated = good.read_bytes()
    (src / "truncated.jpg").write_bytes(truncated[: len(truncated) // 3])
    shutil.copy(good.with_suffix(".xml"), src / "truncated.xml")
    (src / "text.png").write_text("not an image")
    shutil.copy(good.with_suffix(".xml"), src / "text.xml")
    shutil.copy(good, src / "badxml.jpg")
    (src / "badxml.xml").write_text("<annotation><size>")
    shutil.copy(good, src / "lonely.jpg")
    write_pair(src, "mixed", Image.new("RGB", (50, 40)), ".jpg",
               boxes=((1, 1, 20, 20), (30, 30, 90, 90), (5, 5, 5, 9), (2, 2, 51, 41)))
    cli = load_script(root, "preprocess")
    report_path = tmp_path / "reports" / "pp.json"
    args = cli.get_args_parser().parse_args(["--images", str(src), "--prefix", "val_", "--output-dir",
                                             str(tmp_path / "out"), "--report", str(report_path), "--no-progress"])
    assert cli.main(args) == 0
    err = capsys.readouterr().err  # each skipped file a line (the first SKIPPED_PRINTED), with its problem
    report = json.loads(report_path.read_text())
    skipped = {item["file"]: item["problem"] for item in report["skipped"]}
    assert set(skipped) == {"truncated.jpg", "text.png", "badxml.xml", "lonely.jpg"}
    assert "truncated" in skipped["truncated.jpg"] and "not an image" in skipped["text.png"]
    assert "not well-formed" in skipped["badxml.xml"] and "no annotation" in skipped["lonely.jpg"]
    assert all(f"skipped {name}: {problem}" in err for name, problem in skipped.items())
    assert report["images_processed"] == 4 and report["inputs"] == 8
    # The out-of-image and zero-area boxes are dropped, the 1 px overshoot clipped: all reported.
    mixed = parse_voc(tmp_path / "out" / "val_mixed.xml")
    assert [o.box for o in mixed.objects] == [(1, 1, 20, 20), (2, 2, 50, 40)]
    problems = [p["problem"] for p in report["object_problems"] if p["file"] == "mixed.xml"]
    assert len(problems) == 3 and any("clipped" in p for p in problems)


def test_nothing_usable_fails_with_one_line(tmp_path, root, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_text("nope")
    (src / "a.xml").write_text("<annotation/>")
    with pytest.raises(NothingProcessedError, match="no image could be processed"):
        preprocess_set(src, src, "val_", output_tar=tmp_path / "val.tar", progress=False)
    assert not (tmp_path / "val.tar").exists()
    assert json.loads((tmp_path / "val.report.json").read_text())["images_skipped"] == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_script(root, "preprocess", ["--images", empty, "--output-dir", tmp_path / "o", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"preprocess: error: {empty}: ") and len(err.strip().splitlines()) == 1
    assert run_script(root, "preprocess", ["--images", tmp_path / "missing", "--output-dir", tmp_path / "o"]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("file,split\na.jpg,val\n")
    assert run_script(root, "preprocess", ["--images", src, "--split-csv", bad_csv, "--split", "val",
                                           "--output-dir", tmp_path / "o"]) == 2
    assert "bad.csv: no 'image' column" in capsys.readouterr().err


@pytest.mark.parametrize("prefix", ["../escaped_", "sub/", "/abs_", "a\\b_", ".hidden_", "x..y_", "nul\0_"])
def test_a_prefix_that_is_not_a_plain_name_part_is_refused_in_one_line(root, sample_dir, tmp_path, capsys, prefix):
    """--prefix names files inside the output: a path part would write outside the folder (../) or make a tar
    that is not flat (sub/), a leading dot hides the files from every reader. Refused before any work."""
    out = tmp_path / "deep" / "out"
    for output in (["--output-dir", out], ["--output-tar", out.with_suffix(".tar")]):
        with pytest.raises(SystemExit) as stop:
            run_script(root, "preprocess", ["--images", sample_dir / "images", "--annotations",
                                            sample_dir / "annotations", "--prefix", prefix, *output, "--no-progress"])
        assert stop.value.code == 2
        lines = [line for line in capsys.readouterr().err.splitlines()
                 if line.strip() and not line.startswith(("usage:", " "))]
        assert len(lines) == 1 and "error: argument --prefix: expected a plain file-name part" in lines[0], lines
    assert not (tmp_path / "deep").exists() and sorted(p.name for p in tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="--prefix"):  # the library refuses it too
        preprocess_set(sample_dir / "images", sample_dir / "annotations", prefix, output_tar=tmp_path / "v.tar",
                       progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_plain_prefix_is_accepted(root, sample_dir, tmp_path):
    assert run_script(root, "preprocess", ["--images", sample_dir / "images", "--annotations",
                                           sample_dir / "annotations", "--prefix", "val-2024 a_", "--output-tar",
                                           tmp_path / "v.tar", "--no-progress"]) == 0
    with tarfile.open(tmp_path / "v.tar") as tar:
        names = tar.getnames()
    assert len(names) == 48 and all(n.startswith("val-2024 a_") and "/" not in n for n in names)


def snapshot(folder):
    return {p.name: p.read_bytes() if p.is_file() else "folder" for p in folder.iterdir()}


def test_a_rerun_replaces_the_set_whole_and_an_interrupted_one_leaves_the_old(sample_dir, tmp_path, monkeypatch):
    """--output-dir is written in a hidden folder beside it and swapped in when complete: while the job runs and
    after it fails the folder is the previous set, untouched; after it, exactly the new set (no file of the old
    one lingers for a later job to read)."""
    out = tmp_path / "out"
    preprocess_set(sample_dir / "images", sample_dir / "annotations", "val_", output_dir=out, progress=False)
    before = snapshot(out)
    assert len(before) == 2 * 24 + 1
    import utils.data.preprocess as module

    real_write_pair, calls = module.write_pair, []

    def write_then_stop(folder, stem, *args, **kwargs):
        calls.append(stem)
        assert snapshot(out) == before  # readers see the old set while the job runs
        if len(calls) == 5:
            raise KeyboardInterrupt  # as a stop mid-set
        return real_write_pair(folder, stem, *args, **kwargs)

    monkeypatch.setattr(module, "write_pair", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        preprocess_set(sample_dir / "images", sample_dir / "annotations", "test_", output_dir=out, progress=False)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.report.json"]  # no staging folder left
    monkeypatch.undo()
    previous = os.umask(0o022)  # the set folder gets the umask's mode, as a plain mkdir would give it
    try:
        report = preprocess_set(sample_dir / "images", sample_dir / "annotations", "test_", output_dir=out,
                                max_size=100, progress=False)
    finally:
        os.umask(previous)
    after = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert len(after) == 48 == report["files_written"] and all(name.startswith("test_") for name in after)
    assert (out.stat().st_mode & 0o777) == 0o755 and sorted(p.name for p in tmp_path.iterdir()) == [
        "out", "out.report.json"]


def test_an_output_folder_holding_other_files_is_refused_in_one_line(root, sample_dir, tmp_path, capsys):
    """The new set replaces the folder whole, so a folder holding anything no earlier set run wrote there (the
    owner's files, the inputs) is refused before any work, naming the folder and a file, and left as it is."""
    src = flat_copy(sample_dir, tmp_path / "src", limit=2)
    inputs = ["--images", sample_dir / "images", "--annotations", sample_dir / "annotations", "--no-progress"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    used = tmp_path / "used"
    assert run_script(root, "preprocess", [*inputs, "--output-dir", used]) == 0
    (used / "added.jpg").write_bytes(b"not the set's")
    (used / "sub").mkdir()
    (tmp_path / "file").write_text("x")
    cases = [("preprocess", [*inputs, "--output-dir", mine], f"{mine}: holds 'notes.txt', which no earlier"),
             ("augment", [*inputs, "--output-dir", mine], f"{mine}: holds 'notes.txt', which no earlier"),
             ("preprocess", [*inputs, "--output-dir", used], f"{used}: holds 'added.jpg' (and 1 more)"),
             ("augment", ["--images", src, "--output-dir", src], f"{src}: the output folder is also an input"),
             ("preprocess", [*inputs, "--output-dir", tmp_path / "file"], "the output folder is not a folder")]
    for job, argv, words in cases:
        kept = {folder: snapshot(folder) for folder in (mine, used, src)}
        assert run_script(root, job, argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"{job}: error: ") and words in err and len(err.strip().splitlines()) == 1, err
        assert {folder: snapshot(folder) for folder in (mine, used, src)} == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine", "src", "used", "used.report.json"]
    (mine / "notes.txt").unlink()  # an empty folder is taken
    assert run_script(root, "augment", [*inputs, "--copies", "0", "--rare-factor", "0", "--output-dir", mine]) == 0
    assert len(pair_folders(mine, mine).pairs) == 24


def test_replace_folder_puts_the_old_folder_back_when_the_new_one_cannot_go_in(tmp_path, monkeypatch):
    from utils import atomic

    target, staged = tmp_path / "set", tmp_path / ".set.new"
    for folder, name in ((target, "old.xml"), (staged, "new.xml")):
        folder.mkdir()
        (folder / name).write_text(name)
    real_replace = os.replace

    def refuse_the_new_one(source, destination):
        if Path(source) == staged:
            raise PermissionError(13, "Permission denied", str(destination))
        real_replace(source, destination)

    monkeypatch.setattr(atomic.os, "replace", refuse_the_new_one)
    with pytest.raises(PermissionError):
        atomic.replace_folder(staged, target)
    assert [p.name for p in target.iterdir()] == ["old.xml"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".set.new", "set"]  # no .set.old.* folder left
    monkeypatch.undo()
    atomic.replace_folder(staged, target)
    assert [p.name for p in target.iterdir()] == ["new.xml"] and sorted(p.name for p in tmp_path.iterdir()) == ["set"]


@pytest.mark.parametrize("job", ["preprocess", "augment"])
def test_unreadable_names_links_and_subfolders_are_skipped_and_listed(root, sample_dir, tmp_path, capsys, job):
    # A name that is not UTF-8 stopped the job with a traceback (it cannot be written into an XML file or the
    # report); a link to nothing and a subfolder of photos were passed over without a word.
    src = flat_copy(sample_dir, tmp_path / "src", limit=2)
    good = sorted(src.glob("*.jpg"))[0]
    shutil.copy(good, os.fsencode(src) + b"/caf\xe9.jpg")
    shutil.copy(good.with_suffix(".xml"), os.fsencode(src) + b"/caf\xe9.xml")
    os.symlink("loop_b.jpg", src / "loop_a.jpg")
    os.symlink("loop_a.jpg", src / "loop_b.jpg")
    (src / "site-b").mkdir()
    shutil.copy(good, src / "site-b" / "x.jpg")
    cli = load_script(root, job)
    report_path = tmp_path / "report.json"
    args = cli.get_args_parser().parse_args(["--images", str(src), "--output-dir", str(tmp_path / "out"),
                                             "--report", str(report_path), "--no-progress"])
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    skipped = {item["file"]: item["problem"] for item in json.loads(report_path.read_text())["skipped"]}
    assert set(skipped) == {"caf\\xe9.jpg", "caf\\xe9.xml", "loop_a.jpg", "loop_b.jpg", "site-b/"}
    assert "not valid UTF-8" in skipped["caf\\xe9.jpg"] and "link to nothing" in skipped["loop_a.jpg"]
    assert "subfolder" in skipped["site-b/"]
    assert all(f"skipped {name}: {problem}" in err for name, problem in skipped.items())


# Runs a job script with every image's load slowed down, so that a SIGTERM lands in the middle of the set.
SLOW_JOB = """
import runpy, sys, time
import utils.data.preprocess as preprocess, utils.data.augment as augment
real = preprocess.load_pair
def slow(*args, **kwargs):
    time.sleep(0.3)
    return real(*args, **kwargs)
preprocess.load_pair = augment.load_pair = slow
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow  # about 6 s each: a job process of its own, slowed so that the SIGTERM lands mid-set
@pytest.mark.parametrize("job,output", [("preprocess", "--output-dir"), ("augment", "--output-tar")])
def test_a_sigterm_mid_set_exits_143_removes_the_partial_set_and_a_rerun_writes_it(root, sample_dir, tmp_path, job,
                                                                                    output, restore_signals):
    # A SIGTERM (a pool's eviction, pegasus-kickstart's checkpoint time, the local executor's stop) killed the job
    # outright: no line said so, and the hidden staging folder, a partial copy of the set, stayed beside the output.
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / ("set" if output == "--output-dir" else "set.tar")
    command = [sys.executable, "-c", SLOW_JOB, str(root / "bin" / f"{job}.py"), "--images",
               str(sample_dir / "images"), "--annotations", str(sample_dir / "annotations"), output, str(out),
               "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not any(any(folder.iterdir()) for folder in tmp_path.glob(".set*") if folder.is_dir()):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the job wrote nothing"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert stderr.count("\n") == 1 and f"{job}: stopped: SIGTERM received" in stderr, stderr
    assert ("stand-ins for the outputs not written yet: set.tar" in stderr) == (output == "--output-tar")
    from utils.stop import is_stand_in

    left = os.listdir(tmp_path)  # --output-tar: a stand-in, so that a pool retries at once instead of holding the job
    assert left == ([] if output == "--output-dir" else ["set.tar"]), "the partial set or a staging folder is left"
    assert all(is_stand_in(tmp_path / name) for name in left)
    from helpers import run_script

    # the rerun in-process (as its __main__ runs it): a process of its own added only the seconds of importing torch
    assert run_script(root, job, command[4:]) == 0
    assert out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_preprocess_turns_boxes_drawn_on_the_stored_pixels_of_an_exif_turned_image(tmp_path):
    # The XML of an EXIF-ignoring tool: the stored size (160x90) and a box on the stored pixels.
    from helpers import write_exif_turned_pair

    src = tmp_path / "src"
    write_exif_turned_pair(src, src)
    report = preprocess_set(src, src, "", output_dir=tmp_path / "out", progress=False)
    ann = parse_voc(tmp_path / "out" / "turned.xml")
    assert (ann.width, ann.height) == (90, 160) and [o.box for o in ann.objects] == [(50, 100, 80, 150)]
    assert [p["problem"] for p in report["object_problems"]] == [
        "<size> 160x90 is the stored size of an image its EXIF orientation 6 turns to 90x160: the boxes were drawn "
        "on the stored pixels and are turned with them"]
    # kept as it is (--format source), its EXIF orientation with it: read as every reader reads the sets
    from utils.data.images import load_rgb

    assert np.asarray(load_rgb(tmp_path / "out" / "turned.jpg"))[110, 60, 0] > 200  # red under the box


def test_the_default_set_holds_the_photos_pixels_kept_as_they_are_where_it_can(tmp_path):
    """--format source: the val and test sets must decode to the pixels predict reads from the photos (the
    working size, threshold and rates are chosen on them). A second JPEG generation moved the 60-minute model's
    test figures (pacc2 error -4.9 against -3.7 points). A JPEG or PNG is copied byte for byte, a turned one
    with its EXIF orientation; any other photo is written as lossless PNG, whatever its mode."""
    from helpers import write_exif_turned_pair

    from utils.data.images import load_rgb

    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    write_pair(src, "photo", noisy, ".jpg")
    write_pair(src, "screen", Image.new("RGBA", (64, 48), (200, 10, 10, 128)), ".png")
    write_pair(src, "scan", noisy, ".tif")
    write_pair(src, "grey", Image.fromarray(rng.integers(0, 256, (48, 64), dtype=np.uint8)), ".bmp")
    write_exif_turned_pair(src, src)
    report = preprocess_set(src, src, "test_", output_dir=tmp_path / "out", progress=False)
    assert report["images_processed"] == 5 and report["run_record"]["params"]["format"] == "source"
    assert report["images_shrunk"] == 0
    kept = {"photo": ".jpg", "screen": ".png", "scan": ".png", "grey": ".png", "turned": ".jpg"}
    for stem, suffix in kept.items():
        original = next(src.glob(f"{stem}.*[!l]"))  # the image, not its .xml
        written = tmp_path / "out" / f"test_{stem}{suffix}"
        assert parse_voc(tmp_path / "out" / f"test_{stem}.xml").filename == written.name
        assert np.array_equal(np.asarray(load_rgb(written)), np.asarray(load_rgb(original))), stem
        assert (written.read_bytes() == original.read_bytes()) == (stem in ("photo", "screen", "turned")), stem


def test_a_camera_jpeg_with_a_multi_picture_preview_is_kept_as_it_is(tmp_path):
    """Many camera and phone JPEGs carry an MPF preview (APP2), which Pillow opens as format "MPO": such a photo is
    a JPEG and must be copied byte for byte as one, not re-encoded as a PNG several times its size (~3 s of zlib
    for a 12 MP photo, against the data jobs' 0.1 s an image)."""
    from utils.data.images import load_rgb

    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    write_pair(src, "camera", photo, ".jpg", format="MPO", save_all=True, append_images=[photo.resize((32, 24))])
    with Image.open(src / "camera.jpg") as img:
        assert img.format == "MPO"  # the case this test is about
    report = preprocess_set(src, src, "test_", output_dir=tmp_path / "out", progress=False)
    assert report["images_processed"] == 1
    written = tmp_path / "out" / "test_camera.jpg"
    assert written.read_bytes() == (src / "camera.jpg").read_bytes()
    assert np.array_equal(np.asarray(load_rgb(written)), np.asarray(load_rgb(src / "camera.jpg")))


def test_an_annotation_without_size_is_processed_at_the_images_size_and_said(tmp_path):
    # It was skipped ("missing required field <size>"); validation takes the image's size for it (size_missing).
    from utils.data.pairs import Pair
    from utils.data.preprocess import JobLog, load_pair

    Image.new("RGB", (64, 48), (90, 120, 200)).save(tmp_path / "a.jpg")
    (tmp_path / "a.xml").write_text("<annotation><object><name>with_mask</name><bndbox><xmin>4</xmin><ymin>4</ymin>"
                                    "<xmax>30</xmax><ymax>30</ymax></bndbox></object></annotation>")
    log = JobLog()
    loaded = load_pair(Pair(tmp_path / "a.jpg", tmp_path / "a.xml"), log)
    assert (loaded.annotation.width, loaded.annotation.height) == (64, 48) and len(loaded.annotation.objects) == 1
    assert log.skipped == [] and log.object_problems == [
        {"file": "a.xml", "problem": "no <size> in the XML; boxes checked against the image"}]
