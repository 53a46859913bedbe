"""The predict job: detections, annotated images and the mask-compliance figure for image files.

Inputs are image files, folders of images, or .tar archives of images, in any mix.
Every file that cannot be used (missing, not an image, undecodable) is listed as
skipped with its reason in predictions.json and compliance.json; the others still run.

Pipeline: DataLoader workers decode ahead of the model (utils.detection.inference), and
annotated copies are drawn and JPEG-encoded by a thread pool while the model works
on the next batch, so the model rarely waits for files.
"""

from __future__ import annotations

import contextlib
import csv
import io
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .. import defaults as D
from ..atomic import atomic_path, write_json, write_text
from ..classes import NAME_OF
from ..data.images import is_image_name
from ..naming import output_names as job_output_names
from .inference import Detections, ImageItem, Skipped, detect_files
from .inference_size import working_size
from .compliance import compliance, compliance_line, merge_compliance
from .quantify import prediction_estimates, soft_counts
from ..data.pairs import open_folder, pack_folder
from .plots import save_annotated

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PREDICTION_CSV_FIELDS = ("file", "xmin", "ymin", "xmax", "ymax", "label", "score")


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _folder_items(folder: Path, prefix: str, skipped: list):
    items = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue  # hidden files (editor swap files, macOS metadata) are not inputs
        name = f"{prefix}{relative.as_posix()}"
        if is_image_name(path):
            parent = relative.parent.as_posix()
            items.append(ImageItem(name, path, "" if parent == "." else parent))
        elif path.suffix.lower() != ".xml":  # annotations beside images are expected, not a problem
            skipped.append({"file": name, "reason": f"not an image file name (extension '{path.suffix}')"})
    return items


def collect_inputs(paths, stack: contextlib.ExitStack):
    """(items, skipped): image files from files, folders and archives; skipped entries are {file, reason}."""
    items, skipped = [], []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            items += _folder_items(path, f"{path.as_posix().rstrip('/')}/", skipped)
        elif _is_archive(path):
            try:
                folder = stack.enter_context(open_folder(path))
            except Exception as exc:  # a damaged archive is one skipped input, not a failed job
                skipped.append({"file": str(path), "reason": f"cannot unpack archive: {exc}"})
                continue
            items += _folder_items(folder, f"{path.name}:", skipped)
        elif path.is_file():
            items.append(ImageItem(str(path), path))  # named explicitly: try it whatever its extension
        else:
            skipped.append({"file": str(path), "reason": "file does not exist"})
    return items, skipped


def _annotated_name(item: ImageItem, used: set) -> str:
    stem = Path(item.path).stem
    name, n = f"annotated_{stem}.jpg", 1
    while name in used:  # two inputs with the same stem (different folders) must not overwrite each other
        n += 1
        name = f"annotated_{stem}_{n}.jpg"
    used.add(name)
    return name


@dataclass
class PredictionRun:
    images: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    overall: dict = field(default_factory=dict)
    estimates: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return len(self.images)


def _keep_counted(result: Detections, score_threshold: float) -> dict:
    """Reduce *result* to the detections counted at *score_threshold*; returns the score sums per class
    of all it held (down to the detection floor), the image's probabilistic count."""
    soft = soft_counts(result.labels.tolist(), result.scores.tolist())
    keep = result.scores >= score_threshold
    result.boxes, result.labels, result.scores = result.boxes[keep], result.labels[keep], result.scores[keep]
    return soft


def _image_record(result: Detections, annotated: str | None, soft: dict) -> dict:
    detections = [
        {"box": [round(v, 2) for v in box], "label": NAME_OF[int(label)], "score": round(float(score), 4)}
        for box, label, score in zip(result.boxes.tolist(), result.labels.tolist(), result.scores.tolist())
    ]
    return {"file": result.item.name, "folder": result.item.folder, "width": result.width, "height": result.height,
            "annotated": annotated, "detections": detections, "soft_counts": soft,
            "compliance": compliance([d["label"] for d in detections])}


def _csv_text(images) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(PREDICTION_CSV_FIELDS)
    for image in images:
        for det in image["detections"]:
            writer.writerow([image["file"], *det["box"], det["label"], det["score"]])
    return buffer.getvalue()


def output_names(tag: str | None = None) -> dict[str, str]:
    """The predict job's output file names; with a *tag* (a shard's name) they carry it, so that
    the fanned-out jobs of one workflow write distinct files for the merge job."""
    return job_output_names("predict", tag)


def annotation_sample(count: int, limit: int | None) -> set[int]:
    """Indices of the images to draw: all, or *limit* spread evenly over the *count* inputs."""
    if limit is None or limit >= count:
        return set(range(count))
    return {index * count // limit for index in range(limit)}


def predict_images(model, paths, output_dir, annotated_dir=None, device="cpu", score_threshold: float = 0.5,
                   tta: bool = False, batch_size: int = 4, num_workers: int | None = None,
                   annotate: bool = True, progress=None, settings: dict | None = None,
                   annotate_max: int | None = None, annotated_tar=None, tag: str | None = None,
                   explain: str | None = None, explain_max_boxes: int = 5, calibration: dict | None = None,
                   estimator: str = D.COMPLIANCE_ESTIMATOR) -> PredictionRun:
    """Run the predict job and write its outputs; returns what was written.

    *progress* is an optional callable taking the number of finished images (for a tqdm bar).
    *settings* is copied into predictions.json and compliance.json (model file, flags).
    *annotate_max* draws only that many images, spread evenly; *annotated_tar* packs the drawn
    images into one .tar instead of a folder (what a workflow stages out); *tag* names the outputs
    (output_names). *explain* (a method of utils.detection.explain) also writes, for each drawn
    image, an overlay of the class evidence of each of its *explain_max_boxes* best detections
    (explain_<stem>_<k>.jpg beside the annotated image; k indexes the image's detections).
    *calibration* (the model file's validation record) lets the adjusted estimators correct the counts;
    *estimator* names the headline one (utils/detection/quantify.py). Images in two or more folders
    also get one figure per folder and compliance_by_folder.png.
    """
    output_dir = Path(output_dir)
    annotated_dir = Path(annotated_dir) if annotated_dir else output_dir / "annotated"
    run = PredictionRun()
    used_names: set[str] = set()
    with contextlib.ExitStack() as stack:
        items, run.skipped = collect_inputs(paths, stack)
        drawn = {items[index].name for index in annotation_sample(len(items), annotate_max)} if annotate else set()
        if annotated_tar is not None:
            annotated_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="annotated.")))
        if annotate:
            annotated_dir.mkdir(parents=True, exist_ok=True)
        writer = stack.enter_context(ThreadPoolExecutor(max_workers=2, thread_name_prefix="annotate"))
        pending = []
        # Detections down to the floor feed the probabilistic count; only those at the threshold are counted,
        # drawn and listed.
        floor = min(D.DETECTION_FLOOR, score_threshold)
        for result in detect_files(model, items, device, batch_size=batch_size, score_threshold=floor,
                                   tta=tta, num_workers=num_workers, keep_images=annotate):
            if isinstance(result, Skipped):
                run.skipped.append({"file": result.item.name, "reason": result.reason})
                continue
            soft = _keep_counted(result, score_threshold)
            annotated = None
            explained = []
            if result.item.name in drawn:
                annotated = _annotated_name(result.item, used_names)
                if explain:
                    explained = _write_explanations(model, result, device, explain, explain_max_boxes, annotated,
                                                    annotated_dir, writer, pending, tta)
                pil = Image.fromarray(result.image.permute(1, 2, 0).numpy())
                pending.append(writer.submit(save_annotated, pil, result.boxes, result.labels, result.scores,
                                             annotated_dir / annotated))
                result.image = None
                if len(pending) > 4 * batch_size:  # bound the images held in memory by queued writes
                    pending.pop(0).result()
            run.images.append(_image_record(result, annotated, soft))
            if explain and annotated:
                run.images[-1]["explanations"] = explained
            if progress is not None:
                progress(1)
        for future in pending:
            future.result()  # re-raise a failed write (disk full) instead of losing it
        if annotated_tar is not None:
            pack_folder(annotated_dir, annotated_tar)  # always written: a workflow declares it as an output
    run.overall = merge_compliance(image["compliance"] for image in run.images)
    size = working_size(model)
    run.estimates = prediction_estimates(run.images, calibration, score_threshold, tta, estimator, size)
    settings = {"working_size": size, **(settings or {})}  # an ensemble's caller names its members' sizes
    settings.update({"score_threshold": score_threshold, "tta": tta})
    # The validation record travels with the detections: a merge of shards corrects the counts with it.
    predictions = {**settings, "num_images": run.num_images, "detection_floor": D.DETECTION_FLOOR,
                   "num_detections": sum(len(i["detections"]) for i in run.images),
                   "images": [{k: v for k, v in i.items() if k != "compliance"} for i in run.images],
                   "calibration": calibration, "skipped": run.skipped}
    compliance_report = {**settings, "num_images": run.num_images, "overall": run.overall, **run.estimates,
                         "per_image": {i["file"]: i["compliance"] for i in run.images},
                         "skipped": run.skipped}
    names = output_names(tag)
    if "per_folder" in run.estimates:
        from .plots import plot_compliance_by_folder

        plot_compliance_by_folder(run.estimates["per_folder"], run.estimates["estimate"],
                                  output_dir / names["folder_plot"])
    run.outputs = {
        "predictions_json": write_json(output_dir / names["predictions_json"], predictions),
        "predictions_csv": write_text(output_dir / names["predictions_csv"], _csv_text(run.images)),
        "compliance_json": write_json(output_dir / names["compliance_json"], compliance_report),
        "annotated_dir": annotated_dir if annotate and annotated_tar is None else None,
        "annotated_tar": Path(annotated_tar) if annotated_tar is not None else None,
        "folder_plot": output_dir / names["folder_plot"] if "per_folder" in run.estimates else None,
    }
    return run


def _write_explanations(model, result: Detections, device, method: str, max_boxes: int, annotated: str,
                        folder: Path, writer, pending: list, tta: bool) -> list[dict]:
    """Explain one image's best detections (utils.detection.explain), made with flip TTA or not as *tta* says;
    overlays are written by *writer*."""
    from .explain import explain_image

    records = []
    stem = annotated[len("annotated_"):-len(".jpg")]
    for explanation in explain_image(model, result.image, result.boxes, result.labels, result.scores, device,
                                     method, max_boxes, tta):
        name = f"explain_{stem}_{explanation.index}.jpg"
        pending.append(writer.submit(_save_jpeg, explanation.overlay, folder / name))
        records.append({"detection": explanation.index, "label": explanation.label, "score": explanation.score,
                        "method": method, "file": name, "evidence_in_box": round(explanation.evidence_in_box, 4)})
    return records


def _save_jpeg(picture: Image.Image, path: Path, quality: int = 90) -> None:
    with atomic_path(path) as tmp:
        picture.save(tmp, format="JPEG", quality=quality)


def summary_line(run: PredictionRun) -> str:
    return compliance_line(run.overall, run.estimates.get("estimate"))


def _tag_of(path: Path) -> str:
    name = path.name
    return name[len("predictions_"):-len(".json")] if name.startswith("predictions_") else path.stem


def merge_predictions(parts, output_dir, histogram: str | None = "compliance_histogram.png",
                      folder_plot: str | None = "compliance_by_folder.png",
                      estimator: str = D.COMPLIANCE_ESTIMATOR) -> dict:
    """Merge the predictions_<tag>.json of fanned-out predict jobs into one compliance.json (overall with
    its estimate and interval, per folder, per shard, per image), one predictions.csv, a histogram of the
    per-image compliance and a plot of the per-folder figures (always drawn: a workflow declares it; one
    bar when the images sit in one folder).

    Per-image figures are recomputed from the detections, exactly as a single predict job computes
    them, and the estimates from the per-image records in file-name order, so the merge of N shards
    equals one job over the same images. The parts must agree on the model, the operating threshold and
    the model's validation record (else InputError naming the part).
    """
    import json

    from ..errors import InputError
    from .plots import plot_compliance_histogram

    output_dir = Path(output_dir)
    parts = sorted(Path(p) for p in parts)
    if not parts:
        raise InputError("no predictions_<tag>.json to merge")
    settings_keys = ("model", "backbone", "image_size", "working_size", "score_threshold", "score_threshold_source",
                     "tta")
    settings, per_shard, per_image, skipped, records_in, calibration = None, {}, {}, [], [], None
    csv_buffer = io.StringIO()
    writer = csv.writer(csv_buffer, lineterminator="\n")
    writer.writerow(PREDICTION_CSV_FIELDS)
    for part in parts:
        try:
            data = json.loads(part.read_text(encoding="utf-8"))
            images = data["images"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:  # Recursion: nested too deep
            raise InputError(f"{part}: not a predictions file of bin/predict.py ({error})") from None
        these = {key: data.get(key) for key in settings_keys}
        if settings is None:
            settings = these
        elif these != settings:
            differing = [key for key in settings_keys if these[key] != settings[key]]
            raise InputError(f"{part}: made with other settings than {parts[0].name} ({', '.join(differing)})")
        if part == parts[0]:
            calibration = data.get("calibration")
        elif data.get("calibration") != calibration:
            raise InputError(f"{part}: holds other validation rates than {parts[0].name} (another model file?)")
        records_in += images
        records = []
        for image in images:
            if image["file"] in per_image:
                raise InputError(f"{part}: image {image['file']} is also in another part")
            per_image[image["file"]] = record = compliance([d["label"] for d in image["detections"]])
            records.append(record)
            for det in image["detections"]:
                writer.writerow([image["file"], *det["box"], det["label"], det["score"]])
        skipped += data.get("skipped", [])
        per_shard[_tag_of(part)] = {"num_images": len(images), "skipped": len(data.get("skipped", [])),
                                    **merge_compliance(records)}
    overall = merge_compliance(per_image.values())
    estimates = prediction_estimates(records_in, calibration, settings["score_threshold"], bool(settings["tta"]),
                                     estimator, settings["working_size"])
    report = {**settings, "num_parts": len(parts), "num_images": len(per_image), "overall": overall, **estimates,
              "per_shard": per_shard, "per_image": per_image, "skipped": skipped}
    outputs = {"compliance_json": write_json(output_dir / "compliance.json", report),
               "predictions_csv": write_text(output_dir / "predictions.csv", csv_buffer.getvalue())}
    if folder_plot:
        from .plots import plot_compliance_by_folder

        plot_compliance_by_folder(estimates.get("per_folder", {}), estimates["estimate"], output_dir / folder_plot)
        outputs["folder_plot"] = output_dir / folder_plot
    if histogram:
        percentages = [r["percent_properly_masked"] for r in per_image.values() if r["faces"]]
        plot_compliance_histogram(percentages, output_dir / histogram, overall["percent_properly_masked"],
                                  no_faces=len(per_image) - len(percentages))
        outputs["histogram"] = output_dir / histogram
    return {"report": report, "outputs": outputs}
