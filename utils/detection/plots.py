"""Figures of the evaluate, predict and hpo_merge jobs: confusion matrix, PR curves, annotated images,
the optimisation history and hyperparameter importances."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # jobs run headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from .. import defaults as D  # noqa: E402
from ..atomic import atomic_path  # noqa: E402
from ..classes import CLASS_COLOURS, CLASSES, NAME_OF  # noqa: E402
from ..figures import BELOW_ONLY, KEPT_MASKED, NO_FACE_KEPT, figure_label, one_decimal  # noqa: E402
from ..naming import OUTPUTS  # noqa: E402


def _save(fig, path) -> None:
    with atomic_path(path) as tmp:
        _write_figure(fig, tmp)


def _write_figure(fig, path) -> None:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_confusion_matrix(matrix, labels, path, title: str = "Detection confusion matrix") -> None:
    """Counts, rows = true class, columns = predicted class; row-normalised shading."""
    counts = np.asarray(matrix, dtype=float)
    row_sums = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, row_sums, out=np.zeros_like(counts), where=row_sums > 0)
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center",
                    color="white" if shares[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true row")
    _save(fig, path)


def plot_pr_curves(curves: dict, per_class: dict, path, iou_threshold: float = 0.5) -> None:
    """One precision-recall curve per class (COCO's interpolated curve at *iou_threshold*)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for name in CLASSES:
        curve = curves.get(name)
        if not curve:
            continue
        ap = per_class.get(name, {}).get("ap_50")
        label = f"{name} (AP50 {ap:.3f})" if ap is not None else name
        colour = np.asarray(CLASS_COLOURS[name]) / 255.0
        ax.plot(curve["recall"], curve["precision"], color=colour, label=label, linewidth=2)
    if not curves:
        ax.text(0.5, 0.5, "no ground-truth faces: no curves", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"Precision-recall per class, IoU {iou_threshold:g}")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(loc="lower left")
    _save(fig, path)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without sized default fonts
        return ImageFont.load_default()


def draw_detections(image: Image.Image, boxes, labels, scores) -> Image.Image:
    """A copy of *image* with each box in its class colour and a 'label score' tag."""
    annotated = image.convert("RGB").copy()
    draw = ImageDraw.Draw(annotated)
    line = max(1, round(min(annotated.size) / 200))
    font = _font(max(10, round(min(annotated.size) / 40)))
    for box, label, score in zip(boxes.tolist(), labels.tolist(), scores.tolist()):
        name = NAME_OF.get(int(label), str(label))
        colour = CLASS_COLOURS.get(name, (255, 255, 255))
        x0, y0, x1, y1 = box
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
        text = f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), text, font=font)
        height = bottom - top
        width = right - left + 4
        ty = y0 - height - 2 if y0 - height - 2 >= 0 else y0  # above the box unless at the top edge
        tx = max(0, min(x0, annotated.width - width))  # keep the tag inside the image at the right edge
        draw.rectangle((tx, ty, tx + width, ty + height + 2), fill=colour)
        draw.text((tx + 2, ty - (top - y0) + 1), text, fill=(0, 0, 0), font=font)
    return annotated


def save_annotated(image: Image.Image, boxes, labels, scores, path, quality: int = D.ANNOTATED_JPEG_QUALITY) -> None:
    annotated = draw_detections(image, boxes, labels, scores)
    with atomic_path(path) as tmp:
        annotated.save(tmp, format="JPEG", quality=quality)


# ----------------------------------------------------------------------------- HPO (the hpo_merge job)

def _frozen_trials(records: list[dict], distributions: dict) -> list:
    import optuna
    from optuna.trial import TrialState

    from .hpo_results import FINISHED

    trials = []
    for record in records:
        state = TrialState[record["state"]]
        if state not in FINISHED or not set(record["params"]) <= set(distributions):
            continue
        if state == TrialState.COMPLETE and record.get("value") is None:
            continue
        trials.append(optuna.trial.create_trial(
            state=state, value=record.get("value") if state == TrialState.COMPLETE else None,
            params=record["params"], distributions={k: distributions[k] for k in record["params"]},
            intermediate_values={int(k): v for k, v in (record.get("intermediate_values") or {}).items()},
            user_attrs=record.get("user_attrs") or {}))
    return trials


def _note_figure(path, title: str, note: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, note, ha="center", va="center", wrap=True, fontsize=11)
    _save(fig, path)


def _save_axes(ax, path) -> None:
    fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
    fig.set_size_inches(8, 5)
    fig.tight_layout()
    _save(fig, path)


def write_hpo_plots(results: list[dict], plots_dir, journals=()) -> dict:
    """optimization_history.png (one line per worker) and param_importances.png (all workers' trials together).

    Returns notes {plot: why it shows a note instead} for the plots that could not be drawn.
    """
    import warnings

    import optuna
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    from .hpo_results import HpoError, parse_distribution, worker_journal_trials

    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    per_worker = worker_journal_trials(journals, results) if journals else [r.get("trials", []) for r in results]
    # Every worker searched a slice of one space: give all trials the full space so that they combine.
    full_space = {}
    for result in results:
        for name, text in (result.get("full_search_space") or result.get("search_space") or {}).items():
            full_space.setdefault(name, parse_distribution(text, f"{result.get('_file', 'HPO result')}: {name}"))
    direction = optuna.study.StudyDirection.MAXIMIZE
    studies, combined = [], optuna.create_study(direction=direction, study_name="all workers")
    sources = list(journals) if journals else [r.get("_file", f"HPO result {i}") for i, r in enumerate(results)]
    for index, records in enumerate(per_worker):
        try:
            trials = _frozen_trials(records, full_space)
        except ValueError as error:  # a trial's value outside the workers' search space: another search's file
            raise HpoError(f"{sources[index]}: a trial does not fit the search space of the --inputs files "
                           f"({' '.join(str(error).split())[:300]})") from None
        worker = optuna.create_study(direction=direction, study_name=f"worker {index}")
        worker.add_trials(trials)
        combined.add_trials(trials)
        studies.append(worker)
    notes = {}
    history_path = plots_dir / OUTPUTS["hpo_merge"]["history_plot"]
    importance_path = plots_dir / OUTPUTS["hpo_merge"]["importance_plot"]
    completed = combined.get_trials(states=(TrialState.COMPLETE,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if completed:
            _save_axes(ovm.plot_optimization_history(studies if len(studies) > 1 else studies[0]), history_path)
        else:
            notes["optimization_history"] = "no completed trial"
            _note_figure(history_path, "Optimization history", "No completed trial to plot.")
        varying = [name for name in full_space if len({t.params.get(name) for t in completed}) > 1]
        if len(completed) >= 2 and varying:
            try:
                # named in sorted order: Optuna lists them from a set, so parameters of equal importance (all,
                # with few trials) were drawn in an order that changed from run to run with Python's hash seed
                named = sorted({name for t in completed for name in t.distributions})
                _save_axes(ovm.plot_param_importances(combined, params=named), importance_path)
            except (ValueError, RuntimeError) as error:
                notes["param_importances"] = f"importance evaluation failed: {error}"
        else:
            notes["param_importances"] = (f"{len(completed)} completed trial(s) with "
                                          f"{'varying' if varying else 'identical'} parameters: "
                                          "importance needs at least 2 completed trials that differ")
        if "param_importances" in notes:
            _note_figure(importance_path, "Hyperparameter importances",
                         f"Not computed: {notes['param_importances']}.")
    return notes


def plot_compliance_histogram(percentages, path, overall: float | None, no_faces: int) -> None:
    """Histogram of the per-image percent properly masked (images with at least one face)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    values = np.asarray(list(percentages), dtype=float)
    ax.hist(values, bins=np.linspace(0, 100, 21), color=tuple(v / 255 for v in CLASS_COLOURS["with_mask"]),
            edgecolor="white")
    if overall is not None:
        ax.axvline(overall, color="black", linestyle="--", label=f"all faces pooled: {one_decimal(overall)}%")
        ax.legend(loc="upper center")
    ax.set_xlabel(f"the image's percent {KEPT_MASKED}")  # the count: "properly masked" is the estimate's word
    ax.set_ylabel("images")
    ax.set_title(f"Per-image mask compliance ({len(values)} images with faces, {no_faces} without)")
    _save(fig, path)


def plot_compliance_over_time(times, percentages, faces, path, source: str, with_mask=None,
                              limit: int | None = None) -> None:
    """Percent properly masked per processed frame (gaps where a frame has no face) and faces per frame, written
    at *path* as it is: the temporary path of one of predict_video's outputs (utils.atomic.atomic_files). Over
    *limit* frames (defaults.VIDEO_PLOT_MAX_POINTS; with *with_mask*, the frames' with_mask faces), each point is
    that many consecutive frames: their faces pooled, their mean faces a frame (a bar a frame grew the figure by
    ~10 kB a frame, long past what its pixels can tell apart)."""
    fig, ax = plt.subplots(figsize=(9, 4))
    values = np.array([np.nan if p is None else p for p in percentages], dtype=float)
    per, faces_label, limit = 1, "faces in the frame", limit or D.VIDEO_PLOT_MAX_POINTS
    if with_mask is not None and len(times) > limit:
        per = -(-len(times) // limit)
        starts = np.arange(0, len(times), per)
        sizes = np.diff(np.append(starts, len(times)))
        found = np.add.reduceat(np.asarray(faces, dtype=float), starts)
        masked = np.add.reduceat(np.asarray(with_mask, dtype=float), starts)
        values = np.divide(100 * masked, found, out=np.full(len(starts), np.nan), where=found > 0)
        times, faces, faces_label = np.asarray(times)[starts], found / sizes, f"faces a frame (mean of {per})"
    ax.plot(times, values, color=tuple(v / 255 for v in CLASS_COLOURS["with_mask"]), marker=".", linewidth=1.5)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("time (s)")
    # wrapped: on one line the words ran far past the 4-inch axes and bbox_inches="tight" padded the image around them
    ax.set_ylabel(textwrap.fill(f"% {KEPT_MASKED}" + (f", {per} frames pooled a point" if per > 1 else ""), 30))
    twin = ax.twinx()
    twin.bar(times, faces, width=(times[1] - times[0]) * 0.8 if len(times) > 1 else 0.5, color="grey", alpha=0.25)
    twin.set_ylabel(faces_label)
    ax.set_zorder(twin.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.set_title(f"Mask compliance over time: {figure_label(Path(source).name if '://' not in source else source)}",
                 parse_math=False)  # a file's name is text, not math ('$' in it)
    _write_figure(fig, path)


def plot_compliance_by_folder(per_folder: dict, overall: dict, path, limit: int = D.FOLDER_PLOT_MAX) -> None:
    """Percent properly masked per folder with its 95 % interval (bars), and the overall figure (line);
    *per_folder* maps a folder to a utils.detection.quantify estimate ({} draws the overall one alone). At most
    *limit* folders, those with the most images (the figure grows a row a folder; all are in compliance.json)."""
    rows = list(per_folder.items()) or [("all images", overall)]
    title = "Mask compliance per folder"
    if len(rows) > limit:
        largest = {folder for folder, _ in sorted(rows, key=lambda row: (-row[1]["units"], row[0]))[:limit]}
        title += f": the {limit} of {len(rows)} folders with the most images (all in the compliance JSON)"
        rows = [row for row in rows if row[0] in largest]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * len(rows)))
    colour = tuple(v / 255 for v in CLASS_COLOURS["with_mask"])
    for y, (_folder, result) in enumerate(rows):
        if result["percent"] is None:
            ax.text(1, y, f"no figure ({result.get('note', 'no faces found')})", va="center", fontsize=8)
            continue
        # the interval drawn from its ends, not as error bars about the figure: a percentile bootstrap interval need
        # not hold its own estimate (acc read 99.59 % with 0.0-97.89 % on 2 random images), and matplotlib refuses a
        # negative error bar, which failed the whole job
        if result["low"] is not None:
            ax.plot([result["low"], result["high"]], [y, y], color="black", marker="|", markersize=10)
        ax.plot(result["percent"], y, "o", color=colour)
        units = f"{result['units']} {result['unit']}{'' if result['units'] == 1 else 's'}"
        # the figure and its interval in numbers, as compliance.json gives them (a dot is no figure to read), and why
        # a folder has no interval (one image): a dot without a bar said nothing of it
        spread = (result.get("note") or "no interval" if result["low"] is None
                  else f"{one_decimal(result['low'])}-{one_decimal(result['high'])}%")
        # the faces kept at the threshold, not "found": with none, the figure rests on the scores below it
        kept = (f"{result['faces_found']} face{'' if result['faces_found'] == 1 else 's'} kept at the threshold"
                if result["faces_found"] else f"{NO_FACE_KEPT}; {BELOW_ONLY}")
        ax.text(101, y, f"{one_decimal(result['percent'])}% ({spread}), {units}, {kept}", va="center", fontsize=8)
    if overall["percent"] is not None and per_folder:
        ax.axvline(overall["percent"], color="grey", linestyle="--",
                   label=f"all folders: {one_decimal(overall['percent'])}%")
        ax.legend(loc="lower left", fontsize=8)
    # parse_math off: a folder's name is text ('x$\\foo$' failed the drawing, '$5 and $6' was drawn as math)
    ax.set_yticks(range(len(rows)), [figure_label(folder) or "(top level)" for folder, _ in rows], fontsize=8,
                  parse_math=False)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # the first folder on top
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"faces properly masked (%), {overall['method']}, with the "
                  f"{round(100 * overall['confidence'])}% bootstrap interval")
    ax.set_title(title)
    _save(fig, path)
