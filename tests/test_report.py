"""bin/report.py: one self-contained page per run, checked in headless Chromium (skipped when absent). Damaged and
hostile run files: tests/test_report_bad_run_files.py."""

from __future__ import annotations

import re

import pytest

from helpers import run_script
from run_folders import FIGURE_NAMES, build, image_errors, make_run_folder

SECTIONS = ("summary", "data", "hpo", "training", "evaluation", "predictions", "timings", "provenance")


@pytest.mark.browser
def test_the_report_renders_offline_in_a_browser(root, tmp_path, capsys):
    from browser import chromium_session, require_chromium

    require_chromium()
    run_dir = make_run_folder(tmp_path / "run", config={"image_size": 128, "train_stages": [{"lr": 0.02}]},
                              num_images=30)
    page = build(root, run_dir, capsys)
    assert (run_dir / "outputs" / "report_run.json").is_file()
    # self-contained: nothing but data: URIs, no script at all
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", page) and "<script" not in page
    with chromium_session(tmp_path) as browser:
        browser.get((run_dir / "outputs" / "report.html").as_uri())
        for section in SECTIONS:
            assert browser.find_element("id", section).is_displayed(), section
        nav = [link.get_attribute("href").rsplit("#", 1)[-1] for link in browser.find_elements("css selector", "nav a")]
        assert nav == list(SECTIONS)
        images = browser.execute_script(
            "return [...document.images].map(i => [i.alt, i.complete && i.naturalWidth > 0])")
        assert len(images) == len(FIGURE_NAMES) + 24  # every figure, and the grid capped at 24 of 30 images
        assert all(rendered for _, rendered in images), [alt for alt, rendered in images if not rendered]
        # the worst images first: the grid follows evaluation_images.json's order
        names = [element.text for element in browser.find_elements("css selector", ".tile .name")]
        worst = [entry["image"].removeprefix("test_").removesuffix(".jpg") for entry in image_errors(30)]
        assert names == worst[:24]
        first = browser.find_element("css selector", ".tile").text
        assert "3 missed" in first and "1 false" in first
        summary = browser.find_element("id", "summary").text
        assert "0.500" in summary and "+2.0 pts" in summary and "mask_weared_incorrect" in summary
        assert "trained at 128 px, run at 160 px" in summary  # the size its figures were measured at
        assert "statistics.json" in browser.find_element("id", "timings").text
        assert "config.yml" in browser.find_element("id", "provenance").text
        requests = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert [url for url in requests if not url.startswith("data:")] == []
        assert browser.save_screenshot(str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_a_run_lacking_pieces_gets_a_page_that_says_so(root, tmp_path, capsys):
    run_dir = make_run_folder(tmp_path / "partial", hpo=False, statistics=False, figures=False)
    page = build(root, run_dir, capsys)
    assert "no hyperparameter search ran" in page
    assert "no <code>statistics.json</code> yet" in page and "evaluate_run.json" in page
    assert "no <code>loss_curve.png</code> in this run (the train job writes it)" in page
    assert "no <code>config.yml</code> in this run" in page
    assert page.count('class="tile"') == 6
    # the figure as an estimate: every estimator against the truth, and the prediction set's interval
    assert "Percent properly masked as an estimate (test set)" in page and "truth inside" in page
    assert "<b>no</b>" in page  # pcc's interval (85-95 %) misses the true 75 %
    assert "95% interval 41.5&ndash;58.5%" in page and "not computed" in page


def test_bad_run_folders_are_one_line_errors(root, tmp_path, capsys):
    assert run_script(root, "report", [tmp_path / "nowhere"]) == 2
    err = capsys.readouterr().err
    assert err == f"report: error: {tmp_path / 'nowhere'}: run folder not found\n"
    (tmp_path / "empty").mkdir()
    assert run_script(root, "report", [tmp_path / "empty"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"report: error: {tmp_path / 'empty'}: no run outputs found") and err.count("\n") == 1


def test_the_page_is_titled_by_the_runs_name_not_the_jobs_scratch_folder(root, tmp_path, capsys):
    run_dir = make_run_folder(tmp_path / "report", hpo=False, statistics=False, figures=False)
    page = build(root, run_dir, capsys)  # by hand: the folder's name
    assert "<title>Run report: report</title>" in page
    assert run_script(root, "report", [run_dir, "--run-name", "mask-run-7"]) == 0
    page = (run_dir / "outputs" / "report.html").read_text()
    assert "<title>Run report: mask-run-7</title>" in page and "run <code>mask-run-7</code>" in page
    capsys.readouterr()
    assert run_script(root, "report", [run_dir, "--run-name", " "]) == 2
    assert capsys.readouterr().err == "report: error: --run-name is empty; give the run's name or leave the flag out\n"


def test_a_decompression_bomb_among_the_outputs_is_said_on_the_page_not_decoded(root, tmp_path, capsys):
    from PIL import Image

    run_dir = make_run_folder(tmp_path / "run", hpo=False, statistics=False, figures=False)
    Image.new("1", (10_000, 10_000)).save(run_dir / "outputs" / "loss_curve.png")
    page = build(root, run_dir, capsys)
    assert "cannot be read as an image" in page and "image too large" in page


def test_the_workflows_report_job_passes_the_run_folders_name(sample_dir, tmp_path):
    import yaml

    import workflow

    run_dir = tmp_path / "mask-run-7"
    args = workflow.get_args_parser().parse_args(["--data", str(sample_dir), "--run-dir", str(run_dir),
                                                  "--generate-only"])
    assert workflow.main(args) == 0
    jobs = yaml.safe_load((run_dir / "workflow.yml").read_text())["jobs"]
    report = next(job for job in jobs if job["name"] == "report")
    arguments = [str(argument) for argument in report["arguments"]]
    assert arguments[arguments.index("--run-name") + 1] == "mask-run-7"


def test_photos_of_one_name_in_two_folders_keep_their_own_figures():
    # Shards keep subfolders: siteA/img.jpg and siteB/img.jpg are two photos, with two annotated copies,
    # and the report must show each tile with its own photo's figures.
    from pathlib import Path

    from utils.naming import annotated_stem
    from utils.reporting.run_folder import AnnotatedImage, RunFolder, predicted_by_stem

    per_image = {"pred_shard-000000.tar:siteA/img.jpg": {"faces": 2}, "pred_shard-000001.tar:siteB/img.jpg":
                 {"faces": 6}, "pred_shard-000001.tar:flat.jpg": {"faces": 1}}
    run = RunFolder(path=Path("run"), outputs=Path("run/outputs"), compliance={"per_image": per_image})
    figures = predicted_by_stem(run)
    assert figures == {"siteA__img": {"faces": 2}, "siteB__img": {"faces": 6}, "flat": {"faces": 1}}
    tile = AnnotatedImage(name=f"annotated_{annotated_stem('siteB/img.jpg')}.jpg", source=Path("x.tar"))
    assert figures[tile.stem] == {"faces": 6}


def test_the_grid_reads_an_archives_drawings_without_scanning_the_archive_again(tmp_path, monkeypatch):
    # Each of the grid's images read every header of its annotated .tar (24 scans of 100k headers).
    import io
    import tarfile

    from utils.reporting.run_folder import RunFolder, _annotated_images

    headers, real_next = [], tarfile.TarFile.next
    monkeypatch.setattr(tarfile.TarFile, "next", lambda self: headers.append(1) or real_next(self))
    for count in (50, 200):
        outputs = tmp_path / str(count)
        outputs.mkdir()
        with tarfile.open(outputs / "annotated_shard.tar", "w") as tar:
            for k in range(count):
                data = f"drawing {k}".encode()
                info = tarfile.TarInfo(f"annotated_img{k:04d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        images = _annotated_images(outputs, RunFolder(path=outputs, outputs=outputs))
        headers.clear()  # the listing reads each header once
        assert [image.read_bytes() for image in images[-24:]] == [f"drawing {k}".encode()
                                                                  for k in range(count - 24, count)]
        assert len(headers) <= 10 * 24


def test_the_files_evaluation_skipped_are_listed_up_to_a_bound_with_the_rest_counted(root, tmp_path, capsys):
    """Every skipped file and every annotation with objects dropped was a line of the page: 100k of each made a
    12.7 MB page (/work/tmp/audit_d/report_size.py); the first few of each are listed, the rest counted."""
    import json

    run_dir = make_run_folder(tmp_path / "run", hpo=False, statistics=False, figures=False)
    path = run_dir / "outputs" / "evaluation.json"
    evaluation = json.loads(path.read_text())
    evaluation["skipped"] = [{"file": f"img{i:04d}.jpg", "reason": "cannot be decoded"} for i in range(1000)]
    evaluation["objects_dropped"] = [{"file": f"img{i:04d}.xml", "reason": "1 object dropped"} for i in range(700)]
    path.write_text(json.dumps(evaluation))
    page = build(root, run_dir, capsys)
    assert "1000 file(s) skipped, 700 annotation(s) with objects left out" in page
    listed = page.count("cannot be decoded"), page.count("1 object dropped")
    assert 0 < listed[0] <= 100 and 0 < listed[1] <= 100
    assert "<code>img0000.jpg</code>" in page and "<code>img0000.xml</code>" in page
    assert f"and {1700 - sum(listed)} more: <code>evaluation.json</code> lists them all" in page


def test_drawings_of_images_outside_the_test_set_fill_the_grid_with_their_predicted_counts(root, tmp_path, capsys):
    """predict on --pred-images draws no test image: with evaluation_images.json there (every finished run has it),
    the grid ranked the drawings that are test images, found none, and showed no drawing at all ('The 0 with the
    most errors are shown')."""
    import io
    import json
    import tarfile

    from run_folders import _jpeg

    run_dir = make_run_folder(tmp_path / "run", hpo=False, statistics=False, figures=False)
    outputs = run_dir / "outputs"
    with tarfile.open(outputs / "annotated_shard-000000.tar", "w") as archive:
        for i in range(3):
            data = _jpeg((200, 120, 40))
            info = tarfile.TarInfo(f"annotated_street{i}.jpg")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    written = json.loads((outputs / "compliance.json").read_text())
    written["per_image"] = {f"pred_shard-000000.tar:street{i}.jpg": {"faces": 3 + i, "percent_properly_masked": 50.0}
                            for i in range(3)}
    (outputs / "compliance.json").write_text(json.dumps(written))
    page = build(root, run_dir, capsys)
    section = page[page.index('<section id="predictions">'):page.index('<section id="timings">')]
    assert section.count('class="tile"') == 3
    assert [f"{3 + i} face(s)" in section for i in range(3)] == [True] * 3
    assert "no annotated image is a test image (predict ran on other images)" in section


def test_the_split_table_is_counted_as_it_is_read_not_held(tmp_path):
    """split.csv has a row per image of the data set; only its counts per split are shown, but every row was held
    as a dict first: 368 MB for 1M images (/work/tmp/audit_d/split_mem.py). The peak no longer grows with it."""
    import tracemalloc

    from utils.reporting.run_folder import read_run_folder

    peaks = []
    for rows in (2_000, 32_000):
        run_dir = make_run_folder(tmp_path / f"run{rows}", hpo=False, statistics=False, figures=False)
        (run_dir / "split.csv").write_text("image,annotation,split\n" + "".join(
            f"site/img{i:06d}.jpg,site/img{i:06d}.xml,{('train', 'val', 'test')[i % 3]}\n" for i in range(rows)))
        tracemalloc.start()
        run = read_run_folder(run_dir)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert run.split_counts == {"train": -(-rows // 3), "val": (rows + 1) // 3, "test": rows // 3}
    assert peaks[1] - peaks[0] < 1_000_000, peaks  # 30k rows more: about 11 MB more when every row was held


@pytest.mark.parametrize("name, said", [("evaluation.json", "the evaluate job has not finished"),
                                        ("compliance.json", "the merge_predictions job has not finished"),
                                        ("best_hpo_params.json", "no hyperparameter search ran")])
def test_a_result_file_there_but_unusable_is_not_called_unfinished(root, tmp_path, capsys, name, said):
    """A result file over the read limit or not JSON is listed among the problems, but its section said the job
    that writes it had not finished, as for a file not there."""
    run_dir = make_run_folder(tmp_path / "run", statistics=False, figures=False)
    (run_dir / "outputs" / name).write_text('{"map": ')
    page = build(root, run_dir, capsys)
    assert said not in page and "unfinished run" not in page
    assert f"<code>{name}</code> cannot be used: see the problems listed at the top." in page
    (run_dir / "outputs" / name).unlink()
    assert f"No <code>{name}</code> in this run: {said}" in build(root, run_dir, capsys)


def test_a_folds_run_shows_its_cross_validation_as_aggregate_folds_wrote_it(root, tmp_path, capsys):
    """A --folds run's cross-validation (kfold_summary.json, kfold_folds.png) was on no page: the report read
    neither, and the workflow's report job was not handed them."""
    import html
    import json

    from utils.classes import CLASSES
    from utils.detection.cross_validation import format_summary, write_summary
    from utils.reporting.run_folder import is_report_input

    run_dir = make_run_folder(tmp_path / "run", hpo=False, statistics=False, figures=False)
    plain = build(root, run_dir, capsys)
    assert 'id="folds"' not in plain and "kfold" not in plain  # a run without folds lacks nothing
    inputs = []
    for fold, value in enumerate((0.31, 0.47, 0.52)):
        per_class = {name: {"ap": value, "ap_50": value, "ap_75": value, "recall": value} for name in CLASSES}
        inputs.append(tmp_path / f"evaluation_fold{fold}.json")
        inputs[-1].write_text(json.dumps({
            "map": value, "map_50": value + 0.1, "map_75": value, "mar_100": value, "test_loss": 1.0, "per_class":
            per_class, "compliance": {"error_points": 2.0 - 4 * value, "per_image_mae_points": 9.0},
            "confusion_matrix": {"score_threshold": 0.5}, "num_images": 10 + fold, "num_faces": 30}))
    summary = write_summary(inputs, run_dir / "outputs")
    page = build(root, run_dir, capsys)
    section = page[page.index('<section id="folds">'):]
    section = section[:section.index("</section>")]
    assert f"<pre>{html.escape(format_summary(summary))}</pre>" in section
    assert '<img src="data:image/png;base64,' in section and '<a href="#folds">Cross-validation</a>' in page
    assert is_report_input("kfold_summary.json") and is_report_input("kfold_folds.png")
    (run_dir / "outputs" / "kfold_summary.json").write_text(json.dumps({"folds": 3}))  # not aggregate_folds'
    page = build(root, run_dir, capsys)
    assert "kfold_summary.json</code> cannot be used: see the problems listed at the top." in page
    assert "kfold_summary.json: not a summary of aggregate_folds (KeyError(" in page
    (run_dir / "outputs" / "kfold_summary.json").unlink()
    assert "No <code>kfold_summary.json</code> in this run: the aggregate_folds job has not finished" in build(
        root, run_dir, capsys)


def test_the_videos_plots_are_embedded_up_to_a_bound_the_others_listed_then_counted(tmp_path):
    """Every video of --pred-videos had its paragraphs and its plot embedded: a folder of 1,000 recordings made a
    page of ~60 MB. The first VIDEOS_SHOWN keep them, the next VIDEO_ROWS are a row each, the rest are counted."""
    import html
    import json

    from PIL import Image

    from utils.naming import video_output_names
    from utils.reporting.html_parts import VIDEO_ROWS, VIDEOS_SHOWN
    from utils.reporting.html_report import build_report
    from utils.reporting.run_folder import VIDEO_PLOT_TITLE, read_run_folder

    run_dir = make_run_folder(tmp_path / "run", figures=False)
    videos = VIDEOS_SHOWN + VIDEO_ROWS + 7
    for number in range(videos):
        names = video_output_names(f"cam{number:04d}")
        (run_dir / "outputs" / names["summary"]).write_text(json.dumps(
            {"source": f"cam{number:04d}.mp4", "frames_read": 10, "frames_processed": 2,
             "overall": {"faces": 4, "percent_properly_masked": 75.0}, "resampling": {"block_frames": 1},
             "estimate": {"method": "cc", "percent": 75.0, "low": 50.0, "high": 100.0, "units": 2}}))
        Image.new("RGB", (40, 30), (number % 256, 0, 0)).save(run_dir / "outputs" / names["plot"])
    page, unreadable = build_report(read_run_folder(run_dir))
    assert unreadable == []
    assert page.count(f'alt="{html.escape(VIDEO_PLOT_TITLE)}"') == VIDEOS_SHOWN  # every video's plot was embedded
    assert page.count("Video <code>cam") == VIDEOS_SHOWN
    assert f"<h3>{videos - VIDEOS_SHOWN} more videos</h3>" in page
    assert page.count("<code>cam") == VIDEOS_SHOWN + VIDEO_ROWS  # a row each
    assert "<code>cam0011.mp4</code>" not in page.split("more videos</h3>")[1]
    assert "<code>cam0012.mp4</code> <span class=\"muted\">(video_summary_cam0012.json)</span>" in page
    assert "75.0% (95% interval 50.0&ndash;100.0%)" in page.split("more videos</h3>")[1]
    assert "And 7 more videos not listed" in page
