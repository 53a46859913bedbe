"""What the jobs after the model (merge_predictions, report) cost and show on a large photo collection."""

import json
import os
import shutil
import subprocess
import sys

from helpers import run_script


def test_the_jobs_that_read_predictions_or_hpo_results_from_json_do_not_load_torch(root):
    # merge_predictions imported torch and torchvision through predict's module (predictions.csv) and compliance.py
    # (for the evaluation's tensors): ~750 MB and ~4 s a merge of JSON files, before it read a part. hpo_merge did
    # through the search's module (utils/detection/hpo.py, for HpoError): seconds of every workflow's hpo_merge job.
    code = ("import sys, runpy\n"
            "sys.argv = ['job', '--help']\n"
            "for script in ('bin/merge_predictions.py', 'bin/report.py', 'bin/hpo_merge.py'):\n"
            "    try:\n"
            "        runpy.run_path(script, run_name='__main__')\n"
            "    except SystemExit:\n"
            "        pass\n"
            "import utils.detection.merge, utils.detection.plots, utils.reporting.html_report\n"
            "from utils.detection.plots import _frozen_trials\n"
            "_frozen_trials([], {})\n"
            "print('loaded:', sorted(m for m in ('torch', 'torchvision') if m in sys.modules))\n")
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "loaded: []"


def test_a_long_or_odd_folder_name_keeps_the_plot_per_folder_readable(tmp_path):
    # A 300-character folder name drew compliance_by_folder.png 3351 px wide, its bars squeezed into the right
    # fifth; a line break in a name split its row in two.
    from PIL import Image

    from utils.detection import plots
    from utils.figures import FIGURE_LABEL_CHARS, figure_label

    estimate = {"percent": 50.0, "low": 40.0, "high": 60.0, "unit": "image", "units": 5, "faces_found": 3,
                "method": "cc", "confidence": 0.95}
    long_name = "siteA/" + "x" * 300 + "/2026-12-06"
    names = ["site0/cam0", long_name, "two\nlines", "tab\there", "ü ñ/.."]
    plots.plot_compliance_by_folder({name: estimate for name in names}, estimate, tmp_path / "plain.png")
    plain_width = Image.open(tmp_path / "plain.png").width
    plots.plot_compliance_by_folder({"site0/cam0": estimate, "site1/cam0": estimate}, estimate, tmp_path / "short.png")
    assert plain_width < 2 * Image.open(tmp_path / "short.png").width  # the 60-character label against 10
    label = figure_label(long_name)
    assert len(label) == FIGURE_LABEL_CHARS and label.startswith("siteA/x") and label.endswith("x/2026-12-06")
    assert figure_label("two\nlines") == "two?lines" and figure_label("ü ñ 日本/..") == "ü ñ 日本/.."


def _part(skipped: int) -> dict:
    """A predictions part as bin/predict.py writes it: one image, and *skipped* files it could not read."""
    return {"model": "model.pt", "backbone": "mobilenet_v2_fpn", "image_size": 128, "working_size": 128,
            "score_threshold": 0.5, "score_threshold_source": "--score-threshold", "tta": False, "num_images": 1,
            "detection_floor": 0.05, "num_detections": 1, "calibration": None,
            "skipped": [{"file": f"shard-000000.tar:bad{k:03d}.jpg", "reason": "cannot decode image: truncated"}
                        for k in range(skipped)],
            "images": [{"file": "shard-000000.tar:a.jpg", "folder": "", "width": 100, "height": 80, "annotated": None,
                        "detections": [{"box": [1.0, 2.0, 30.5, 40.0], "label": "with_mask", "score": 0.9}],
                        "soft_counts": {"with_mask": 0.9, "without_mask": 0.0, "mask_weared_incorrect": 0.0}}]}


def test_the_skipped_files_of_a_large_collection_are_counted_on_the_terminal_and_all_listed_in_the_outputs(
        root, tmp_path, capsys):
    # merge_predictions printed a line per skipped file: thousands for a collection with a bad camera, after each
    # predict job had printed its own; make_shards and predict likewise.
    from utils.cli import SKIPPED_PRINTED

    part = tmp_path / "predictions_shard-000000.json"
    part.write_text(json.dumps(_part(SKIPPED_PRINTED + 5)))
    assert run_script(root, "merge_predictions", ["--inputs", part, "--output-dir", tmp_path / "out"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("skipped ")]
    assert lines[:SKIPPED_PRINTED] == [f"skipped shard-000000.tar:bad{k:03d}.jpg: cannot decode image: truncated"
                                       for k in range(SKIPPED_PRINTED)]
    assert lines[SKIPPED_PRINTED:] == [f"skipped 5 more files (all {SKIPPED_PRINTED + 5} with their reasons in "
                                       f"{tmp_path / 'out' / 'compliance.json'})"]
    assert len(json.loads((tmp_path / "out" / "compliance.json").read_text())["skipped"]) == SKIPPED_PRINTED + 5
    # make_shards with nothing to pack writes no skipped.csv: every skipped file is printed
    photos = tmp_path / "photos"
    photos.mkdir()
    for k in range(SKIPPED_PRINTED + 2):
        (photos / f"notes{k:02d}.txt").write_text("not an image")
    assert run_script(root, "make_shards", ["--images", photos, "--output", tmp_path / "shards"]) == 2
    err = capsys.readouterr().err
    assert sum(line.startswith("skipped ") for line in err.splitlines()) == SKIPPED_PRINTED + 2 and "more" not in err


def test_the_report_names_the_prediction_sets_skipped_files_the_first_fifty(root, tmp_path, capsys):
    # The page said "120 file(s) skipped." and named none, where the evaluation's were listed.
    from utils.reporting.html_parts import FILES_LISTED

    data = _part(FILES_LISTED + 70)
    data["skipped"][0]["file"] = "shard-000000.tar:site <b>1</b>/ü ñ.jpg"
    part = tmp_path / "predictions_shard-000000.json"
    part.write_text(json.dumps(data))
    out = tmp_path / "out"
    assert run_script(root, "merge_predictions", ["--inputs", part, "--output-dir", out]) == 0
    assert run_script(root, "report", [out, "--run-name", "collection"]) == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    assert f"<summary>{FILES_LISTED + 70} file(s) skipped</summary>" in page
    assert page.count("cannot decode image: truncated</li>") == FILES_LISTED
    assert "<code>shard-000000.tar:site &lt;b&gt;1&lt;/b&gt;/ü ñ.jpg</code>" in page
    assert "and 70 more: <code>compliance.json</code> lists them all" in page


def test_the_data_jobs_count_their_skipped_files_on_the_terminal_and_list_them_all_in_their_report(
        root, tmp_path, capsys):
    # preprocess and augment printed a line per skipped input: a folder of thousands of damaged photos buried the
    # job's log; now they print the first SKIPPED_PRINTED and name the report that lists every one.
    from utils.cli import SKIPPED_PRINTED
    from utils.data.sample_data import make_sample_dataset

    make_sample_dataset(tmp_path / "data", num_images=2, seed=1, image_size=(64, 64))
    images, annotations = tmp_path / "data" / "images", tmp_path / "data" / "annotations"
    for k in range(SKIPPED_PRINTED + 3):
        (images / f"broken{k:02d}.jpg").write_bytes(b"not a jpeg")
        shutil.copy(annotations / "sample_0000.xml", annotations / f"broken{k:02d}.xml")
    for job, flags in (("preprocess", ["--prefix", "p_"]), ("augment", ["--copies", "1"])):
        out = tmp_path / f"{job}_set"
        assert run_script(root, job, ["--images", images, "--annotations", annotations, *flags,
                                      "--output-dir", out, "--no-progress"]) == 0
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("skipped ")]
        report = tmp_path / f"{job}_set.report.json"
        assert len(lines) == SKIPPED_PRINTED + 1, (job, lines)
        assert lines[-1] == f"skipped 3 more files (all {SKIPPED_PRINTED + 3} with their reasons in {report})"
        assert len(json.loads(report.read_text())["skipped"]) == SKIPPED_PRINTED + 3
