"""Shards (bin/make_shards.py) and fanned-out prediction: N shards merged equal one predict job."""

from __future__ import annotations

import csv
import json
import tarfile

import pytest

from helpers import run_script
from utils.data.shards import read_index, read_index_csv


def make_photo_folder(sample_dir, folder, count):
    folder.mkdir()
    images = sorted((sample_dir / "images").glob("*.jpg"))[:count]
    for image in images:
        (folder / image.name).write_bytes(image.read_bytes())
    return images


def test_make_shards_packs_images_with_their_xml_in_webdataset_order(root, sample_dir, tmp_path, capsys):
    out = tmp_path / "shards"
    (tmp_path / "extra").mkdir()
    images = make_photo_folder(sample_dir, tmp_path / "photos", 7)
    (tmp_path / "photos" / "readme.txt").write_text("not an image")
    rc = run_script(root, "make_shards", ["--images", tmp_path / "photos", "--annotations", sample_dir / "annotations",
                                          "--output", out, "--shard-size", "3"])
    assert rc == 0
    assert "7 images (7 with XML) in 3 shards" in capsys.readouterr().out
    index = read_index(out)
    assert [shard.name for shard in index.shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [shard.images for shard in index.shards] == [3, 3, 1] and index.num_images == 7
    data = json.loads((out / "index.json").read_text())
    reasons = {entry["file"].rsplit("/", 1)[-1]: entry["reason"] for entry in data["skipped"]}
    orphans = {f"{path.stem}.xml" for path in sorted((sample_dir / "images").glob("*.jpg"))[7:]}
    assert set(reasons) == {"readme.txt", *orphans}  # the XML files of images not packed are listed too
    assert all(reasons[name] == "annotation without image" for name in orphans)
    with tarfile.open(out / "shard-000000.tar") as tar:
        members = tar.getnames()
    # WebDataset layout: flat <key>.<ext> members, each image followed by its XML
    expected = [name for image in images[:3] for name in (image.name, f"{image.stem}.xml")]
    assert members == expected
    rows = read_index_csv(out)
    assert [row["name"] for row in rows] == [image.name for image in images]
    assert rows[0]["shard"] == "shard-000000.tar" and rows[6]["shard"] == "shard-000002.tar"
    assert rows[0]["annotation"] == f"{images[0].stem}.xml" and len(rows[0]["sha256"]) == 64

    assert run_script(root, "make_shards", ["--output", out, "--verify"]) == 0
    with open(out / "shard-000001.tar", "r+b") as handle:  # flip a byte inside a member
        handle.seek(1024)
        byte = handle.read(1)
        handle.seek(1024)
        handle.write(bytes([byte[0] ^ 0xFF]))
    assert run_script(root, "make_shards", ["--output", out, "--verify"]) == 2
    assert "shard-000001.tar" in capsys.readouterr().err


def test_make_shards_rejects_a_missing_folder_in_one_line(root, tmp_path, capsys):
    assert run_script(root, "make_shards", ["--images", tmp_path / "nope", "--output", tmp_path / "out"]) == 2
    err = capsys.readouterr().err
    assert "nope: folder not found" in err and "Traceback" not in err


def make_site_folder(sample_dir, folder):
    """*folder* with images in subfolders (the same file name in two of them), a link to a folder outside,
    a link to nothing, a link back to itself and a name that is not UTF-8; returns the images it holds."""
    images = sorted((sample_dir / "images").glob("*.jpg"))
    layout = {"photos/top.jpg": images[0], "photos/siteA/img.jpg": images[1], "photos/siteB/img.jpg": images[2],
              "photos/siteB/cam1/img.jpg": images[3], "outside/img.jpg": images[4]}
    for name, image in layout.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(image.read_bytes())
    photos = folder / "photos"
    (photos / "siteC").symlink_to(folder / "outside")  # a linked folder is followed
    (photos / "dangling.jpg").symlink_to(folder / "nowhere.jpg")
    (photos / "siteA" / "loop").symlink_to(photos)
    with open(bytes(photos / "siteA") + b"/caf\xe9.jpg", "wb") as handle:  # Latin-1 bytes: not UTF-8
        handle.write(images[5].read_bytes())
    return photos


def test_make_shards_writes_index_csv_a_shard_at_a_time(tmp_path):
    # Every image's index row was kept until the last shard was done and index.csv then rendered as one string:
    # ~450 bytes an image held at the end (450 MB for the million images the shards are made for).
    import tracemalloc

    from utils.data.shards import collect_images, write_shards

    peaks = {}
    for n in (500, 2000):
        src = tmp_path / f"src{n}"
        src.mkdir()
        for k in range(n):
            (src / f"photo_{k:05d}.jpg").write_bytes(b"\xff\xd8 a stand-in")
            (src / f"photo_{k:05d}.xml").write_text("<annotation/>")
        items, skipped = collect_images(src, src)
        tracemalloc.start()
        # one packing thread: with two, the peak caught a varying number of shards in flight (22-682 B an image)
        write_shards(items, tmp_path / f"out{n}", 100, workers=1, skipped=skipped)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        rows = read_index_csv(tmp_path / f"out{n}")
        assert [row["name"] for row in rows] == [f"photo_{k:05d}.jpg" for k in range(n)]
        assert rows[-1]["shard"] == f"shard-{n // 100 - 1:06d}.tar"
        assert rows[-1]["annotation"] == f"photo_{n - 1:05d}.xml"
    per_image = (peaks[2000] - peaks[500]) / 1500
    assert per_image < 150, f"{per_image:.0f} bytes an image"  # the old code: ~310 (15 now)


def test_make_shards_keeps_subfolders_follows_links_and_lists_what_it_leaves_out(root, sample_dir, tmp_path, capsys):
    photos = make_site_folder(sample_dir, tmp_path)
    out = tmp_path / "shards"
    assert run_script(root, "make_shards", ["--images", photos, "--output", out, "--shard-size", "2"]) == 0
    assert "5 images (0 with XML) in 3 shards" in capsys.readouterr().out
    members = [name for shard in sorted(out.glob("shard-*.tar")) for name in tarfile.open(shard).getnames()]
    assert members == ["siteA/img.jpg", "siteB/cam1/img.jpg", "siteB/img.jpg", "siteC/img.jpg", "top.jpg"]
    assert [row["name"] for row in read_index_csv(out)] == members
    data = json.loads((out / "index.json").read_text())
    assert set(data) >= {"format", "shard_size", "num_shards", "num_images", "num_annotations", "bytes",
                         "skipped", "shards", "source", "source_signature"}  # the fields the generator reads
    reasons = {entry["file"]: entry["reason"] for entry in data["skipped"]}
    assert set(reasons) == {f"{photos}/dangling.jpg", f"{photos}/siteA/loop", f"{photos}/siteA/caf\\xe9.jpg"}
    assert "link to nothing" in reasons[f"{photos}/dangling.jpg"]
    assert "a loop" in reasons[f"{photos}/siteA/loop"]
    assert reasons[f"{photos}/siteA/caf\\xe9.jpg"] == "the name is not valid UTF-8"
    assert read_index(out).num_images == 5


def test_make_shards_pairs_xml_by_path_and_never_guesses(root, sample_dir, tmp_path):
    images, annotations = tmp_path / "images", tmp_path / "annotations"
    (images / "site").mkdir(parents=True)
    (annotations / "site").mkdir(parents=True)
    sample = sorted((sample_dir / "images").glob("*.jpg"))
    for name, source in (("a.jpg", 0), ("a.png", 1), ("b.jpg", 2), ("site/b.jpg", 3)):
        (images / name).write_bytes(sample[source].read_bytes())
    for name in ("a.xml", "site/b.xml", "z.xml"):
        (annotations / name).write_text("<annotation/>")
    assert run_script(root, "make_shards", ["--images", images, "--annotations", annotations,
                                            "--output", tmp_path / "out"]) == 0
    rows = {row["name"]: row["annotation"] for row in read_index_csv(tmp_path / "out")}
    assert rows == {"b.jpg": "", "site/b.jpg": "site/b.xml"}  # an XML pairs with the image at its own path
    reasons = {entry["file"].removeprefix(f"{tmp_path}/"): entry["reason"]
               for entry in json.loads((tmp_path / "out" / "index.json").read_text())["skipped"]}
    assert set(reasons) == {"images/a.jpg", "images/a.png", "annotations/a.xml", "annotations/z.xml"}
    assert "which one it describes is unknown" in reasons["images/a.png"]
    assert reasons["annotations/z.xml"] == "annotation without image"
    # without XML to pair, the first image of a key is packed and the second listed
    assert run_script(root, "make_shards", ["--images", images, "--output", tmp_path / "flat"]) == 0
    assert [row["name"] for row in read_index_csv(tmp_path / "flat")] == ["a.jpg", "b.jpg", "site/b.jpg"]


def test_make_shards_names_the_folder_in_its_errors(root, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    assert run_script(root, "make_shards", ["--images", tmp_path / "empty", "--output", tmp_path / "out"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'empty'}: no images to pack into shards" in err and "Traceback" not in err
    assert run_script(root, "make_shards", ["--images", tmp_path / "empty" / "notes.txt",
                                            "--output", tmp_path / "out"]) == 2
    assert "notes.txt: not a folder" in capsys.readouterr().err


def test_predict_on_shards_gives_the_figures_per_folder_of_the_folder(root, sample_dir, tiny_model_file, tmp_path):
    photos = make_site_folder(sample_dir, tmp_path)
    shards = tmp_path / "shards"
    assert run_script(root, "make_shards", ["--images", photos, "--output", shards, "--shard-size", "2"]) == 0
    common = ["--model", tiny_model_file, "--score-threshold", "0.05", "--device", "cpu", "--batch-size", "1",
              "--workers", "0", "--no-annotated"]
    assert run_script(root, "predict", ["--images", photos, "--output-dir", tmp_path / "a", *common]) == 0
    assert run_script(root, "predict", ["--images", *sorted(shards.glob("*.tar")), "--output-dir", tmp_path / "b",
                                        *common]) == 0
    folder, sharded = (json.loads((tmp_path / name / "predictions.json").read_text()) for name in "ab")
    assert sorted(i["folder"] for i in folder["images"]) == sorted(i["folder"] for i in sharded["images"]) == \
        ["", "siteA", "siteB", "siteB/cam1", "siteC"]
    one, other = (json.loads((tmp_path / name / "compliance.json").read_text()) for name in "ab")
    assert one["per_folder"] == other["per_folder"] and set(one["per_folder"]) == {"", "siteA", "siteB",
                                                                                      "siteB/cam1", "siteC"}
    assert len(one["skipped"]) == 3  # the link to nothing, the loop, the name that is not UTF-8


@pytest.mark.e2e
def test_sharded_prediction_merged_equals_one_job(root, sample_dir, tiny_model_file, tmp_path, capsys):
    make_photo_folder(sample_dir, tmp_path / "photos", 7)
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    shards = tmp_path / "shards"
    assert run_script(root, "make_shards", ["--images", tmp_path / "photos", "--output", shards,
                                            "--shard-size", "3"]) == 0
    tars = sorted(shards.glob("shard-*.tar"))
    # Batch size 1: a batch pads its images to one size, which moves scores slightly, so one job over
    # all images and three jobs over thirds are compared image by image at the same batching.
    common = ["--model", tiny_model_file, "--score-threshold", "0.05", "--device", "cpu", "--batch-size", "1",
              "--workers", "0"]
    single = tmp_path / "single"
    assert run_script(root, "predict", ["--images", *tars, "--output-dir", single, "--no-annotated", *common]) == 0
    parts = tmp_path / "parts"
    for number, tar in enumerate(tars):
        assert run_script(root, "predict", ["--images", tar, "--output-dir", parts, "--output-tag", tar.stem,
                                            "--annotate-max", str(number % 2), "--annotated-tar",
                                            parts / f"annotated_{tar.stem}.tar", *common]) == 0
    merged = tmp_path / "merged"
    assert run_script(root, "merge_predictions", ["--inputs-dir", parts, "--expected", "3",
                                                  "--output-dir", merged]) == 0
    one = json.loads((single / "compliance.json").read_text())
    fan = json.loads((merged / "compliance.json").read_text())
    assert fan["overall"] == one["overall"]
    assert fan["working_size"] == one["working_size"] is not None  # the size the parts ran at, not only the trained one
    assert fan["per_image"] == one["per_image"] and len(fan["per_image"]) == 7
    assert sorted(e["file"] for e in fan["skipped"]) == sorted(e["file"] for e in one["skipped"]) == \
        ["shard-000000.tar:broken.jpg"]
    assert set(fan["per_shard"]) == {"shard-000000", "shard-000001", "shard-000002"}
    assert sum(part["faces"] for part in fan["per_shard"].values()) == fan["overall"]["faces"]
    with open(single / "predictions.csv", newline="") as a, open(merged / "predictions.csv", newline="") as b:
        assert sorted(csv.reader(a)) == sorted(csv.reader(b))
    assert (merged / "compliance_histogram.png").stat().st_size > 0
    # the estimate and its interval rest on the per-image records in file order: the same from the parts
    assert fan["estimate"] == one["estimate"] and fan["estimates"] == one["estimates"]
    assert fan["estimate"]["units"] == 7 and fan["estimate"]["faces_found"] == fan["overall"]["faces"]
    assert "per_folder" not in fan  # one folder: the plot shows the overall figure alone
    assert (merged / "compliance_by_folder.png").stat().st_size > 0
    # --annotate-max per job: shard 1 drew one image, shards 0 and 2 none (an empty tar is still written)
    counts = [len(tarfile.open(parts / f"annotated_{tar.stem}.tar").getnames()) for tar in tars]
    assert counts == [0, 1, 0]

    capsys.readouterr()
    assert run_script(root, "merge_predictions", ["--inputs-dir", parts, "--expected", "4",
                                                  "--output-dir", merged]) == 2
    assert "3 predictions part(s), expected 4" in capsys.readouterr().err


def generate(run_dir, data, *extra) -> int:
    import workflow as generator

    args = generator.get_args_parser().parse_args(
        ["--data", str(data), "--run-dir", str(run_dir), "--generate-only", *map(str, extra)])
    return generator.main(args)


def run_generated_job(root, run_dir, job_id, workdir, monkeypatch) -> int:
    """Run one job of a generated workflow.yml by hand: its inputs linked into *workdir* from the
    replica catalog, its script called with exactly the generated arguments, as Pegasus would."""
    import yaml

    workflow = yaml.safe_load((run_dir / "workflow.yml").read_text())
    replicas = {r["lfn"]: r["pfns"][0]["pfn"].removeprefix("file://")
                for r in yaml.safe_load((run_dir / "replicas.yml").read_text())["replicas"]}
    job = next(job for job in workflow["jobs"] if job["id"] == job_id)
    workdir.mkdir()
    for use in job["uses"]:
        if use["type"] == "input":
            (workdir / use["lfn"]).symlink_to(replicas[use["lfn"]])
    monkeypatch.chdir(workdir)
    return run_script(root, job["name"], job["arguments"])


def test_a_large_data_set_travels_in_shards_and_the_jobs_read_them(root, sample_dir, tmp_path, monkeypatch, capsys):
    per_file, sharded = tmp_path / "per_file", tmp_path / "sharded"
    assert generate(per_file, sample_dir) == 0
    assert generate(sharded, sample_dir, "--shard-data-above", "10") == 0
    import yaml

    replicas = [r["lfn"] for r in yaml.safe_load((sharded / "replicas.yml").read_text())["replicas"]]
    assert {"train_shard-000000.tar", "val_shard-000000.tar", "test_shard-000000.tar"} <= set(replicas)
    assert not any(lfn.endswith((".jpg", ".xml")) for lfn in replicas)  # no image is its own replica
    index = json.loads((sharded / "data_shards" / "train" / "index.json").read_text())
    train_rows = sum(1 for line in (sharded / "split.csv").read_text().splitlines() if line.endswith(",train"))
    assert index["num_images"] == index["num_annotations"] == train_rows
    # the data jobs, run with the generated arguments, make the same sets from shards as from files
    for job_id, output in (("preprocess_val", "val_set.tar"), ("plot_class_distribution", "class_distribution.csv")):
        assert run_generated_job(root, per_file, job_id, tmp_path / f"a_{job_id}", monkeypatch) == 0
        assert run_generated_job(root, sharded, job_id, tmp_path / f"b_{job_id}", monkeypatch) == 0
        a, b = tmp_path / f"a_{job_id}" / output, tmp_path / f"b_{job_id}" / output
        if output.endswith(".tar"):
            assert sorted(tarfile.open(a).getnames()) == sorted(tarfile.open(b).getnames()) != []
        else:
            assert a.read_text() == b.read_text()
    # two shards of one set may not both hold a name
    shard = sharded / "data_shards" / "val" / "shard-000000.tar"
    capsys.readouterr()
    assert run_script(root, "preprocess", ["--images", shard, shard, "--output-tar", tmp_path / "x.tar"]) == 2
    assert "is also in shard-000000.tar" in capsys.readouterr().err


def a_part() -> dict:
    """A predictions part as bin/predict.py writes it, with one image and one detection."""
    return {"model": "model.pt", "backbone": "mobilenet_v2_fpn", "image_size": 128, "working_size": 128,
            "score_threshold": 0.5, "score_threshold_source": "--score-threshold", "tta": False, "num_images": 1,
            "detection_floor": 0.05, "num_detections": 1, "calibration": None, "skipped": [],
            "images": [{"file": "shard-000000.tar:a.jpg", "folder": "", "width": 100, "height": 80, "annotated": None,
                        "detections": [{"box": [1.0, 2.0, 30.5, 40.0], "label": "with_mask", "score": 0.9}],
                        "soft_counts": {"with_mask": 0.9, "without_mask": 0.0, "mask_weared_incorrect": 0.0}}]}


def _set(path, value):
    def change(part):
        *keys, last = path
        target = part
        for key in keys:
            target = target[key]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
    return change


DETECTION = ("images", 0, "detections", 0)


@pytest.mark.parametrize("change, field", [
    (_set((*DETECTION, "label"), "foo"), "images[0].detections[0].label: 'foo' is not one of"),
    (_set(("images", 0, "detections"), KeyError), "images[0].detections: missing"),
    (_set(("images",), {"a": 1}), "images: a dict, not a list"),
    (_set(("score_threshold",), KeyError), "score_threshold: missing"),
    (_set(("images", 0, "folder"), None), "images[0].folder: None is not a folder name"),
    (_set(("images", 0, "file"), ["x"]), "images[0].file: ['x'] is not a file name"),
    (_set(("images", 0, "soft_counts"), {"with_mask": 1}), "images[0].soft_counts:"),
    (_set(("skipped",), "oops"), "skipped: a str, not a list"),
    (_set((*DETECTION, "box"), "xx"), "images[0].detections[0].box: 'xx' is not"),
    (_set((*DETECTION, "box"), [50, 2, 10, 40]), "images[0].detections[0].box:"),
    (_set((*DETECTION, "box"), [1, 2, 300, 40]),
     "images[0].detections[0].box: [1, 2, 300, 40] is not [xmin, ymin, xmax, ymax] inside the 100x80 image"),
    (_set((*DETECTION, "score"), "high"), "images[0].detections[0].score: 'high' is not a number from 0 to 1"),
    (_set((*DETECTION, "score"), 7), "images[0].detections[0].score: 7"),
    (_set(("images", 0, "width"), -3), "images[0].width: -3"),
    (_set(("tta",), "yes"), "tta: 'yes' is not true or false"),
    # a calibration record the estimates cannot read was a traceback, exit 1
    (_set(("calibration",), {"images": [1, 2]}), "calibration: not the model's validation record (TypeError"),
    (_set(("calibration",), {"images": [{"truth": [1, 0, 0], "confusion": [[1, 0, 0, 0]] + [[0] * 4] * 3,
                                         "soft": [[float("nan"), 0, 0]] + [[0] * 3] * 3}]}),
     "calibration: not the model's validation record (ValueError: 'calibration counts or scores that are negative"),
])
def test_merge_predictions_names_the_file_and_field_of_a_malformed_part(root, tmp_path, capsys, change, field):
    good, bad = tmp_path / "predictions_good.json", tmp_path / "predictions_bad.json"
    good.write_text(json.dumps(a_part()))
    assert run_script(root, "merge_predictions", ["--inputs", good, "--output-dir", tmp_path / "out"]) == 0
    part = a_part()
    change(part)
    bad.write_text(json.dumps(part))
    capsys.readouterr()
    assert run_script(root, "merge_predictions", ["--inputs", bad, "--output-dir", tmp_path / "out"]) == 2
    err = capsys.readouterr().err
    assert f"merge_predictions: error: {bad}: {field}" in err and "Traceback" not in err


def test_the_plot_per_folder_draws_the_largest_folders_not_a_row_for_each(tmp_path, monkeypatch):
    # 100k images in folders of ten: a row a folder made 3000 folders a 125,000-px-tall PNG drawn in 1.4 GB.
    from utils import defaults as D
    from utils.detection import plots

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or plots.plt.close(fig))
    estimate = {"percent": 50.0, "low": 40.0, "high": 60.0, "unit": "image", "faces_found": 3, "method": "cc",
                "confidence": 0.95}
    per_folder = {f"site{k:04d}": {**estimate, "units": 10 + (k % 97 == 5)} for k in range(3 * D.FOLDER_PLOT_MAX)}
    plots.plot_compliance_by_folder(per_folder, estimate, tmp_path / "plot.png")
    axes = drawn[0].axes[0]
    labels = [label.get_text() for label in axes.get_yticklabels()]
    assert len(labels) == D.FOLDER_PLOT_MAX and drawn[0].get_size_inches()[1] < 1.2 + 0.5 * D.FOLDER_PLOT_MAX
    assert {"site0005", "site0102"} <= set(labels) and labels == sorted(labels)  # the largest, in folder order
    assert f"the {D.FOLDER_PLOT_MAX} of {3 * D.FOLDER_PLOT_MAX} folders" in axes.get_title()


def test_merge_predictions_tells_a_folder_from_a_part(root, tmp_path, capsys):
    (tmp_path / "parts").mkdir()
    assert run_script(root, "merge_predictions", ["--inputs", tmp_path / "parts", "--output-dir", tmp_path]) == 2
    assert f"{tmp_path / 'parts'}: a folder, not a predictions_<TAG>.json (give a folder of parts as --inputs-dir)" \
        in capsys.readouterr().err
    # a folder without parts is named (it said only: no predictions_<tag>.json to merge)
    assert run_script(root, "merge_predictions", ["--inputs-dir", tmp_path / "parts", "--output-dir", tmp_path]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"merge_predictions: error: {tmp_path / 'parts'}: no predictions_*.json in it to merge"


def _other_image(part: dict, name: str) -> dict:
    return {**part, "images": [{**part["images"][0], "file": f"shard-000001.tar:{name}"}]}


def test_merge_predictions_refuses_a_shard_twice_and_shards_that_overlap(root, tmp_path, capsys):
    # two parts of one tag (shard-000000 of two runs): the per-shard figures kept only the second part's
    for folder, part in (("a", a_part()), ("b", _other_image(a_part(), "b.jpg"))):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "predictions_shard-000000.json").write_text(json.dumps(part))
    first, again = tmp_path / "a" / "predictions_shard-000000.json", tmp_path / "b" / "predictions_shard-000000.json"
    capsys.readouterr()
    assert run_script(root, "merge_predictions", ["--inputs", first, again, "--output-dir", tmp_path / "out"]) == 2
    err = capsys.readouterr().err
    assert f"merge_predictions: error: {again}: shard shard-000000 again (also {first})" in err
    assert not (tmp_path / "out" / "compliance.json").exists()
    # a file one part read and another skipped: the shards overlap (it was counted as read and as skipped)
    skipping = {**_other_image(a_part(), "b.jpg"),
                "skipped": [{"file": "shard-000000.tar:a.jpg", "reason": "cannot decode image: truncated"}]}
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "predictions_s0.json").write_text(json.dumps(a_part()))
    (parts / "predictions_s1.json").write_text(json.dumps(skipping))
    assert run_script(root, "merge_predictions", ["--inputs-dir", parts, "--output-dir", tmp_path / "out"]) == 2
    err = capsys.readouterr().err
    assert (f"{parts / 'predictions_s1.json'}: shard-000000.tar:a.jpg (skipped here) is also in "
            f"{parts / 'predictions_s0.json'} (read there): the shards overlap") in err
    # a file skipped by two parts, likewise; a part that lists a skip twice is one part and merges
    (parts / "predictions_s0.json").write_text(json.dumps({**a_part(), "skipped": skipping["skipped"] * 2,
                                                           "images": []}))
    assert run_script(root, "merge_predictions", ["--inputs", parts / "predictions_s0.json",
                                                  "--output-dir", tmp_path / "out"]) == 0
    assert run_script(root, "merge_predictions", ["--inputs-dir", parts, "--output-dir", tmp_path / "out"]) == 2
    assert "(skipped there): the shards overlap" in capsys.readouterr().err


def test_merge_predictions_refuses_a_stopped_predict_jobs_stand_in_naming_it(root, tmp_path, capsys):
    # It said "images: missing (not a predictions file of bin/predict.py?)" of the JSON note a stopped job leaves.
    from utils.stop import declare_outputs, stop_on_sigterm, write_stand_ins

    part = tmp_path / "predictions_shard-000000.json"
    stop_on_sigterm()
    declare_outputs(part)
    assert write_stand_ins("predict", "SIGTERM received") == [part]
    assert run_script(root, "merge_predictions", ["--inputs", part, "--output-dir", tmp_path / "out"]) == 2
    assert f"{part}: a stand-in, not a predictions file: the predict job that writes it was stopped" in \
        capsys.readouterr().err


def test_merge_predictions_writes_its_figures_and_csv_as_one_set(tmp_path, monkeypatch):
    """compliance.json was written, then predictions.csv: a failure (a full disk) in between left this merge's
    figures beside the last merge's detections."""
    import errno

    import utils.detection.merge as merge

    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "predictions_s0.json").write_text(json.dumps(a_part()))
    out = tmp_path / "out"
    merge.merge_predictions([parts / "predictions_s0.json"], out)
    before = {name: (out / name).read_bytes() for name in ("compliance.json", "predictions.csv")}
    (parts / "predictions_s0.json").write_text(json.dumps(_other_image(a_part(), "b.jpg")))

    def full_disk(images, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(merge, "write_predictions_csv", full_disk)
    with pytest.raises(OSError, match="predictions.csv"):  # named: a full disk's error names no file
        merge.merge_predictions([parts / "predictions_s0.json"], out)
    assert {name: (out / name).read_bytes() for name in before} == before
    assert sorted(path.name for path in out.iterdir()) == sorted(["compliance.json", "predictions.csv",
                                                                  "compliance_by_folder.png",
                                                                  "compliance_histogram.png"])


def test_index_json_counts_the_skipped_files_and_skipped_csv_lists_them(sample_dir, tmp_path):
    """A camera's RAW file beside each JPEG is skipped: every one listed in index.json, which the generator reads
    whole, made it grow with the collection (~150 bytes a file, ~150 MB for a million). It names the first
    INDEX_SKIPPED_LISTED; skipped.csv lists them all."""
    from utils.data.shards import INDEX_SKIPPED_LISTED, SKIPPED_CSV, write_shards

    image = sorted((sample_dir / "images").glob("*.jpg"))[0]
    sizes = {}
    for count in (10, 5_000):
        skipped = [{"file": f"/cams/site{k % 7}/IMG_{k:06d}.CR2", "reason": "not an image file name (extension "
                                                                        "'.CR2')"} for k in range(count)]
        out = tmp_path / str(count)
        write_shards([(image, None)], out, 10, skipped=skipped)
        data = json.loads((out / "index.json").read_text())
        assert data["num_skipped"] == count and data["skipped"] == skipped[:INDEX_SKIPPED_LISTED]
        with open(out / SKIPPED_CSV, newline="", encoding="utf-8") as handle:
            assert list(csv.DictReader(handle)) == skipped
        sizes[count] = (out / "index.json").stat().st_size
    assert sizes[5_000] < 2 * sizes[10] + 100 * INDEX_SKIPPED_LISTED, sizes  # every one listed: ~600 kB


def test_reused_shards_list_the_files_skipped_now(sample_dir, tmp_path):
    """The generator reuses the shards of unchanged images (pack_or_reuse) but kept the skipped list of the packing
    that made them: a file put beside the images since was in its warning's count, not in the skipped.csv it
    points to; and a folder packed before skipped.csv was written had none."""
    from utils.data.shards import SKIPPED_CSV, pack_or_reuse

    items, out = [(sorted((sample_dir / "images").glob("*.jpg"))[0], None)], tmp_path / "shards"
    raw = {"file": "/cams/IMG_0001.CR2", "reason": "not an image file name (extension '.CR2')"}
    notes = {"file": "/cams/notes.txt", "reason": "not an image file name (extension '.txt')"}
    pack_or_reuse(items, out, 10, "cams", [raw])
    packed = (out / "shard-000000.tar").stat().st_mtime_ns
    for left_out in ([raw, notes], []):
        pack_or_reuse(items, out, 10, "cams", left_out)
        assert (out / "shard-000000.tar").stat().st_mtime_ns == packed  # reused
        with open(out / SKIPPED_CSV, newline="", encoding="utf-8") as handle:
            assert list(csv.DictReader(handle)) == left_out
        data = json.loads((out / "index.json").read_text())
        assert (data["num_skipped"], data["skipped"]) == (len(left_out), left_out)
    (out / SKIPPED_CSV).unlink()  # packed before skipped.csv was written
    pack_or_reuse(items, out, 10, "cams", [notes])
    assert (out / SKIPPED_CSV).read_text().splitlines()[1:] == ["/cams/notes.txt,not an image file name (extension "
                                                                  "'.txt')"]
