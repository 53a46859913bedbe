"""The words for the two figures of a set of photos (utils/figures.py): "properly masked" names the headline estimate
alone (quantify.estimate, with its interval); the plain count of the faces kept at the threshold (cc) is named as
what it is. The printed line said '41.9% properly masked (95% interval ...)' of the estimate while the report's
prediction set and the service's page called the count '45.8% properly masked': two figures, one name."""

from __future__ import annotations

import html
import json
import re

from helpers import run_script

from utils.figures import BELOW_ONLY, KEPT_MASKED, NO_FACE_KEPT, kept_text

# a percent (with its interval, where one follows) shown right before the words "properly masked"
NAMED_PROPERLY_MASKED = re.compile(r"(\d+\.\d)%(?: \([^)]*\))?(?: predicted)? properly masked")


def test_the_words_are_the_ones_defined_and_the_page_writes_them_as_they_are(root):
    assert kept_text(45.83) == "45.8% with_mask among the faces kept at the threshold (cc)"
    assert kept_text(None) == "no face kept at the threshold"
    page = (root / "utils" / "service" / "page.html").read_text()
    words = [line for line in page.splitlines() if line.startswith("const WORDS = ")]
    assert words == [f"const WORDS = {{kept: {json.dumps(KEPT_MASKED)}, noneKept: {json.dumps(NO_FACE_KEPT)}, "
                     f"below: {json.dumps(BELOW_ONLY)}}};"]


def test_the_service_page_says_properly_masked_of_the_servers_estimate_alone(root):
    """The page's count (its Overall line, each photo's card) is the faces kept at the slider's threshold: it read
    'Overall: 45.8% of 24 faces properly masked' beside 'Estimate 41.9% (95% interval ...)'."""
    from test_figure_display import page_functions

    page = (root / "utils" / "service" / "page.html").read_text()
    estimate_text = page_functions(root, "interval").split("\nconst WORDS = ")[0]
    assert "properly masked" in estimate_text  # the estimate's interval: 'the true share of properly masked faces'
    elsewhere = page.replace(estimate_text, "")
    assert "properly masked" not in elsewhere
    render = page_functions(root, "render")
    assert "${WORDS.kept}" in render and "pct(c)" in render


def test_the_report_says_properly_masked_of_the_estimate_alone(root, tmp_path, capsys):
    """The report's prediction set, its predicted photos' captions and its evaluation card gave the count at the
    threshold as 'properly masked' beside the headline estimate: here the count 45.8 % and the estimate 41.9 %."""
    from run_folders import estimate_record, make_run_folder

    run_dir = make_run_folder(tmp_path / "run", hpo=False, statistics=False, figures=False)
    path = run_dir / "outputs" / "evaluation.json"  # the test set: count 77.0 % at the threshold, estimate 74.2 %
    evaluation = json.loads(path.read_text())
    evaluation["quantification"]["estimate"] = estimate_record("pacc2", 74.2, 70.1, 78.3, 6)
    path.write_text(json.dumps(evaluation))
    path = run_dir / "outputs" / "compliance.json"
    written = json.loads(path.read_text())
    written["overall"].update(counts={"with_mask": 11, "without_mask": 13, "mask_weared_incorrect": 0},
                              percent_properly_masked=45.83)
    path.write_text(json.dumps({**written, "estimate": estimate_record("pacc2", 41.94, 30.1, 52.2, 6)}))
    assert run_script(root, "report", [run_dir]) == 0
    capsys.readouterr()
    shown = html.unescape(re.sub(r"<[^>]+>", "", (run_dir / "outputs" / "report.html").read_text()))
    assert "45.8% with_mask among the faces kept at the threshold (cc)" in shown  # the prediction set's count
    assert "With_mask at the threshold (predicted, cc)77.0%" in shown  # the evaluation card's count
    named = set(NAMED_PROPERLY_MASKED.findall(shown))
    assert named and named <= {"74.2", "41.9"}, named  # the test set's estimate and the prediction set's: no count
    assert "45.8% properly masked" not in shown and "Properly masked (predicted)" not in shown
    # a predicted photo's caption (shown where the run has no evaluation): its count, not "properly masked"
    for name in ("evaluation.json", "evaluation_images.json"):
        (run_dir / "outputs" / name).unlink()
    assert run_script(root, "report", [run_dir]) == 0
    capsys.readouterr()
    shown = html.unescape(re.sub(r"<[^>]+>", "", (run_dir / "outputs" / "report.html").read_text()))
    assert "50.0% with_mask among the faces kept at the threshold (cc)" in shown
    assert not NAMED_PROPERLY_MASKED.search(shown.replace("41.9% (95% interval 30.1–52.2%) properly masked", ""))


def test_the_count_at_the_threshold_gives_the_thresholds_value_in_the_report(root, tmp_path, capsys):
    """'45.8% with_mask among the faces kept at the threshold (cc)' named no threshold in the report's prediction set
    and video paragraphs: the reader could not tell which one without opening compliance.json."""
    from run_folders import make_run_folder

    from utils.reporting.html_parts import video_paragraphs

    run_dir = make_run_folder(tmp_path / "run", hpo=False, statistics=False, figures=False)
    path = run_dir / "outputs" / "compliance.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "score_threshold": 0.35}))
    assert run_script(root, "report", [run_dir]) == 0
    capsys.readouterr()
    shown = html.unescape(re.sub(r"<[^>]+>", "", (run_dir / "outputs" / "report.html").read_text()))
    assert "50.0% with_mask among the faces kept at the threshold (cc), score threshold 0.35;" in shown
    video = {"source": "cam.mp4", "frames_processed": 4, "frames_read": 8, "score_threshold": 0.45,
             "overall": {"faces": 3, "percent_properly_masked": 66.67}, "estimate": {}}
    assert "with_mask among the faces kept at the threshold (cc), score threshold 0.45." in video_paragraphs("v", video)


def test_the_plots_words_for_the_count_fit_their_axes_and_count_one_face_as_one(tmp_path, monkeypatch):
    """The video plot's axis label on one line ran far past the 4-inch axes ('% with_mask among the faces kept at the
    threshold (cc), 3 frames pooled a point'); the per-folder plot wrote '1 faces kept'."""
    from utils.detection import plots

    drawn = {}
    monkeypatch.setattr(plots, "_write_figure", lambda fig, path: drawn.update(fig=fig))
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.update(fig=fig))
    for frames in (3, 5000):  # a point a frame, and frames pooled a point
        plots.plot_compliance_over_time([0.2 * i for i in range(frames)], [50.0] * frames, [2] * frames,
                                        tmp_path / "t.png", "clip.mp4", with_mask=[1] * frames)
        fig = drawn["fig"]
        renderer = fig.canvas.get_renderer()
        label, axes = fig.axes[0].yaxis.label.get_window_extent(renderer), fig.axes[0].get_window_extent(renderer)
        assert label.height <= axes.height, (frames, fig.axes[0].get_ylabel())
        plots.plt.close(fig)
    one = {"percent": 100.0, "low": None, "high": None, "units": 1, "unit": "image", "faces_found": 1,
           "note": "one image: no interval", "method": "cc", "confidence": 0.95}
    plots.plot_compliance_by_folder({"siteA": one}, one, tmp_path / "f.png")
    assert [t.get_text() for t in drawn["fig"].axes[0].texts] == [
        "100.0% (one image: no interval), 1 image, 1 face kept at the threshold"]
    plots.plt.close(drawn["fig"])


def test_the_reports_estimate_names_its_method_in_words_and_an_older_file_without_them_reads_as_before(
        root, tmp_path, capsys):
    """'Estimate (pacc2)' left a reader to know what pacc2 is: the line now gives the words the estimate holds
    (quantify.METHOD_NAMES); a compliance.json or video_summary.json written before holds none, and its line reads
    as it did. The words are escaped as the rest of the line."""
    from run_folders import estimate_record, make_run_folder

    from utils.reporting.html_parts import estimate_paragraph, video_paragraphs

    run_dir = make_run_folder(tmp_path / "run", hpo=False, statistics=False, figures=False)
    path = run_dir / "outputs" / "compliance.json"
    written = json.loads(path.read_text())
    older = {key: value for key, value in estimate_record("cc", 50.0, 41.5, 58.5, 6).items() if key != "estimator"}
    for estimate, shown in ((estimate_record("pacc2", 41.94, 30.1, 52.2, 6),
                             "<p>Estimate (pacc2, adjusted probabilistic count, masked or not): <b>41.9% (95% "),
                            (older, "<p>Estimate (cc): <b>50.0% (95% interval 41.5&ndash;58.5%)</b> over 6 images.")):
        path.write_text(json.dumps({**written, "estimate": estimate}))
        assert run_script(root, "report", [run_dir]) == 0
        capsys.readouterr()
        assert shown in (run_dir / "outputs" / "report.html").read_text()
    video = video_paragraphs("video_summary.json", {"estimate": older, "resampling": {"block_frames": 1}})
    assert "<p>Estimate (cc): <b>50.0% (95% interval 41.5&ndash;58.5%)</b> over 6 blocks of 1 processed" in video
    odd = estimate_paragraph({**older, "estimator": "<b>odd</b> & co"}, "6 images")
    assert odd.startswith("<p>Estimate (cc, &lt;b&gt;odd&lt;/b&gt; &amp; co): <b>50.0% ")
