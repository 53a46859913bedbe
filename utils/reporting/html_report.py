"""One self-contained HTML page per run: every figure embedded as a data: URI, CSS inline, no script,
nothing fetched. Plain string building with html.escape (no template engine is a dependency).

Sections: summary, data, HPO, training, evaluation, predictions (a grid of annotated images,
worst first, with their errors against the ground truth), job timings, provenance. A piece the
run lacks (no HPO, no statistics yet) is said where it would be, never an error. The page stays
small: figures are downscaled and the grid holds at most GRID_IMAGES images.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from .. import defaults as D
from ..classes import CLASSES
from .html_parts import (CSS, IMAGE_READ_ERRORS, KEPT_MASKED, ODD_CLASS, card, count, esc, estimate_paragraph,
                         estimates_table, files_listed, image_data_uri, interval, note, number, percent, points,
                         run_with, seconds_text, setting, table, test_split_predicted, videos_part)
from .run_folder import (FIGURES, FOLD_FIGURES, KFOLD_SUMMARY, RunFolder, figure_title, image_errors_by_stem,
                         predicted_by_stem, read_bounded, video_plot_name)
from .values import Fields, entries, mapping, num, num_text, text

GRID_IMAGES = 24          # annotated images on the page at most
FIGURE_MAX_PX = 1100      # widest embedded figure (laptop screens show ~1200 px of content)
THUMBNAIL_MAX_PX = 440    # annotated images in the grid
THUMBNAIL_QUALITY = 80
TRAIN_ROWS = 30           # epochs listed in full; longer runs show the first and last half of that
TRAIN_COLUMNS = ("epoch", "lr", "train_loss", "val_loss", "val_map", "val_map_50", "seconds", "backbone_frozen")


class Page:
    """Collects the sections, and the images that could not be embedded (said on the page)."""

    def __init__(self, run: RunFolder):
        self.run = run
        self.sections: list[tuple[str, str, str]] = []
        self.unreadable: list[str] = []
        self.fields = Fields()  # its notes: values of the wrong type in the run's files, said on the page

    def add(self, section_id: str, title: str, body: str) -> None:
        self.sections.append((section_id, title, body))

    def figure(self, name: str) -> str:
        path = self.run.figures.get(name)
        title, job = figure_title(name)
        if path is None:
            return note(f"<b>{esc(title)}</b>: no <code>{esc(name)}</code> in this run (the {esc(job)} job writes it).")
        try:
            uri = image_data_uri(read_bounded(path, D.REPORT_FIGURE_MAX_BYTES), FIGURE_MAX_PX)
        except IMAGE_READ_ERRORS as error:
            self.unreadable.append(f"{path}: {error}")
            return note(f"<code>{esc(path)}</code> cannot be read as an image ({esc(error)}).")
        return (f'<figure><img src="{uri}" alt="{esc(title)}"><figcaption>{esc(title)} '
                f'<span class="muted">({esc(name)})</span></figcaption></figure>')

    def figures(self, *names: str) -> str:
        single = " single" if len(names) == 1 else ""
        return f'<div class="figures{single}">' + "".join(self.figure(name) for name in names) + "</div>"


# ----------------------------------------------------------------------------- sections

def not_in_run(run: RunFolder, name: str, why: str) -> str:
    """The note where a run file's content would be: not in the run (*why*), or there but unusable (too large,
    not JSON: the problems at the top say which), which the page called unfinished too."""
    if name in run.missing:
        return note(f"No <code>{esc(name)}</code> in this run: {why}.")
    return note(f"<code>{esc(name)}</code> cannot be used: see the problems listed at the top.")


def summary_section(page: Page) -> None:
    run, evaluation, get = page.run, page.run.evaluation, page.fields
    parts = []
    if evaluation:
        compliance = get.dict(evaluation, "compliance", "evaluation.json: compliance")
        true = get.dict(compliance, "true", "evaluation.json: compliance.true")
        predicted = get.dict(compliance, "predicted", "evaluation.json: compliance.predicted")
        quantification = get.dict(evaluation, "quantification", "evaluation.json: quantification")
        headline = get.dict(quantification, "estimate", "evaluation.json: quantification.estimate")
        error = get.num(compliance, "error_points", "evaluation.json: compliance.error_points")
        parts.append('<div class="cards">' + "".join([
            card("mAP@[0.5:0.95]", number(evaluation.get("map")), "test set"),
            card("mAP@0.5", number(evaluation.get("map_50")), f"mAP@0.75 {number(evaluation.get('map_75'))}"),
            card("Properly masked (true)", percent(true.get("percent_properly_masked")),
                 f"{count(true.get('faces'))} labelled faces"),
            card("With_mask at the threshold (predicted, cc)", percent(predicted.get("percent_properly_masked")),
                 f"{count(predicted.get('faces'))} faces kept at score &ge; "
                 f"{number(compliance.get('score_threshold'), 2)}"
                 # the headline estimator's interval goes with its own figure: not the count's above (cc),
                 # which pacc2's interval need not hold
                 + (f"; {esc(text(headline.get('method')))} estimate {interval(headline)}"
                    if headline.get("percent") is not None else "")),
            card("Compliance error", points(compliance.get("error_points")),
                 "predicted &minus; true", "bad" if error is not None and abs(error) >= 5 else "good"),
            card("Per-image MAE", points(compliance.get("per_image_mae_points"), signed=False),
                 f"over {count(compliance.get('images_compared'))} images"),
        ]) + "</div>")
        per_class = get.dict(evaluation, "per_class", "evaluation.json: per_class")
        faces = get.dict(evaluation, "faces_per_class", "evaluation.json: faces_per_class")
        true_counts = get.dict(true, "counts", "evaluation.json: compliance.true.counts")
        predicted_counts = get.dict(predicted, "counts", "evaluation.json: compliance.predicted.counts")
        rows = [[esc(name), count(faces.get(name)), number(entry.get("ap")), number(entry.get("ap_50")),
                 number(entry.get("ap_75")), number(entry.get("recall")),
                 count(true_counts.get(name)), count(predicted_counts.get(name))]
                for name, entry in ((name, get.dict(per_class, name, f"evaluation.json: per_class.{name}"))
                                    for name in CLASSES)]
        parts.append("<h3>Per class (test set)</h3>" + table(
            ["class", "faces", "AP", "AP50", "AP75", "recall", "true count", "predicted count"], rows))
        if quantification:
            parts.append(estimates_table(quantification))
        parts.append(f'<p class="muted">{count(evaluation.get("num_images"))} test images, model '
                     f'<code>{esc(text(evaluation.get("model")))}</code> ({esc(text(evaluation.get("backbone")))}, '
                     f'trained at {count(evaluation.get("image_size"))} px, '
                     f'run at {count(evaluation.get("working_size", evaluation.get("image_size")))} px'
                     f'{run_with(evaluation)}), '
                     f'mean test loss {number(evaluation.get("test_loss"))}. '
                     f'Counts at the operating score threshold {number(compliance.get("score_threshold"), 2)}; '
                     f'mAP uses every detection.</p>')
    else:
        parts.append(not_in_run(page.run, "evaluation.json", "the evaluate job has not finished"))
    if run.compliance:
        overall = get.dict(run.compliance, "overall", "compliance.json: overall")
        counts = get.dict(overall, "counts", "compliance.json: overall.counts")
        skipped = get.dicts(run.compliance, "skipped", "compliance.json: skipped")
        parts.append("<h3>Prediction set</h3>" + f"<p>{count(run.compliance.get('num_images'))} images in "
                     f"{count(run.compliance.get('num_parts', 1))} part(s): {count(overall.get('faces'))} faces ("
                     + ", ".join(f"{count(counts.get(name, 0))} {esc(name)}" for name in CLASSES)
                     + f"), <b>{percent(overall.get('percent_properly_masked'))}</b> {KEPT_MASKED}, score threshold "
                     f"{number(run.compliance.get('score_threshold'), 2)}; {len(skipped)} file(s) skipped.</p>")
        if skipped:  # named as the evaluation's are: the count alone left a reader to find compliance.json
            parts.append(files_listed(f"{len(skipped)} file(s) skipped", [skipped], "compliance.json"))
        estimate = get.dict(run.compliance, "estimate", "compliance.json: estimate")
        if estimate:
            below = num(overall.get("faces")) == 0 and num(estimate.get("percent")) is not None  # as predict says
            parts.append(estimate_paragraph(estimate, f"{count(estimate.get('units'))} images", below))
        if evaluation:  # the test split's photos again (no --pred-images): another figure, said why
            parts.append(test_split_predicted(mapping(run.config), mapping(run.preprocess_test).get("images_shrunk")))
    else:
        parts.append(not_in_run(run, "compliance.json", "the merge_predictions job has not finished"))
    parts.append(videos_part(run.videos, lambda name: page.figures(video_plot_name(name))))  # predict_video's
    page.add("summary", "Summary", "".join(parts))


def problems_list(page: Page, marked: int) -> str:
    """What the run lacks, what could not be read, and the values of the wrong type (*marked* of them marked
    n/a on the page), as one list at the top of the summary."""
    run, absent, odd = page.run, page.run.missing, page.fields.notes
    if not (absent or run.problems or page.unreadable or odd or marked):
        return ""
    items = "".join(f"<li><code>{esc(name)}</code> not in this run</li>" for name in absent)
    items += "".join(f"<li>{esc(problem)}</li>" for problem in run.problems + page.unreadable + odd)
    if marked:
        items += (f'<li>{marked} value(s) in the run\'s files are not the numbers expected: each is shown as a marked '
                  f'<span class="{ODD_CLASS}">n/a</span> (hover for the value)</li>')
    wrong = f", {len(odd) + marked} value(s) of the wrong type" if odd or marked else ""
    return (f"<details><summary>{len(absent)} file(s) missing, {len(run.problems) + len(page.unreadable)} "
            f"unreadable{wrong}</summary><ul>{items}</ul></details>")


def data_section(page: Page) -> None:
    run, parts = page.run, []
    if run.validation:
        validation = run.validation
        excluded = page.fields.list(validation, "images_excluded", "validation_report.json: images_excluded")
        parts.append(f"<p>Data: <code>{esc(text(validation.get('images_dir')))}</code>: "
                     f"{count(validation.get('images_usable'))} usable of "
                     f"{count(validation.get('images_total'))} "
                     f"images ({len(excluded)} excluded), "
                     f"{count(validation.get('objects_kept'))} objects kept.</p>")
    if run.split_counts:
        parts.append("<p>Split: " + ", ".join(f"{esc(split)} {count}" for split, count in run.split_counts.items())
                     + " images.</p>")
    parts.append(page.figures("class_distribution.png"))
    if run.class_distribution:
        splits = list(dict.fromkeys(text(row.get("split"), "?") for row in run.class_distribution))
        cells = {(text(row.get("split"), "?"), row.get("class")): row for row in run.class_distribution}
        rows = [[esc(name)] + [f"{count(num_text(cells.get((split, name), {}).get('objects', 0)))} "
                               f"<span class='muted'>({count(num_text(cells.get((split, name), {}).get('images', 0)))}"
                               " img)</span>"
                               for split in splits] for name in CLASSES]
        parts.append("<h3>Objects per class (images holding the class)</h3>"
                     + table(["class", *map(esc, splits)], rows))
    page.add("data", "Data", "".join(parts))


def hpo_section(page: Page) -> None:
    hpo, parts = page.run.hpo, []
    if not hpo:
        page.add("hpo", "HPO", not_in_run(page.run, "best_hpo_params.json",
                                          "no hyperparameter search ran, or it has not finished"))
        return
    get, where = page.fields, "best_hpo_params.json"
    params = get.dict(hpo, "params", f"{where}: params")
    parts.append(f"<p>Best trial: {esc(text(hpo.get('objective'), 'objective'))} = "
                 f"<b>{number(hpo.get('value'), 4)}</b> "
                 f"(worker {count(hpo.get('worker_index'))}, trial {count(hpo.get('trial'))}); "
                 f"{esc(text(hpo.get('objective_description'), ''))}.</p>")
    metrics = get.dict(hpo, "metrics", f"{where}: metrics")
    parts.append('<div class="figures"><div>' + "<h3>Best parameters</h3>"
                 + table(["parameter", "value"], [[esc(k), setting(v)] for k, v in params.items()])
                 + "<h3>Its validation metrics</h3>"
                 + table(["metric", "value"], [[esc(k), number(v, 4)] for k, v in metrics.items()])
                 + "</div><div>")
    workers = get.dicts(hpo, "workers", f"{where}: workers")
    if workers:
        parts.append("<h3>Workers</h3>" + table(
            ["result", "best value", "complete", "pruned", "failed"],
            [[esc(text(w.get("file"), "?")), number(w.get("best_value"), 4),
              *(count(get.dict(w, "trial_counts", f"{where}: workers[].trial_counts").get(state))
                for state in ("complete", "pruned", "fail"))]
             for w in workers]))
    fixed = get.dict(hpo, "fixed_params", f"{where}: fixed_params")
    if fixed:
        parts.append("<h3>Fixed during the search</h3>" + table(["setting", "value"],
                                                               [[esc(k), setting(v)] for k, v in fixed.items()]))
    parts.append("</div></div>")
    for name, said in get.dict(hpo, "plot_notes", f"{where}: plot_notes").items():
        parts.append(note(f"<code>{esc(name)}</code>: {esc(text(said))}"))
    parts.append(page.figures(*(name for name, (_, kind) in FIGURES.items() if kind == "hpo_merge")))
    page.add("hpo", "HPO", "".join(parts))


def training_section(page: Page) -> None:
    run, parts = page.run, []
    parts.append(page.figures("loss_curve.png"))
    metrics = run.train_metrics
    if metrics:
        columns = [c for c in TRAIN_COLUMNS if c in metrics[0]]
        shown = metrics if len(metrics) <= TRAIN_ROWS else metrics[:TRAIN_ROWS // 2] + metrics[-TRAIN_ROWS // 2:]
        rows = [[esc(text(row.get(c), "")) if c in ("epoch", "backbone_frozen") else number(num_text(row.get(c)), 4)
                 for c in columns]
                for row in shown]
        left_out = len(metrics) - len(shown)
        parts.append(f"<h3>Per epoch ({len(metrics)} epochs"
                     + (f"; {left_out} in the middle not listed" if left_out else "") + ")</h3>"
                     + table(columns, rows))
    else:
        parts.append(not_in_run(run, "train_metrics.csv", "the train job has not finished"))
    page.add("training", "Training", "".join(parts))


def evaluation_section(page: Page) -> None:
    evaluation, parts = page.run.evaluation, []
    matrix = page.fields.dict(evaluation, "confusion_matrix", "evaluation.json: confusion_matrix")
    cells = [entries(row) for row in page.fields.list(matrix, "matrix", "evaluation.json: confusion_matrix.matrix")]
    if any(cells):
        labels = [text(label, "?") for label in entries(matrix.get("labels"))]
        labels += ["?"] * (len(cells) - len(labels))
        biggest = max((abs(num(value) or 0) for row in cells for value in row), default=0) or 1
        rows = [[f"<b>{esc(label)}</b>"] + [
            f'<span style="display:inline-block;min-width:3em;padding:1px 6px;border-radius:4px;'
            f'background:rgba(42,98,201,{0.08 + 0.6 * abs(num(value) or 0) / biggest:.2f})">{count(value)}</span>'
            for value in row] for label, row in zip(labels, cells)]
        parts.append("<h3>Confusion matrix (rows true, columns predicted; "
                     f"IoU &ge; {number(matrix.get('iou_threshold'), 2)}, "
                     f"score &ge; {number(matrix.get('score_threshold'), 2)})</h3>"
                     + table(["true \\ predicted", *map(esc, labels)], rows)
                     + '<p class="muted">A missed face counts in the background column, a spurious or duplicate box '
                       "in the background row.</p>")
    parts.append(page.figures("confusion_matrix.png", "pr_curves.png", "compliance_histogram.png",
                              "compliance_by_folder.png"))
    if evaluation:
        skipped = page.fields.dicts(evaluation, "skipped", "evaluation.json: skipped")
        dropped = page.fields.dicts(evaluation, "objects_dropped", "evaluation.json: objects_dropped")
        if skipped or dropped:
            parts.append(files_listed(f"{len(skipped)} file(s) skipped, {len(dropped)} annotation(s) with objects "
                                      "left out", [skipped, dropped], "evaluation.json"))
    page.add("evaluation", "Evaluation", "".join(parts))


def cross_validation_section(page: Page) -> None:
    """A --folds run's cross-validation (aggregate_folds): kfold_summary.txt's text, made from kfold_summary.json
    as aggregate_folds makes it, and the plot; a run without folds has no such section (the page left both out)."""
    from ..detection.cross_validation import format_summary

    run, said = page.run, ""
    if not run.has_folds:
        return
    try:
        said = f"<pre>{esc(format_summary(run.kfold))}</pre>" if run.kfold is not None else ""
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
        page.unreadable.append(f"{run.outputs / KFOLD_SUMMARY}: not a summary of aggregate_folds ({error!r})")
    said = said or not_in_run(run, KFOLD_SUMMARY, "the aggregate_folds job has not finished")
    page.add("folds", "Cross-validation", said + page.figures(*FOLD_FIGURES))


def predictions_section(page: Page) -> None:
    run, parts = page.run, []
    if not run.annotated:
        page.add("predictions", "Predictions", note("No annotated images in this run (predict draws them with "
                                                    "--annotate-max; none, or the predict jobs have not finished)."))
        return
    errors = image_errors_by_stem(run)
    predicted = predicted_by_stem(run)
    by_stem = {image.stem: image for image in run.annotated}
    ranked = [(by_stem[stem], entry) for stem, entry in
              sorted(errors.items(),
                     key=lambda item: (-(num(item[1].get("errors")) or 0), -(num(item[1].get("missed")) or 0),
                                       item[0]))
              if stem in by_stem]
    if ranked:
        unmatched = len(run.annotated) - len(ranked)
        threshold = mapping(run.evaluation_images).get("score_threshold")
        parts.append(f"<p>{len(run.annotated)} annotated images in this run; {len(ranked)} of them are test images "
                     f"with per-image errors (evaluation_images.json, score &ge; {number(threshold, 2)}). "
                     f"The {min(GRID_IMAGES, len(ranked))} with the most errors are shown, worst first. "
                     "The boxes drawn "
                     "are the model's predictions; the counts compare them with the ground truth.</p>")
        if unmatched:
            parts.append(note(f"{unmatched} annotated image(s) are not among the evaluated test images "
                              "(prediction on other images) and are not ranked."))
        chosen = ranked[:GRID_IMAGES]
    else:
        # predict on --pred-images draws no test image: the grid showed none of its drawings
        why = ("this run has no evaluation_images.json (evaluate writes it; runs made before it existed lack it)"
               if "evaluation_images.json" in run.missing else
               "no annotated image is a test image (predict ran on other images)" if errors else
               "evaluation_images.json lists no image")
        parts.append(note(f"Per-image errors are not available: {esc(why)}. "
                          f"Shown: the first {min(GRID_IMAGES, len(run.annotated))} "
                          f"of {len(run.annotated)} annotated images with their predicted counts."))
        chosen = [(image, None) for image in run.annotated[:GRID_IMAGES]]
    tiles = []
    for image, entry in chosen:
        try:
            uri = image_data_uri(image.read_bytes(), THUMBNAIL_MAX_PX, THUMBNAIL_QUALITY)
            img = f'<img src="{uri}" alt="{esc(image.name)}" loading="eager">'
        except IMAGE_READ_ERRORS as error:
            page.unreadable.append(f"{image.source}:{image.member or ''}: {error}")
            img = note(f"cannot be read ({esc(error)})")
        if entry is not None:
            pills = "".join(f'<span class="pill{" err" if entry.get(key) else ""}">{count(entry.get(key, 0))} '
                            f'{label}</span>'
                            for key, label in (("missed", "missed"), ("false", "false"), ("confused", "confused")))
            detail = (f"{count(entry.get('true_faces'))} faces, {count(entry.get('detections'))} kept, "
                      f"{count(entry.get('correct'))} correct; masked {percent(entry.get('true_percent'))} true, "
                      f"{percent(entry.get('predicted_percent'))} predicted")
        else:
            figures = mapping(predicted.get(image.stem))
            pills = f'<span class="pill">{count(figures.get("faces"))} face(s)</span>'
            detail = f"{percent(figures.get('percent_properly_masked'))} {KEPT_MASKED}"
        source = image.source.name + (f" : {image.member}" if image.member else "")
        tiles.append(f'<div class="tile">{img}<div class="caption"><div class="name" title="{esc(source)}">'
                     f'{esc(image.stem)}</div>{pills}<div class="muted">{detail}</div></div></div>')
    parts.append('<div class="grid">' + "".join(tiles) + "</div>")
    page.add("predictions", "Predictions", "".join(parts))


def timings_section(page: Page) -> None:
    run, stats = page.run, page.run.statistics
    if stats:
        get = page.fields
        jobs = get.dicts(stats, "jobs", "statistics.json: jobs")
        longest = max((num(job.get("wall_time_s")) or 0 for job in jobs), default=0) or 1
        totals = get.dict(stats, "totals", "statistics.json: totals")
        critical = get.dict(stats, "critical_path", "statistics.json: critical_path")
        path = get.list(critical, "jobs", "statistics.json: critical_path.jobs")
        parts = [f"<p>From <code>statistics.json</code> (the local executor's measurements): started "
                 f"{esc(text(stats.get('started')))}, "
                 f"workflow wall time <b>{seconds_text(stats.get('wall_time_s'))}</b>, "
                 f"cumulative job time {seconds_text(totals.get('cumulative_job_wall_time_s'))}, "
                 f"{count(totals.get('succeeded'))} of {count(totals.get('jobs'))} jobs succeeded "
                 f"({count(totals.get('failed', 0))} failed, {count(totals.get('reused', 0))} reused), up to "
                 f"{count(stats.get('slots'))} at once. Critical path: "
                 f"{esc(' → '.join(text(job, '?') for job in path))} "
                 f"({seconds_text(critical.get('job_time_s'))}).</p>"]
        rows = [[esc(text(job.get("id"))), esc(text(job.get("transformation"))), esc(text(job.get("status"))),
                 count(job.get("tries")), seconds_text(job.get("wall_time_s")),
                 f'<div class="bar" style="width:{100 * max(num(job.get("wall_time_s")) or 0, 0) / longest:.1f}%">'
                 "</div>"]
                for job in jobs]
        parts.append(table(["job", "transformation", "status", "tries", "wall time", ""], rows, text_columns=(0, 1, 2),
                           classes={5: "barcell"}))
        page.add("timings", "Job timings", "".join(parts))
        return
    records = sorted(run.run_records.items(), key=lambda item: text(item[1].get("time"), ""))
    duration_keys = ("wall_time_s", "duration_s", "seconds")
    rows = []
    for name, record in records:
        duration = next((record[key] for key in duration_keys if record.get(key) is not None), None)
        rows.append([esc(f"{name}_run.json"), esc(text(record.get("job"), "?")), esc(text(record.get("time"))),
                     seconds_text(duration), esc(text(record.get("host")))])
    said = ("This run has no <code>statistics.json</code> yet: the executor writes it after the last job, so a page "
            "made inside the workflow cannot show measured job times. Listed instead: when each job finished, from "
            "its run record" + (", with its duration where the record holds one" if any(r[3] != "n/a" for r in rows)
                                else " (the records hold no durations)")
            + ". Run <code>bin/report.py RUN_DIR</code> after the run for the executor's timings.")
    page.add("timings", "Job timings", note(said) + (table(["run record", "job", "finished", "duration", "host"], rows,
                                                            text_columns=(0, 1, 2, 4)) if rows else ""))


def project_commit(root: Path) -> str | None:
    """The git commit of the project folder the report runs from (None without git or a checkout)."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    dirty = " with uncommitted changes" if status.returncode == 0 and status.stdout.strip() else ""
    return head.stdout.strip() + dirty


def provenance_section(page: Page, commit: str | None) -> None:
    import yaml

    run, parts = page.run, []
    recorded = next((value for source in ([run.config or {}] + list(run.run_records.values()))
                     for key in ("git_commit", "commit") if isinstance(value := source.get(key), str)), None)
    if recorded:
        parts.append(f"<p>Git commit of the run: <code>{esc(recorded)}</code>.</p>")
    elif commit:
        parts.append(f"<p>Git commit: <code>{esc(commit)}</code> <span class='muted'>(the project folder when this "
                     "page was made; the run's records hold no commit)</span>.</p>")
    else:
        parts.append(note("Git commit unknown: the run's records hold none and the report ran outside a git checkout."))
    packages = run.packages()
    differing = run.package_differences()
    if packages:
        rows = [[esc(name), esc(text(version, "not installed") if version is not None else "not installed")
                 + (f" <span class='bad'>(jobs differ: {esc(', '.join(sorted(map(str, differing[name]))))})</span>"
                    if name in differing else "")] for name, version in packages.items()]
        parts.append("<h3>Package versions (from the run records)</h3>" + table(["package", "version"], rows))
    if run.run_records:
        rows = [[esc(f"{name}_run.json"), esc(text(record.get("job"), "?")), esc(text(record.get("time"))),
                 count(record.get("num_inputs")),
                 f"<code title='{esc(text(record.get('inputs_sha256'), ''))}'>"
                 f"{esc(text(record.get('inputs_sha256') or None)[:16])}</code>"]
                for name, record in sorted(run.run_records.items())]
        parts.append("<h3>Inputs of each job (SHA-256 over the input files; hover for the full hash)</h3>"
                     + table(["run record", "job", "written", "inputs", "inputs SHA-256"], rows,
                             text_columns=(0, 1, 2, 4)))
    else:
        parts.append(note("No run records (<code>*_run.json</code>) in this run."))
    if run.config is not None:
        if not run.has_config_file:
            source = ("no <code>config.yml</code> in this run: the settings each kind of job ran with, rebuilt "
                      "from the run records' params")
        else:
            source = f"the run's effective configuration, <code>{esc(run.config_source)}</code>"
        dumped = yaml.safe_dump(run.config, sort_keys=False, default_flow_style=False, allow_unicode=True)
        parts.append(f"<h3>Configuration</h3><p class='muted'>From {source}.</p><pre>{esc(dumped)}</pre>")
    else:
        parts.append(note("No configuration: no <code>config.yml</code> and no run records."))
    page.add("provenance", "Provenance", "".join(parts))


def build_report(run: RunFolder, commit: str | None = None, made_where: str = "by hand",
                 run_name: str | None = None) -> tuple[str, list[str]]:
    """(the page's HTML, lines naming what could not be embedded). *run_name* titles the page (default: the
    folder's name; the workflow's report job runs in a scratch folder, so it passes the run's)."""
    name = run_name or run.name
    page = Page(run)
    for section in (data_section, hpo_section, training_section, evaluation_section, cross_validation_section,
                    predictions_section, timings_section):
        section(page)
    provenance_section(page, commit)
    summary_section(page)  # last, so that it lists the images that could not be embedded too
    page.sections.insert(0, page.sections.pop())
    marked = sum(content.count(f'class="{ODD_CLASS}"') for _, _, content in page.sections)
    sid, title, content = page.sections[0]
    page.sections[0] = (sid, title, content + problems_list(page, marked))
    nav = "".join(f'<a href="#{sid}">{esc(title)}</a>' for sid, title, _ in page.sections)
    body = "".join(f'<section id="{sid}"><h2>{esc(title)}</h2>{content}</section>'
                   for sid, title, content in page.sections)
    made = time.strftime("%Y-%m-%d %H:%M:%S %z")
    evaluation = run.evaluation or {}
    estimate = mapping(mapping(evaluation.get("quantification")).get("estimate"))  # with its interval as elsewhere
    figure = (f"{interval(estimate)} predicted properly masked on {count(estimate.get('units'))} test images "
              f"({esc(text(estimate.get('method')))})" if estimate else "no estimate in evaluation.json")
    headline = (f"mAP@0.5 {number(evaluation.get('map_50'))} · {figure}" if evaluation else
                "unfinished run" if "evaluation.json" in run.missing else "evaluation.json cannot be used")
    document = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'">
<title>Run report: {esc(name)}</title>
<style>{CSS}</style></head>
<body>
<header><h1>Mask detection run <code>{esc(name)}</code></h1>
<p>{headline} · <code>{esc(run.path)}</code> · page made {esc(made)} ({esc(made_where)})</p></header>
<nav>{nav}</nav>
<main>{body}</main>
<footer>Self-contained page written by bin/report.py: figures embedded, no scripts, nothing fetched.</footer>
</body></html>
"""
    marked_line = ([f"{marked} value(s) in the run's files are not the numbers expected; shown as a marked n/a"]
                   if marked else [])
    return document, page.unreadable + page.fields.notes + marked_line
