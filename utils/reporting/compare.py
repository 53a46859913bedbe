"""The table of runs: one row per run, the settings that differ between the runs, then the metrics.

Settings come from each run's effective configuration (RUN_DIR/config.yml; else one a run record
carries; else every run record's params), flattened to dotted keys (train_stages.0.lr) and kept
only where the runs differ: a key some runs lack counts as differing, shown as "-" there.
"""

from __future__ import annotations

import csv
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

from ..classes import CLASSES
from ..errors import InputError
from .run_folder import RunFolder, RunFolderError, flatten, read_run_folder, settings_from_run_records
from .values import Fields, num

ABSENT = "-"
TEST_SETS_DIFFER = ("the runs were evaluated on different test sets (their evaluation.json counts differ): "
                    "a metric's difference between them is not the settings' alone")
# The metric columns, in table order (metric_values gives them).
METRICS = ("map", "map_50", *(f"ap50_{name}" for name in CLASSES), "compliance_true", "estimate", "estimate_low",
           "estimate_high", "estimate_error", "compliance_predicted", "compliance_error", "mae", "wall_time_s")


def metric_values(run: RunFolder, notes: list[str] | None = None) -> dict[str, float | None]:
    """The metrics of one run, by column name: None where the run lacks the figure or its file holds
    something other than a finite number there (NaN, a string, a list), which *notes* then names."""
    get = Fields(notes)
    evaluation, where = run.evaluation or {}, f"{run.outputs / 'evaluation.json'}: "
    compliance = get.dict(evaluation, "compliance", where + "compliance")
    per_class = get.dict(evaluation, "per_class", where + "per_class")
    values = {"map": get.num(evaluation, "map", where + "map"),
              "map_50": get.num(evaluation, "map_50", where + "map_50")}
    for name in CLASSES:
        entry = get.dict(per_class, name, f"{where}per_class.{name}")
        values[f"ap50_{name}"] = get.num(entry, "ap_50", f"{where}per_class.{name}.ap_50")
    for column, part in (("compliance_true", "true"), ("compliance_predicted", "predicted")):
        figures = get.dict(compliance, part, f"{where}compliance.{part}")
        values[column] = get.num(figures, "percent_properly_masked",
                                 f"{where}compliance.{part}.percent_properly_masked")
    values["compliance_error"] = get.num(compliance, "error_points", where + "compliance.error_points")
    # the headline figure with its interval, as the summary line, the report and the service give it
    headline = get.dict(get.dict(evaluation, "quantification", where + "quantification"), "estimate",
                        where + "quantification.estimate")
    for column, key in (("estimate", "percent"), ("estimate_low", "low"), ("estimate_high", "high"),
                        ("estimate_error", "error_points")):
        values[column] = get.num(headline, key, f"{where}quantification.estimate.{key}")
    values["mae"] = get.num(compliance, "per_image_mae_points", where + "compliance.per_image_mae_points")
    statistics = f"{run.path / 'statistics.json'}: "
    values["wall_time_s"] = get.num(run.statistics, "wall_time_s", statistics + "wall_time_s")
    totals = get.dict(run.statistics, "totals", statistics + "totals")
    reused = get.num(totals, "reused", statistics + "totals.reused")
    jobs = get.num(totals, "jobs", statistics + "totals.jobs")
    if values["wall_time_s"] is not None and reused:  # statistics.json is the last executor run's, a rerun's too
        get.notes.append(f"{statistics}wall_time_s {values['wall_time_s']:.0f} s is the last rerun's alone: "
                         f"{reused:.0f} of {jobs or 0:.0f} jobs were reused from earlier runs, their time not in it")
    return values




@dataclass
class Comparison:
    columns: list[str]                       # run, status, the differing settings, then METRICS
    rows: list[dict]                         # column -> value (None: no value)
    settings: list[str]                      # the differing setting columns
    without_config_file: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    sort_by: str = "map_50"
    ascending: bool = False
    different_test_sets: str = ""            # the runs' test sets where they differ (their metrics do not compare)


def _label_runs(paths: list[Path]) -> list[str]:
    """Folder names; the path as given where two runs share a folder name."""
    names = [path.resolve().name or str(path) for path in paths]
    return [str(path) if names.count(name) > 1 else name for path, name in zip(paths, names)]


def _status(run: RunFolder) -> str:
    """"finished", or what the run lacks and which of its result files are there but cannot be read (a row of
    blank metrics said "finished")."""
    lacking = run.unfinished + (["statistics.json"] if "statistics.json" in run.missing else [])
    unreadable = [name for name, value in (("evaluation.json", run.evaluation), ("compliance.json", run.compliance),
                                           ("statistics.json", run.statistics))
                  if value is None and name not in run.missing]
    said = ([f"missing {', '.join(lacking)}"] if lacking else []) + (
        [f"unreadable {', '.join(unreadable)}"] if unreadable else [])
    return "; ".join(said) or "finished"


def _test_set(run: RunFolder) -> tuple | None:
    """What a run's metrics were measured on, as its evaluation.json counts it: (images, faces per class);
    None where the file does not say (an older or broken one)."""
    evaluation = run.evaluation or {}
    images, faces = evaluation.get("num_images"), evaluation.get("faces_per_class")
    if not isinstance(images, int) or not isinstance(faces, dict) or not all(
            isinstance(count, int) for count in faces.values()):
        return None
    return images, tuple(sorted(faces.items()))


def _different_test_sets(runs: list[tuple[str, RunFolder | None, str]]) -> str:
    """'' when every run that says was evaluated on a test set of the same counts; else each run's counts
    (another data set, split or label map: a run's figures then are not the others' on other settings)."""
    counted = {label: _test_set(run) for label, run, _ in runs if run is not None}
    counted = {label: test_set for label, test_set in counted.items() if test_set is not None}
    if len(set(counted.values())) < 2:
        return ""
    return "; ".join(f"{label}: {images} images, " + ", ".join(f"{count} {name}" for name, count in faces)
                     for label, (images, faces) in counted.items())


# Keys that name the run rather than configure it: they differ between any two runs.
RUN_IDENTITY = {"run_dir"}


def differing_settings(configs: list[dict[str, object]]) -> list[str]:
    """The flattened keys whose value is not the same in every config (absent counts as a value)."""
    keys = list(dict.fromkeys(key for config in configs for key in config))
    return [key for key in keys if len({repr(config.get(key, ABSENT)) for config in configs}) > 1]


def compare_runs(paths, sort_by: str = "map_50", ascending: bool = False) -> Comparison:
    """The comparison of the run folders *paths*; InputError when none of them can be used or
    *sort_by* is no column. Unusable folders become warnings and rows that say what is wrong."""
    paths, warnings = _once_each([Path(path) for path in paths])
    labels = _label_runs(paths)
    runs: list[tuple[str, RunFolder | None, str]] = []
    for label, path in zip(labels, paths):
        try:
            run = read_run_folder(path)
        except RunFolderError as error:
            warnings.append(str(error))
            runs.append((label, None, str(error).removeprefix(f"{path}: ")))
            continue
        status = _status(run)
        if run.unfinished:
            warnings.append(f"{path}: unfinished run ({status})")
        warnings += [f"{problem}" for problem in run.problems]
        runs.append((label, run, status))
    usable = [run for _, run, _ in runs if run is not None and run.evaluation is not None]
    if not usable:
        raise InputError(f"no usable run among the {len(paths)} given (each needs outputs/evaluation.json): "
                         + "; ".join(f"{label}: {status}" for label, _, status in runs))
    present = [run for _, run, _ in runs if run is not None]
    # Like is compared with like: a config.yml and settings rebuilt from run records name their keys
    # differently, so when any run lacks config.yml every run's settings are rebuilt from its records.
    mixed = len({run.has_config_file for run in present}) > 1
    flat = {label: {key: value for key, value in flatten(
                settings_from_run_records(run.run_records) if mixed else (run.config or {})).items()
                    if key not in RUN_IDENTITY}
            for label, run, _ in runs if run is not None}
    settings = differing_settings(list(flat.values())) if len(flat) > 1 else []
    rows = []
    for label, run, status in runs:
        row: dict[str, object] = {"run": label, "status": status}
        for key in settings:
            row[key] = flat[label].get(key, ABSENT) if run is not None else ""
        row.update(metric_values(run, warnings) if run is not None else dict.fromkeys(METRICS))
        rows.append(row)
    columns = ["run", "status", *settings, *METRICS]
    if sort_by not in columns:
        raise InputError(f"--sort-by {sort_by!r}: not a column (one of {', '.join(METRICS)}, or a differing "
                         f"setting: {', '.join(settings) or 'none'})")
    with_value = [row for row in rows if _has_value(row[sort_by])]
    without_value = [row for row in rows if not _has_value(row[sort_by])]
    with_value.sort(key=lambda row: _sort_key(row[sort_by]), reverse=not ascending)
    without_config = [label for label, run, _ in runs if run is not None and not run.has_config_file]
    different_test_sets = _different_test_sets(runs)
    if different_test_sets:
        warnings.append(f"{TEST_SETS_DIFFER} ({different_test_sets})")
    return Comparison(columns, with_value + without_value, settings, without_config, warnings, sort_by, ascending,
                      different_test_sets)


def _once_each(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """*paths* without a run given again (the same folder by another path too), and a warning for each repeat."""
    kept: dict[Path, Path] = {}
    warnings = []
    for path in paths:
        first = kept.setdefault(path.resolve(), path)
        if first is not path:
            again = "again" if str(first) == str(path) else f"again, as {path}"
            warnings.append(f"{first}: run given {again}; compared once")
    return list(kept.values()), warnings


def _has_value(value) -> bool:
    """Whether a cell holds something to sort by: not missing, and not NaN (NaN orders with nothing)."""
    if value is None or value is ABSENT or value == "":
        return False
    return not (isinstance(value, float) and value != value)


def _sort_key(value):
    """Numbers by value, before anything else by its text (a setting column may mix them)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, float(value), "")
    return (0, 0.0, str(value))


# ----------------------------------------------------------------------------- formats

def cell_text(value, column: str = "") -> str:
    if value is None:  # a metric the run lacks is empty; a setting that is None says so
        return "" if column in METRICS else "None"
    if isinstance(value, float):
        if column in ("map", "map_50") or column.startswith("ap50_"):
            return f"{value:.4f}"
        if column == "wall_time_s":
            return f"{value:.0f}"
        return f"{value:.4g}" if column not in METRICS else f"{value:.2f}"
    return str(value)


def notes(comparison: Comparison) -> list[str]:
    order = "ascending" if comparison.ascending else "descending"
    lines = [f"sorted by {comparison.sort_by} ({order}; runs without it last)"]
    if comparison.settings:
        lines.append(f"{len(comparison.settings)} setting(s) differ between the runs")
    else:
        lines.append("no setting differs between the runs")
    if comparison.different_test_sets:
        lines.append(f"{TEST_SETS_DIFFER}: {comparison.different_test_sets}")
    if comparison.without_config_file:
        lines.append("no config.yml: " + ", ".join(comparison.without_config_file) + "; so every run's settings "
                     "are rebuilt from its run records' params (one kind of key for all)")
    return lines


def _markdown_cell(text: str) -> str:
    """*text* on one line of a Markdown table: a line break or other control character in a run's name or a
    setting (a YAML string may hold one) would end the row, and a `|` would split the cell; shown as escapes."""
    text = text.replace("\\", "\\\\").replace("|", "\\|")
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def to_markdown(comparison: Comparison) -> str:
    escape = _markdown_cell
    header = "| " + " | ".join(map(escape, comparison.columns)) + " |"
    rule = "| " + " | ".join("---" if column in ("run", "status") or column in comparison.settings else "---:"
                             for column in comparison.columns) + " |"
    body = ["| " + " | ".join(escape(cell_text(row[c], c)) for c in comparison.columns) + " |"
            for row in comparison.rows]
    return "\n".join([header, rule, *body, "", *(f"- {escape(line)}" for line in notes(comparison))]) + "\n"


def to_csv(comparison: Comparison) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(comparison.columns)
    for row in comparison.rows:
        writer.writerow(["" if row[c] is None else row[c] for c in comparison.columns])
    return buffer.getvalue()


def to_html(comparison: Comparison) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in comparison.columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(cell_text(row[c], c))}</td>" for c in comparison.columns) + "</tr>"
                   for row in comparison.rows)
    items = "".join(f"<li>{esc(line)}</li>" for line in notes(comparison))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Runs compared</title>
<style>body{{font:14px/1.5 system-ui,sans-serif;margin:24px;color:#1c2230}}
table{{border-collapse:collapse;font-variant-numeric:tabular-nums}}
th,td{{padding:5px 10px;border-bottom:1px solid #e2e5eb;text-align:right;white-space:nowrap}}
th{{position:sticky;top:0;background:#f5f6f8;font-size:.8rem}}td:first-child,th:first-child,td:nth-child(2){{text-align:left}}
</style></head><body><h1>Runs compared</h1><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<ul>{items}</ul></body></html>
"""


FORMATS = {".csv": to_csv, ".md": to_markdown, ".html": to_html}


def write_plot(comparison: Comparison, metric: str, path) -> list[str]:
    """A bar chart of *metric* across the runs (in table order); returns the runs without a value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import atomic_path
    from ..figures import figure_label

    if metric not in METRICS:
        raise InputError(f"--metric {metric!r}: not a metric (one of {', '.join(METRICS)})")
    def label(name: str) -> str:  # a run's name as text ("$" would start matplotlib's math mode), a long one cut
        return figure_label(name).replace("$", r"\$")

    plotted = [(label(row["run"]), num(row[metric])) for row in comparison.rows if num(row[metric]) is not None]
    without = [row["run"] for row in comparison.rows if num(row[metric]) is None]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(plotted) + 2), 4.2), layout="constrained")
    # at positions, not by name: two runs whose names cut alike (figure_label) were one bar, the other's hidden
    bars = ax.bar(range(len(plotted)), [value for _, value in plotted], color="#2a62c9")
    ax.set_xticks(range(len(plotted)), [name for name, _ in plotted])
    ax.bar_label(bars, fmt="%.3g", padding=2)
    ax.margins(y=0.12)  # room for the labels above the tallest bar
    ax.set_ylabel(metric)
    title = f"{metric} per run"
    if without:
        title += f"\n(no value: {', '.join(map(label, without))})"
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=20 if len(plotted) > 3 else 0)
    ax.axhline(0, color="black", linewidth=0.8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return without
