"""bin/report.py on damaged and hostile run files: markup in any value shown as text, values of the wrong type left
out with a note, fifos and files over the size limits left out unread, CSVs without their columns said, and
outputs that are folders named: always a page or one line, never a traceback."""

from __future__ import annotations

import pytest

from helpers import run_script
from run_folders import FIGURE_NAMES, build, make_run_folder

RUN_JSON = ("evaluation.json", "evaluation_images.json", "compliance.json", "best_hpo_params.json",
            "preprocess_test_report.json", "evaluate_run.json", "model_run.json")


def edit_json(path, change) -> None:
    import json

    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def tags_of(page: str) -> set[str]:
    from html.parser import HTMLParser

    class Tags(HTMLParser):
        found: set[str] = set()

        def handle_starttag(self, tag, attrs):
            self.found.add(tag)

    parser = Tags()
    parser.feed(page)
    return parser.found


def test_markup_in_any_value_of_the_run_files_is_shown_as_text_never_rendered(root, tmp_path, capsys):
    """A <meta http-equiv="refresh"> in evaluation_images.json's "false" redirected the page (no CSP stops it)."""
    run_dir = make_run_folder(tmp_path / "run", hpo=True, figures=False)
    outputs, markup = run_dir / "outputs", '<x-injected http-equiv="refresh" content="0;url=https://example.com">'

    def every_value(value):
        if isinstance(value, dict):
            return {key: every_value(item) for key, item in value.items()}
        if isinstance(value, list):
            return [every_value(item) for item in value]
        return markup

    def keep_names(document):  # the images keep their names, so that the grid shows them with their entries
        for entry in document["images"]:
            entry.update({key: markup for key in entry if key != "image"})

    edit_json(outputs / "evaluation_images.json", keep_names)
    for name in RUN_JSON[2:]:
        if name != "preprocess_test_report.json":  # its prefix names the test images: the grid's entries
            edit_json(outputs / name, lambda document: document.update(every_value(document)))
    edit_json(outputs / "evaluation.json", lambda document: document.update(
        {key: every_value(value) for key, value in document.items() if key != "per_class"},
        per_class={key: every_value(value) for key, value in document["per_class"].items()}))
    edit_json(run_dir / "statistics.json", lambda document: document.update(every_value(document)))
    page = build(root, run_dir, capsys)
    assert "x-injected" not in tags_of(page) and "&lt;x-injected" in page
    assert page.count('class="pill err"') >= 18  # every tile's counts: 3 pills of 6 tiles, each a marked n/a
    assert '<span class="odd" title="not a number in the run file: ' in page
    assert "value(s) in the run's files are not the numbers expected" in page


@pytest.mark.browser
def test_a_meta_refresh_in_a_per_image_value_does_not_redirect_the_page(root, tmp_path, capsys):
    import time

    from browser import chromium_session, require_chromium

    require_chromium()
    run_dir = make_run_folder(tmp_path / "run", figures=False)
    (tmp_path / "pwned.html").write_text("<title>pwned</title>")
    refresh = f'<meta http-equiv="refresh" content="0;url={(tmp_path / "pwned.html").as_uri()}">'
    edit_json(run_dir / "outputs" / "evaluation_images.json", lambda d: d["images"][0].update(false=refresh))
    build(root, run_dir, capsys)
    with chromium_session(tmp_path) as browser:
        browser.get((run_dir / "outputs" / "report.html").as_uri())
        time.sleep(1.5)
        assert browser.current_url.endswith("/report.html") and browser.title.startswith("Run report")
        assert "n/a false" in browser.find_element("css selector", ".tile").text


def test_values_of_the_wrong_type_are_left_out_with_a_note_not_a_traceback(root, tmp_path, capsys):
    run_dir = make_run_folder(tmp_path / "run", figures=False)
    outputs = run_dir / "outputs"
    edit_json(outputs / "evaluation.json", lambda d: (d["compliance"].update(error_points="big"),
                                                      d["compliance"]["true"].update(percent_properly_masked="<b>x</b>"),
                                                      d.update(confusion_matrix={"labels": "x", "matrix": [[1, "a"]]})))
    edit_json(outputs / "evaluation_images.json", lambda d: d["images"][0].update(missed="3"))
    edit_json(outputs / "best_hpo_params.json", lambda d: d.update(params=[1, 2], workers=["w"]))
    edit_json(outputs / "model_run.json", lambda d: d.update(inputs_sha256=12345, packages=["torch"]))
    edit_json(run_dir / "statistics.json", lambda d: d.update(jobs="x"))
    page = build(root, run_dir, capsys)
    for said in ("evaluation.json: compliance.error_points: &#x27;big&#x27; is not a number; left out",
                 "best_hpo_params.json: params: [1, 2] is not a mapping; left out",
                 "best_hpo_params.json: workers[]: &#x27;w&#x27; is not a mapping; left out",
                 "statistics.json: jobs: &#x27;x&#x27; is not a list; left out"):
        assert said in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
    assert '<code title=\'12345\'>12345</code>' in page
    (outputs / "evaluation.json").write_text('{"map": ' + "9" * 5000 + "}")  # over Python's int digit limit
    page = build(root, run_dir, capsys)
    assert "evaluation.json: evaluation is not valid JSON (Exceeds the limit" in page


@pytest.mark.parametrize("replacement", ["x", [1], {"k": 1}, None, True, float("inf"), 10 ** 400],
                         ids=["text", "list", "mapping", "null", "bool", "infinity", "huge-int"])
def test_any_value_replaced_by_any_type_still_gives_a_page(tmp_path, replacement):
    import json

    from utils.reporting.html_report import build_report
    from utils.reporting.run_folder import read_run_folder

    run_dir = make_run_folder(tmp_path / "run", figures=False)

    def replaced(value, depth):
        if depth == 0:
            return replacement
        if isinstance(value, dict):
            return {key: replaced(item, depth - 1) for key, item in value.items()}
        if isinstance(value, list):
            return [replaced(item, depth - 1) for item in value]
        return value

    files = [run_dir / "outputs" / name for name in RUN_JSON] + [run_dir / "statistics.json"]
    originals = {path: json.loads(path.read_text()) for path in files}
    for depth in range(1, 5):
        for path, document in originals.items():
            path.write_text(json.dumps(replaced(document, depth)))
        page, _ = build_report(read_run_folder(run_dir))
        assert "</html>" in page, depth


def test_a_fifo_among_the_run_files_is_left_out_not_read(root, tmp_path):
    import os
    import subprocess
    import sys

    run_dir = make_run_folder(tmp_path / "run", figures=False)
    for name in ("outputs/evaluation_images.json", "outputs/train_metrics.csv", "split.csv", "statistics.json"):
        (run_dir / name).unlink()
        os.mkfifo(run_dir / name)
    os.mkfifo(run_dir / "outputs" / "annotated_fifo.jpg")
    os.mkfifo(run_dir / "outputs" / "annotated_fifo.tar")
    done = subprocess.run([sys.executable, root / "bin" / "report.py", run_dir], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr
    for name, what in (("outputs/evaluation_images.json", "per-image evaluation"), ("split.csv", "split table"),
                       ("statistics.json", "workflow statistics"),
                       ("outputs/annotated_fifo.tar", "annotated image archive")):
        assert f"{run_dir / name}: {what} is not a regular file; left out" in done.stderr


def test_figures_over_the_size_limit_are_left_out_before_they_are_read(tmp_path, monkeypatch):
    import tarfile
    from pathlib import Path

    from utils import defaults
    from utils.reporting.html_report import build_report
    from utils.reporting.run_folder import read_run_folder

    run_dir = make_run_folder(tmp_path / "run")
    monkeypatch.setattr(defaults, "REPORT_FIGURE_MAX_BYTES", 100)
    run = read_run_folder(run_dir)

    def never(*args, **kwargs):
        raise AssertionError("read a file over the limit")

    monkeypatch.setattr(Path, "read_bytes", never)
    monkeypatch.setattr(tarfile.TarFile, "extractfile", never)
    page, unreadable = build_report(run)
    assert len(unreadable) == len(FIGURE_NAMES) + 6, unreadable
    assert all("file too large to embed (0 MB; the limit is 0 MB)" in line for line in unreadable)
    assert "<img" not in page


def test_run_files_over_the_data_size_limit_are_left_out_before_they_are_read(tmp_path, monkeypatch):
    """A JSON, CSV or YAML run file larger than any job writes is a problem line, not a multi-GB json.load."""
    import json

    from utils import defaults
    from utils.reporting.run_folder import read_run_folder

    run_dir = make_run_folder(tmp_path / "run", figures=False)
    (run_dir / "config.yml").write_text("epochs: 2\n# " + "x" * 5000 + "\n")
    evaluation = run_dir / "outputs" / "evaluation.json"
    evaluation.write_text(json.dumps({**json.loads(evaluation.read_text()), "padding": "x" * 5000}))
    monkeypatch.setattr(defaults, "REPORT_DATA_MAX_BYTES", 4096)
    run = read_run_folder(run_dir)
    assert run.evaluation is None and run.config_source != "config.yml"
    left_out = [p for p in run.problems if "read at most; left out" in p]
    assert any(p.startswith(f"{evaluation}: evaluation of 0 MB, over the 0 MB") for p in left_out), run.problems
    assert any(p.startswith(f"{run_dir / 'config.yml'}: configuration of") for p in left_out), run.problems
    monkeypatch.setattr(defaults, "REPORT_DATA_MAX_BYTES", 10**6)
    again = read_run_folder(run_dir)
    assert again.evaluation["padding"] == "x" * 5000 and again.config_source == "config.yml"


def test_csv_files_without_their_columns_or_rows_are_said_not_shown_as_zeros(root, tmp_path, capsys):
    run_dir = make_run_folder(tmp_path / "run", figures=False)
    outputs = run_dir / "outputs"
    (outputs / "class_distribution.csv").write_text("a,b\n1,2\n")  # the table showed 0 faces of every class
    (outputs / "train_metrics.csv").write_text("epoch,lr,train_loss\n")  # the page said train had not finished
    (run_dir / "split.csv").write_text("garbage\nx\n")  # the split line was left out, unsaid
    assert run_script(root, "report", [run_dir]) == 0
    err = capsys.readouterr().err
    page = (outputs / "report.html").read_text()
    for said in (f"{outputs / 'class_distribution.csv'}: class distribution lacks column(s) split, class, objects, "
                 "images (its header: a,b); left out",
                 f"{outputs / 'train_metrics.csv'}: training metrics holds no rows; left out",
                 f"{run_dir / 'split.csv'}: split table lacks column(s) split (its header: garbage); left out"):
        assert f"report: warning: {said}" in err and said in page
    assert "Objects per class (images holding the class)" not in page
    assert "the train job has not finished" not in page and "cannot be used: see the problems" in page


def test_an_output_that_is_a_folder_or_under_a_file_names_that_path_not_a_temporary_file(root, tmp_path, capsys):
    from utils.atomic import write_text

    run_dir = make_run_folder(tmp_path / "run", figures=False)
    folder, file = tmp_path / "taken", tmp_path / "file.txt"
    folder.mkdir()
    file.write_text("x")
    with pytest.raises(IsADirectoryError, match="a folder, not a file to write") as caught:
        write_text(folder, "page")
    assert caught.value.filename == str(folder)
    with pytest.raises(NotADirectoryError, match="a file, not a folder to write page.html in") as caught:
        write_text(file / "sub" / "page.html", "page")
    assert caught.value.filename == str(file)
    capsys.readouterr()
    assert run_script(root, "report", [run_dir, "--output", folder]) == 2  # said: .taken.x1y2z3a4.tmp: Is a directory
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"report: error: {folder}: a folder, not a file to write"
    # it said: file.txt: File exists
    assert run_script(root, "compare_runs", [run_dir, "--output", file / "runs.csv"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"compare_runs: error: {file}: a file, not a folder to write runs.csv in"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_video_summary_whose_tag_ends_in_run_is_not_read_as_a_run_record(tmp_path):
    """A video of --pred-videos named entrance_run.mp4 writes video_summary_entrance_run.json, which ends like a run
    record: the page listed it among the jobs' records (job '?') and its rebuilt configuration gave it a job of
    its own ('video_summary_entrance: ? ...')."""
    import json

    from utils.reporting.html_report import build_report
    from utils.reporting.run_folder import read_run_folder

    run_dir = make_run_folder(tmp_path / "run", figures=False)
    summary = {"source": "entrance_run.mp4", "frames_read": 4, "frames_processed": 4,
               "overall": {"faces": 2, "percent_properly_masked": 50.0}, "resampling": {"block_frames": 1},
               "estimate": {"method": "cc", "percent": 50.0, "low": 0.0, "high": 100.0, "units": 4}}
    (run_dir / "outputs" / "video_summary_entrance_run.json").write_text(json.dumps(summary))
    run = read_run_folder(run_dir)
    assert list(run.videos) == ["video_summary_entrance_run.json"]
    assert not any(name.startswith("video_summary") for name in run.run_records), sorted(run.run_records)
    page, _ = build_report(run)
    assert "Video <code>entrance_run.mp4</code>" in page and "<td class=\"text\">video_summary_entrance_run" not in page


def test_a_percent_too_large_for_one_decimal_still_gives_a_page(tmp_path):
    """A finite percent of 1e28 or more (a damaged or hostile compliance.json, video summary, ...) ended bin/report.py
    in decimal.InvalidOperation: one_decimal quantized it in Decimal's default 28-digit context."""
    import json

    from utils.figures import one_decimal
    from utils.reporting.html_report import build_report
    from utils.reporting.run_folder import read_run_folder

    assert one_decimal(1e308) == f"{1e308:.1f}" and one_decimal(6.25) == "6.3"
    run_dir = make_run_folder(tmp_path / "run", figures=False)
    edit_json(run_dir / "outputs" / "compliance.json", lambda d: d["estimate"].update(percent=1e308))
    (run_dir / "outputs" / "video_summary.json").write_text(json.dumps(
        {"source": "gate.mp4", "overall": {"faces": 2, "percent_properly_masked": 1e300},
         "estimate": {"method": "cc", "percent": 50.0, "low": 1e300, "high": 1e308, "units": 4}}))
    page, _ = build_report(read_run_folder(run_dir))
    assert "</html>" in page
