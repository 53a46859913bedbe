"""bin/report.py: one self-contained page per run, checked in headless Chromium (skipped when absent)."""

from __future__ import annotations

import re

import pytest

from helpers import run_script
from run_folders import FIGURE_NAMES, image_errors, make_run_folder

SECTIONS = ("summary", "data", "hpo", "training", "evaluation", "predictions", "timings", "provenance")


def build(root, run_dir, capsys) -> str:
    assert run_script(root, "report", [run_dir]) == 0
    out = capsys.readouterr().out
    assert f"report: {run_dir / 'outputs' / 'report.html'}" in out
    return (run_dir / "outputs" / "report.html").read_text()


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
