"""The merge_predictions job: the predictions_<tag>.json of fanned-out predict jobs (one per shard) as one
compliance.json, predictions.csv and its plots; each part's structure checked first (check_part)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .. import defaults as D
from ..atomic import atomic_files, dump_json
from ..classes import CLASSES
from ..errors import InputError, is_finite_number, shown
from ..stop import is_stand_in
from .compliance import compliance, merge_compliance
from .predictions_csv import write_predictions_csv
from .quantify import Calibration, prediction_estimates

# box_vote_iou: None without box voting (and in parts from before it, which ran without); shards voting otherwise
# than their fellows made other detections, and the merged compliance.json says how they were made
SETTINGS_KEYS = ("model", "backbone", "image_size", "working_size", "score_threshold", "score_threshold_source", "tta",
                 "box_vote_iou")
BOX_TOLERANCE = 0.01  # boxes are written rounded to 2 decimals
MIXED_SIZES = re.compile(r"mixed: [1-9][0-9]*(, [1-9][0-9]*)+")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _mixed_sizes(value) -> bool:
    """Whether *value* is an ensemble's working size when its members run at different ones (ensemble.load_ensemble
    writes 'mixed: 128, 160'): fold models each choose theirs on their own validation images."""
    return isinstance(value, str) and MIXED_SIZES.fullmatch(value) is not None


def check_part(part: Path, data) -> list[dict]:
    """The images of the predictions file *part* (bin/predict.py's predictions.json), its structure checked:
    InputError naming the file and the field at the first problem. Missing keys a predict job always
    writes are errors, except "folder" (parts from before the figure per folder: the top folder),
    "soft_counts" (before the probabilistic count) and "working_size"."""
    def fail(field: str, problem: str):
        raise InputError(f"{part}: {field}: {problem} (not a predictions file of bin/predict.py?)")

    if not isinstance(data, dict):
        fail("the file", f"a JSON {type(data).__name__}, not an object")
    for key in ("images", "skipped", "score_threshold", "tta"):
        if key not in data:
            fail(key, "missing")
    if not is_finite_number(data["score_threshold"]) or not 0 <= data["score_threshold"] <= 1:
        fail("score_threshold", f"{data['score_threshold']!r} is not a number from 0 to 1")
    if not isinstance(data["tta"], bool):
        fail("tta", f"{data['tta']!r} is not true or false")
    if data.get("working_size") is not None and not (_positive_int(data["working_size"])
                                                     or _mixed_sizes(data["working_size"])):
        fail("working_size", f"{data['working_size']!r} is not a positive whole number (nor an ensemble's "
                             "'mixed: 128, 160')")
    if data.get("calibration") is not None and not isinstance(data["calibration"], dict):
        fail("calibration", f"a {type(data['calibration']).__name__}, not an object or null")
    if data.get("calibration") is not None:
        try:  # read as the estimates will read it: a malformed one was a traceback after every part was read
            Calibration.from_record(data["calibration"])
        except (KeyError, TypeError, ValueError) as problem:
            fail("calibration", f"not the model's validation record ({type(problem).__name__}: {shown(str(problem))})")
    if not isinstance(data["skipped"], list):
        fail("skipped", f"a {type(data['skipped']).__name__}, not a list")
    for number, entry in enumerate(data["skipped"]):
        if not (isinstance(entry, dict) and all(isinstance(entry.get(key), str) for key in ("file", "reason"))
                and isinstance(entry.get("folder", ""), str)):  # folder: an image's (parts from before: none)
            fail(f"skipped[{number}]", f"{entry!r} is not {{file, reason, folder}}")
    if not isinstance(data["images"], list):
        fail("images", f"a {type(data['images']).__name__}, not a list")
    files = set()
    for number, image in enumerate(data["images"]):
        where = f"images[{number}]"
        if not isinstance(image, dict):
            fail(where, f"a {type(image).__name__}, not an object")
        for key in ("file", "width", "height", "detections"):
            if key not in image:
                fail(f"{where}.{key}", "missing")
        if not isinstance(image["file"], str) or not image["file"]:
            fail(f"{where}.file", f"{image['file']!r} is not a file name")
        if image["file"] in files:
            fail(f"{where}.file", f"{image['file']} is listed twice")
        files.add(image["file"])
        if not isinstance(image.get("folder", ""), str):
            fail(f"{where}.folder", f"{image['folder']!r} is not a folder name")
        for key in ("width", "height"):
            if not _positive_int(image[key]):
                fail(f"{where}.{key}", f"{image[key]!r} is not a positive whole number")
        _check_detections(image, where, fail)
        soft = image.get("soft_counts")
        if soft is not None and not (isinstance(soft, dict) and set(soft) == set(CLASSES)
                                     and all(is_finite_number(value) and value >= 0 for value in soft.values())):
            fail(f"{where}.soft_counts", f"{soft!r} is not a non-negative number for each of {', '.join(CLASSES)}")
    return data["images"]


def _check_detections(image: dict, where: str, fail) -> None:
    if not isinstance(image["detections"], list):
        fail(f"{where}.detections", f"a {type(image['detections']).__name__}, not a list")
    width, height = image["width"] + BOX_TOLERANCE, image["height"] + BOX_TOLERANCE
    for number, detection in enumerate(image["detections"]):
        field = f"{where}.detections[{number}]"
        if not isinstance(detection, dict):
            fail(field, f"a {type(detection).__name__}, not an object")
        if detection.get("label") not in CLASSES:
            fail(f"{field}.label", f"{detection.get('label')!r} is not one of {', '.join(CLASSES)}")
        score = detection.get("score")
        if not is_finite_number(score) or not 0 <= score <= 1:
            fail(f"{field}.score", f"{score!r} is not a number from 0 to 1")
        box = detection.get("box")
        if not (isinstance(box, list) and len(box) == 4 and all(map(is_finite_number, box))
                and 0 <= box[0] <= box[2] <= width and 0 <= box[1] <= box[3] <= height):
            fail(f"{field}.box", f"{box!r} is not [xmin, ymin, xmax, ymax] inside the "
                                 f"{image['width']}x{image['height']} image")


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
    them, and the estimates from the per-image records (drawn in the order of their numbers, not of their names,
    shard-000000.tar:x.jpg here), so the merge of N shards equals one job over the same images. The parts must
    agree on the model, the operating threshold and the model's validation record, each shard tag come once and
    each file, read or skipped, sit in one part only (else InputError naming the part).
    """
    from .plots import plot_compliance_histogram

    output_dir = Path(output_dir)
    parts = sorted(Path(p) for p in parts)
    if not parts:
        raise InputError("no predictions_<tag>.json to merge")
    settings_keys = SETTINGS_KEYS
    settings, per_shard, per_image, skipped, records_in, calibration = None, {}, {}, [], [], None
    part_of_tag, part_of_file = {}, {}  # a shard's tag and a file to the part that holds it: each in one part only
    for part in parts:
        if (tag := _tag_of(part)) in part_of_tag:
            raise InputError(f"{part}: shard {tag} again (also {part_of_tag[tag]}): the parts of one merge are one "
                             "run's shards, each once")
        part_of_tag[tag] = part
        if is_stand_in(part):
            raise InputError(f"{part}: a stand-in, not a predictions file: the predict job that writes it was stopped "
                             "(SIGTERM) before it finished; rerun that job (it resumes from its progress file)")
        try:
            data = json.loads(part.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as error:  # Recursion: nested too deep
            raise InputError(f"{part}: not a predictions file of bin/predict.py ({error})") from None
        images = check_part(part, data)
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
        held = {**{e["file"]: "skipped" for e in data["skipped"]}, **{image["file"]: "read" for image in images}}
        for file, role in held.items():
            if (other := part_of_file.setdefault(file, (part, role)))[0] != part:
                raise InputError(f"{part}: {file} ({role} here) is also in {other[0]} ({other[1]} there): "
                                 "the shards overlap")
        for image in images:
            per_image[image["file"]] = record = compliance([d["label"] for d in image["detections"]])
            records.append(record)
        skipped += data["skipped"]
        per_shard[_tag_of(part)] = {"num_images": len(images), "skipped": len(data["skipped"]),
                                    **merge_compliance(records)}
    overall = merge_compliance(per_image.values())
    size = settings["working_size"] if _positive_int(settings["working_size"]) else None  # an ensemble's: no rates
    estimates = prediction_estimates(records_in, calibration, settings["score_threshold"], bool(settings["tta"]),
                                     estimator, size, skipped)
    report = {**settings, "num_parts": len(parts), "num_images": len(per_image), "overall": overall, **estimates,
              "per_shard": per_shard, "per_image": per_image, "skipped": skipped}
    outputs = {"compliance_json": output_dir / "compliance.json", "predictions_csv": output_dir / "predictions.csv"}
    with atomic_files() as files:  # the two files as one set, streamed (the CSV of 100k images is not held)
        with files.writing(outputs["compliance_json"]) as tmp:
            dump_json(report, tmp)
        with files.writing(outputs["predictions_csv"]) as tmp:
            write_predictions_csv(records_in, tmp)
        if folder_plot:
            from .plots import plot_compliance_by_folder

            plot_compliance_by_folder(estimates.get("per_folder", {}), estimates["estimate"],
                                      output_dir / folder_plot)
            outputs["folder_plot"] = output_dir / folder_plot
        if histogram:
            percentages = [r["percent_properly_masked"] for r in per_image.values() if r["faces"]]
            plot_compliance_histogram(percentages, output_dir / histogram, overall["percent_properly_masked"],
                                      no_faces=len(per_image) - len(percentages))
            outputs["histogram"] = output_dir / histogram
    return {"report": report, "outputs": outputs}
