"""The percent properly masked as it is shown: to one decimal alike in the printed line, evaluation.txt, the
report, the service's page and the plots (ties rounded as JavaScript's toFixed does), with the headline
estimator's interval, a figure with no face at the threshold said so, and names drawn as they are."""

from __future__ import annotations

import json
import shutil

from helpers import run_script


def test_the_plot_per_folder_draws_folder_names_as_they_are(tmp_path, monkeypatch):
    from utils.detection import plots

    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.update(
        labels=[label.get_text() for label in fig.axes[0].get_yticklabels()], fig=fig))
    result = {"percent": 50.0, "low": 10.0, "high": 90.0, "units": 2, "unit": "image", "faces_found": 4,
              "method": "cc", "confidence": 0.95}
    plots.plot_compliance_by_folder({"cost $5 and $6": result, "x$\\foo$": result}, result, tmp_path / "f.png")
    assert drawn["labels"] == ["cost $5 and $6", "x$\\foo$"]
    drawn["fig"].canvas.draw()  # math would be parsed here: '$\\foo$' is no symbol it knows
    assert not any(label.get_parse_math() for label in drawn["fig"].axes[0].get_yticklabels())


def test_the_plot_over_time_draws_a_video_named_like_math(tmp_path):
    from utils.detection.plots import plot_compliance_over_time

    plot_compliance_over_time([0.0, 1.0], [50.0, None], [2, 0], tmp_path / "t.png", "clips/x$\\foo$.mp4")
    assert (tmp_path / "t.png").stat().st_size > 0


TIES = (6.25, 0.25, 18.75, 28.15, 0.05, 99.95, 100.0, 0.0, 12.35, 43.75, 56.25, 81.25)
# what node 20's value.toFixed(1) writes for them (a float's exact value: 28.15 is 28.149999..., so 28.1)
TO_FIXED = ("6.3", "0.3", "18.8", "28.1", "0.1", "100.0", "100.0", "0.0", "12.3", "43.8", "56.3", "81.3")


def test_a_figure_reads_the_same_to_one_decimal_in_the_printed_line_the_report_and_the_page():
    """1 face of 16 properly masked is 6.25 %: the printed line and the report showed 6.2 % (Python rounds a tie
    to even), the service's page 6.3 % (toFixed rounds it up)."""
    from utils.detection.compliance import interval_text
    from utils.figures import one_decimal
    from utils.reporting.html_parts import interval, percent

    result = {"percent": 6.25, "low": 0.25, "high": 18.75, "confidence": 0.95, "units": 16, "unit": "image",
              "method": "cc"}
    assert interval_text(result) == "6.3% properly masked (95% interval 0.3-18.8%, 16 images; cc)"
    assert percent(6.25) == "6.3%" and interval(result) == "6.3% (95% interval 0.3&ndash;18.8%)"
    assert tuple(one_decimal(value) for value in TIES) == TO_FIXED
    node = shutil.which("node")
    if node is not None:  # and against a JavaScript engine's own, where one is installed
        import subprocess

        page = subprocess.run([node, "-e", f"console.log({list(TIES)}.map((v) => v.toFixed(1)).join(' '))"],
                              capture_output=True, text=True, check=True, timeout=30).stdout.split()
        assert list(TO_FIXED) == page


def page_functions(root, *names) -> str:
    """The service page's own JavaScript functions *names* (those it has), to run in node."""
    lines, found, inside = (root / "utils" / "service" / "page.html").read_text().splitlines(), [], False
    for line in lines:
        if line.startswith("const WORDS = "):  # the page's words (utils/figures.py's), which its functions show
            found.append(line)
            continue
        inside = inside or any(line.startswith(f"function {name}(") for name in names)
        if inside:
            found.append(line)
            inside = not (line == "}" or line.startswith("function ") and line.endswith("}"))
    return "\n".join(found)


def test_a_percent_from_counts_reads_on_the_page_and_in_the_plots_as_its_stored_figure_in_the_report(
        root, tmp_path, monkeypatch):
    """7 of 13 faces properly masked is 53.846 %, stored 53.85: the printed line and the report show 53.9, the
    page rounded the counts' own 53.846 to 53.8; the plots' legends rounded a tie to even (6.25 to 6.2)."""
    import matplotlib.pyplot as plt

    from utils.detection import plots
    from utils.detection.compliance import compliance
    from utils.reporting.html_parts import percent

    stored = compliance(["with_mask"] * 7 + ["without_mask"] * 6)["percent_properly_masked"]
    assert stored == 53.85 and percent(stored) == "53.9%"
    legends = []

    def legend_of(fig, path):
        legends.extend(text.get_text() for text in fig.axes[0].get_legend().get_texts())
        plt.close(fig)

    monkeypatch.setattr(plots, "_save", legend_of)
    result = {"percent": 6.25, "low": 0.25, "high": 18.75, "confidence": 0.95, "units": 16, "unit": "image",
              "method": "cc", "faces_found": 16}
    plots.plot_compliance_histogram([50.0, 0.0], tmp_path / "histogram.png", 6.25, 0)
    plots.plot_compliance_by_folder({"a": result, "b": result}, result, tmp_path / "folders.png")
    assert legends == ["all faces pooled: 6.3%", "all folders: 6.3%"]
    page = (root / "utils" / "service" / "page.html").read_text()
    assert page.count("toFixed(1)") == 1  # every one-decimal percent on the page goes through the one function
    node = shutil.which("node")
    if node is not None:  # the page's own functions, where a JavaScript engine is installed
        import subprocess

        from utils.classes import CLASSES

        script = (f"const state = {{model: {{classes: {json.dumps(list(CLASSES))}}}}};\n"
                  + page_functions(root, "oneDecimal", "compliance", "pct")
                  + '\nconst d = (label, n) => Array.from({length: n}, () => ({label, score: 0.9}));'
                  + '\nconsole.log(pct(compliance([...d("with_mask", 7), ...d("without_mask", 6)], 0.5)));')
        shown = subprocess.run([node, "-e", script], capture_output=True, text=True, check=True, timeout=30).stdout
        assert shown.strip() == "53.9% with_mask among the faces kept at the threshold (cc)"


def test_the_reports_summary_card_shows_the_evaluations_interval_to_one_decimal_as_every_output_does(
        root, tmp_path, capsys):
    from run_folders import make_run_folder

    run_dir = make_run_folder(tmp_path / "run", hpo=False, statistics=False, figures=False)
    path = run_dir / "outputs" / "evaluation.json"
    evaluation = json.loads(path.read_text())
    evaluation["quantification"]["estimate"].update(low=0.25, high=18.75)
    path.write_text(json.dumps(evaluation))
    assert run_script(root, "report", [run_dir]) == 0
    capsys.readouterr()
    assert "cc estimate 77.0% (95% interval 0.3&ndash;18.8%)" in (run_dir / "outputs" / "report.html").read_text()


def test_the_reports_predicted_card_gives_the_headline_estimators_interval_with_its_own_figure(
        root, tmp_path, capsys):
    """The card's figure is the count at the threshold (cc); the headline estimator (pacc2 by default) has its own
    figure: its interval was put beside the count's ('60.0% ... 95% interval 70.1-78.3% (pacc2)'), which it need
    not hold."""
    from run_folders import estimate_record, make_run_folder

    from utils.figures import one_decimal

    run_dir = make_run_folder(tmp_path / "run", hpo=False, statistics=False, figures=False, compliance_error=-15.0)
    path = run_dir / "outputs" / "evaluation.json"
    evaluation = json.loads(path.read_text())
    evaluation["quantification"]["estimate"] = estimate_record("pacc2", 74.2, 70.1, 78.3, 6)
    path.write_text(json.dumps(evaluation))
    assert run_script(root, "report", [run_dir]) == 0
    capsys.readouterr()
    page = (run_dir / "outputs" / "report.html").read_text()
    card = page[page.index("With_mask at the threshold (predicted, cc)"):page.index("Compliance error")]
    counted = one_decimal(evaluation["compliance"]["predicted"]["percent_properly_masked"])
    assert f">{counted}%<" in card and counted not in ("74.2", "70.1", "78.3")
    assert "pacc2 estimate 74.2% (95% interval 70.1&ndash;78.3%)" in card


def test_a_figure_with_no_face_at_the_threshold_says_so_in_the_report_and_on_the_page(root, tmp_path, capsys):
    """The score sums (pcc, pacc, pacc2) reach under the threshold: with no face at it, the report and the page
    showed '0 faces ... n/a' beside 'Estimate 60.0%' as if the figure were of faces counted (the printed line:
    tests/test_metrics.py)."""
    from run_folders import estimate_record, make_run_folder

    estimate = {**estimate_record("pcc", 60.0, 60.0, 60.0, 5), "faces_found": 0}
    run_dir = make_run_folder(tmp_path / "run", hpo=False, statistics=False, figures=False)
    path = run_dir / "outputs" / "compliance.json"
    written = json.loads(path.read_text())
    written["overall"] = {"faces": 0, "counts": {"with_mask": 0, "without_mask": 0, "mask_weared_incorrect": 0},
                          "percent_properly_masked": None}
    path.write_text(json.dumps({**written, "estimate": estimate}))
    assert run_script(root, "report", [run_dir]) == 0
    capsys.readouterr()
    assert ("; no face kept at the threshold: the estimate reads the scores below it."
            in (run_dir / "outputs" / "report.html").read_text())
    node = shutil.which("node")
    if node is not None:  # the page's own functions, where a JavaScript engine is installed
        import subprocess

        script = ("const esc = (text) => String(text);\n" + page_functions(root, "oneDecimal", "interval")
                  + f"\nconst state = {{estimate: {{threshold: 0.5, figure: {json.dumps(estimate)}}}}};"
                  + "\nconsole.log(interval(0.5));")
        shown = subprocess.run([node, "-e", script], capture_output=True, text=True, check=True, timeout=30).stdout
        assert shown.startswith("Estimate (no face kept at the threshold; the estimate reads the scores below it): "
                                "60.0% (95% interval 60.0–60.0%; 5 images; pcc)")


def test_evaluation_txt_shows_the_figures_to_one_decimal_as_the_report_does():
    from utils.detection.compliance import compliance_error_lines
    from utils.detection.evaluation import estimate_lines

    result = {"method": "cc", "percent": 6.25, "low": 0.25, "high": 18.75, "error_points": -0.05,
              "truth_inside": True, "replicates": 1000, "seed": 42, "units": 16}
    lines = estimate_lines({"true_percent": 56.25, "true_faces": 16, "estimate": result, "estimates": {"cc": result},
                            "unavailable": {}})
    assert "(true: 56.3% of 16 faces" in lines[0] and lines[2].split()[:3] == ["cc", "6.3", "0.3-18.8"]
    assert "faces in 16 images;" in lines[0]  # the images the figures rest on: it said the faces alone
    summary = {"faces": 16, "counts": {"with_mask": 1, "without_mask": 15, "mask_weared_incorrect": 0},
               "percent_properly_masked": 6.25}
    error = {"score_threshold": 0.5, "true": summary, "predicted": summary, "error_points": 0.0,
             "per_image_mae_points": None, "images_compared": 0, "images_without_detections": 0,
             "images_without_faces": 0}
    assert any(line.split()[-2:] == ["6.3%", "6.3%"] for line in compliance_error_lines(error))


def test_evaluation_txt_does_not_call_the_count_the_headline_where_the_headline_is_another_estimator():
    """evaluation.txt titled the count at the threshold (cc) 'the headline figure', above a table whose last line
    reads 'headline estimator: pacc2' with another figure."""
    from utils.detection.compliance import compliance_error_lines

    summary = {"faces": 16, "counts": {"with_mask": 1, "without_mask": 15, "mask_weared_incorrect": 0},
               "percent_properly_masked": 6.25}
    title = compliance_error_lines({"score_threshold": 0.5, "true": summary, "predicted": summary, "error_points": 0.0,
                                    "per_image_mae_points": None, "images_compared": 0,
                                    "images_without_detections": 0, "images_without_faces": 0})[0]
    assert "headline figure" not in title and "cc" in title


def test_the_plot_per_folder_draws_an_interval_that_does_not_hold_its_own_figure(tmp_path):
    """A percentile bootstrap interval need not hold its estimate (acc: 99.59 % with 0.0-97.89 % on 2 random images
    of /work/tmp/figure_audit/interval_order.py's search); drawn as error bars about the figure, its negative length
    made matplotlib refuse the plot (ValueError), which ends predict and merge_predictions with no output."""
    from utils.detection import plots

    odd = {"percent": 99.59, "low": 0.0, "high": 97.89, "units": 2, "unit": "image", "faces_found": 5,
           "method": "acc", "confidence": 0.95}
    plots.plot_compliance_by_folder({"a": odd, "b": {**odd, "percent": 50.0}}, odd, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0


def test_evaluation_txt_says_why_an_estimate_has_no_figure_or_no_interval():
    """evaluation.txt's table read n/a where the report's table, the printed line and the page give the reason."""
    from utils.detection.evaluation import estimate_lines

    base = {"error_points": None, "truth_inside": None, "replicates": 1000, "seed": 42, "low": None, "high": None,
            "units": 5}
    none = {**base, "method": "pacc2", "percent": None, "note": "no faces found"}
    flat = {**base, "method": "cc", "percent": 60.0, "error_points": 0.0,
            "note": "no interval: every resample of the 5 images gives 60%, which shows no spread, not certainty"}
    lines = estimate_lines({"true_percent": 60.0, "true_faces": 7, "estimate": flat,
                            "estimates": {"cc": flat, "pacc2": none}, "unavailable": {}})
    assert any(line.split()[0] == "cc" and "no spread, not certainty" in line for line in lines)
    assert any(line.split()[0] == "pacc2" and line.endswith("no faces found") for line in lines)


def test_predict_videos_line_gives_the_mean_per_frame_to_one_decimal_as_a_percent_or_says_there_is_none():
    """predict_video printed the mean of the frames' figures as stored, 'mean per frame 47.25' (no '%', two decimals
    where every percent shown has one), and 'mean per frame None' where no frame held a face."""
    from utils.detection.compliance import compliance, video_compliance_line

    estimate = {"method": "cc", "percent": 46.25, "low": 30.0, "high": 60.0, "confidence": 0.95, "units": 4,
                "unit": "block", "faces_found": 8}
    summary = {"overall": compliance(["with_mask"] * 3 + ["without_mask"] * 5), "estimate": estimate,
               "frames_processed": 40, "resampling": {"block_frames": 10}, "mean_percent_per_frame": 47.25}
    assert video_compliance_line(summary) == (
        "compliance: 8 faces, 3 with_mask, 5 without_mask, 0 mask_weared_incorrect: 46.3% properly masked (95% "
        "interval 30.0-60.0%, 4 blocks; cc) (pooled over 40 frames, resampled in blocks of 10; mean per frame 47.3%)")
    none = {**summary, "overall": compliance([]), "mean_percent_per_frame": None,
            "estimate": {**estimate, "percent": None, "low": None, "high": None, "note": "no faces found"}}
    assert video_compliance_line(none).endswith("4 blocks; cc) (pooled over 40 frames, resampled in blocks of 10; "
                                                "mean per frame n/a: no frame with a face counted)")


def test_the_plot_per_folder_gives_each_folders_figure_and_interval_in_numbers_or_why_none(tmp_path, monkeypatch):
    """Each folder was a dot and a bar with '6 images, 20 faces found' beside it: no figure to read, and a folder of
    one image a dot with no bar and no word of why."""
    from utils.detection import plots

    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.update(texts=[t.get_text() for t in fig.axes[0].texts]))
    result = {"percent": 41.87, "low": 18.75, "high": 69.4, "units": 6, "unit": "image", "faces_found": 20,
              "method": "pacc2", "confidence": 0.95}
    alone = {**result, "percent": 50.0, "low": None, "high": None, "units": 1, "faces_found": 2,
             "note": "one image: no interval"}
    plots.plot_compliance_by_folder({"siteA": result, "siteB": alone}, result, tmp_path / "f.png")
    assert drawn["texts"] == ["41.9% (18.8-69.4%), 6 images, 20 faces kept at the threshold",
                              "50.0% (one image: no interval), 1 image, 2 faces kept at the threshold"]
    # no face kept: '0 faces found' beside a figure read the scores below the threshold, so it says what it rests on
    plots.plot_compliance_by_folder({"siteC": {**result, "faces_found": 0}}, result, tmp_path / "g.png")
    assert drawn["texts"] == ["41.9% (18.8-69.4%), 6 images, no face kept at the threshold; the estimate reads the "
                              "scores below it"]
