"""The predict job: detections, annotated images and the mask-compliance figure for image files.

Inputs are image files, folders of images, or .tar archives of images, in any mix.
Every file that cannot be used (missing, not an image, undecodable, a link to nothing,
a name that is not UTF-8, a file already read) is listed as skipped with its reason in
predictions.json and compliance.json; the others still run.

Pipeline: DataLoader workers decode ahead of the model (utils.detection.inference), and
annotated copies are drawn and JPEG-encoded by a thread pool while the model works
on the next batch, so the model rarely waits for files.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image

from .. import defaults as D
from ..atomic import atomic_files, atomic_path, dump_json
from ..classes import NAME_OF
from ..data.images import (NOT_UTF8, escaped_name, is_annotation_name, is_image_name, list_files, not_an_image,
                           valid_utf8_name)
from ..naming import annotated_stem
from ..naming import output_names as job_output_names
from .inference import Detections, ImageItem, Skipped, detect_files, detection_floor
from .inference_size import working_size
from .compliance import compliance, compliance_line, listed_score, merge_compliance
from .quantify import prediction_estimates, soft_counts
from ..data.pairs import members_in_place, open_folder, open_member, pack_folder
from .plots import save_annotated
from .predictions_csv import write_predictions_csv
from .prediction_progress import PredictionProgress, drawn_files, inputs_fingerprint, progress_path
from ..stop import check_stop

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _image_item(name: str, relative: str, path: Path, root_folder: str, skipped: list, member=None, archive=None):
    """The item of the file *name* (*relative*: its path below the folder or archive listed; *member*, of the open
    *archive*, when read where it lies), its folder *root_folder* joined with the one below; None for a VOC file,
    and for a file that is no image by its bytes (utils.data.images.IMAGE_FORMATS: a photo named .jfif, .jpe or
    nothing is one), its reason in *skipped*. A file of no image name has its header read now: one that is no image
    (a video beside the photos) is neither decoded nor hashed, and is listed as the unpacked archive lists it."""
    if is_annotation_name(relative):  # annotations beside images are expected, not a problem
        return None
    if not is_image_name(relative) and (problem := not_an_image(path if member is None else
                                                                open_member(archive, member), name)):
        skipped.append({"file": name, "reason": problem})
        return None
    parent = posixpath.dirname(relative)
    return ImageItem(name, path, "/".join(part for part in (root_folder, parent) if part), member)


def _folder_items(folder: Path, prefix: str, skipped: list, seen: dict, exclude=(), root_folder: str = ""):
    """The images below *folder* (utils.data.images.list_files: subfolders, links followed, duplicates of
    *seen* and the paths in *exclude* left out and listed), named *prefix* + their path below it; each one's
    folder is *root_folder* joined with its folder below *folder*."""
    files, problems = list_files(folder, prefix, exclude, seen)
    skipped += problems
    items = (_image_item(f"{prefix}{file.relative}", file.relative, file.path, root_folder, skipped) for file in files)
    return [item for item in items if item is not None]


def _root_folders(roots: list[Path]) -> dict[Path, str]:
    """The folder each of the folders given stands for in the figures per folder: its path below the folder
    all of them are in ('siteA' and 'siteB/cam1' for in/siteA and in/siteB/cam1); "" for one folder."""
    absolute = {root: os.path.abspath(root) for root in roots}
    if len(set(absolute.values())) < 2:
        return dict.fromkeys(roots, "")
    common = os.path.commonpath(list(absolute.values()))
    return {root: "" if path == common else Path(os.path.relpath(path, common)).as_posix()
            for root, path in absolute.items()}


def _archive_names(archives: list[Path]) -> dict[Path, str]:
    """The name each archive's images are prefixed with: its file name, or as many of its folders before it as
    tell it from other archives of that name ('a/shard-000000.tar' and 'b/shard-000000.tar')."""
    parts = {archive: Path(os.path.abspath(archive)).parts for archive in archives}
    names = {}
    for archive, own in parts.items():
        for count in range(1, len(own) + 1):
            tail = own[-count:]
            if all(other[-count:] != tail for other in parts.values() if other != own):
                break
        names[archive] = PurePosixPath(*tail).as_posix()
    return names


def _same_file(path: Path, name: str, seen: dict) -> str | None:
    """Why *path* is not read again: the same file (links resolved) as one already listed; None, recording it."""
    real = path.resolve()
    if real in seen:
        return f"the same file as {seen[real]} (listed once)"
    seen[real] = name
    return None


def collect_inputs(paths, stack: contextlib.ExitStack, exclude=(), read: list | None = None):
    """(items, skipped): image files from files, folders and archives; skipped entries are {file, reason}.

    A file reached twice (folders given that overlap, a folder and a file in it, the same archive twice)
    is read once, the later ones listed as skipped; the paths in *exclude* (the run's own outputs, when
    they sit inside a folder given) are not inputs. Each image's folder (the figure per folder) is its
    folder below the folder given, prefixed, when several folders are given, with that folder's path
    below the one they are all in; an archive's images keep the folders inside it (the shards of one
    collection, bin/make_shards.py, give the figures the collection's folder gives). *read*, when given,
    gets the files the items come from (an archive, not its members), for the run record.
    """
    items, skipped, seen = [], [], {}
    read = [] if read is None else read
    paths = [Path(raw) for raw in paths]
    roots = _root_folders([path for path in paths if path.is_dir()])
    archives = _archive_names(list({path.resolve(): path for path in reversed(paths) if _is_archive(path)}.values()))
    for path in paths:
        if not valid_utf8_name(path):
            skipped.append({"file": escaped_name(path), "reason": NOT_UTF8})
        elif path.is_dir():
            found = _folder_items(path, f"{path.as_posix().rstrip('/')}/", skipped, seen, exclude, roots[path])
            items += found
            read += [item.path for item in found]
        elif _is_archive(path):
            if reason := _same_file(path, str(path), seen):
                skipped.append({"file": str(path), "reason": reason})
                continue
            members = members_in_place(path)  # a plain .tar is read where its files lie, not unpacked
            if members is None:
                try:
                    folder = stack.enter_context(open_folder(path))
                except Exception as exc:  # a damaged archive is one skipped input, not a failed job
                    problem = str(exc).removeprefix(f"{path}: ")  # the file is the entry's
                    skipped.append({"file": str(path), "reason": f"cannot unpack archive: {problem}"})
                    continue
                items += _folder_items(folder, f"{archives[path]}:", skipped, seen)
            else:
                with tarfile.open(path, "r:") as archive:  # reads the first header only
                    found = [_image_item(f"{archives[path]}:{member.relative}", member.relative, path, "", skipped,
                                         member, archive) for member in members]
                items += [item for item in found if item is not None]
            read.append(path)
        elif path.is_file():
            if reason := _same_file(path, str(path), seen):
                skipped.append({"file": str(path), "reason": reason})
                continue
            items.append(ImageItem(str(path), path))  # named explicitly: try it whatever its extension
            read.append(path)
        else:
            skipped.append({"file": str(path), "reason": "file does not exist"})
    return items, skipped


ANNOTATED_FILE = re.compile(r"\.?(annotated|explain)_.+\.jpg")  # a leading dot: utils.atomic's temporary


def remove_outputs(files, annotated_dir: Path) -> None:
    """Remove a predict run's *files* and the annotated images (annotated_*.jpg, explain_*.jpg, and such a write
    a kill cut short) in *annotated_dir*: a rerun into the same folders leaves only its own outputs (no figure per
    folder of the last run's folders)."""
    for file in files:
        Path(file).unlink(missing_ok=True)
    if annotated_dir.is_dir():
        for file in annotated_dir.iterdir():
            if ANNOTATED_FILE.fullmatch(file.name) and file.is_file() and not file.is_symlink():
                file.unlink()



def _annotated_name(item: ImageItem, used: set, next_number: dict) -> str:
    """The first of annotated_<stem>.jpg, annotated_<stem>_2.jpg, ... not in *used*. *next_number* keeps, per stem,
    the number to try from: names are only added to *used*, so those before it are taken, and 1000 archives of
    the same file names cost one try an image instead of one per archive before it (quadratic)."""
    stem = annotated_stem(f"{item.folder}/{item.file_name}" if item.folder else item.file_name)
    n = next_number.get(stem, 1)
    name = f"annotated_{stem}.jpg" if n == 1 else f"annotated_{stem}_{n}.jpg"
    while name in used:  # two inputs with the same stem (different folders) must not overwrite each other
        n += 1
        name = f"annotated_{stem}_{n}.jpg"
    used.add(name)
    next_number[stem] = n + 1
    return name


@dataclass
class PredictionRun:
    images: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    inputs: list = field(default_factory=list)  # the files read (an archive's members: the archive)
    inputs_sha256: dict = field(default_factory=dict)  # path -> sha256 of the files hashed as they were decoded
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
        {"box": [round(v, 2) for v in box], "label": NAME_OF[int(label)], "score": listed_score(score)}
        for box, label, score in zip(result.boxes.tolist(), result.labels.tolist(), result.scores.tolist())
    ]
    return {"file": result.item.name, "folder": result.item.folder, "width": result.width, "height": result.height,
            "annotated": annotated, "detections": detections, "soft_counts": soft,
            "compliance": compliance([d["label"] for d in detections])}


PREDICTION_FILES = ("predictions_json", "predictions_csv", "compliance_json")


def write_prediction_files(targets: dict, predictions: dict, report: dict, images: list, estimates: dict,
                           folder_plot: Path, record=None) -> dict:
    """Write predictions.json, predictions.csv and compliance.json at *targets* (keyed as PREDICTION_FILES), the
    plot per folder when *estimates* has figures per folder, and the run record *record()* gives at
    targets["run_record"]. Each file is streamed to a temporary file and renamed in with the others (atomic_files):
    a failure leaves no half of the set (nor this run's figures beside the last run's record, which names another
    model), and no file's whole text is held (rendered as strings first, they held ~4 times the records: ~600 MB
    more at 100k images)."""
    with atomic_files() as files:
        with files.writing(targets["predictions_json"]) as tmp:  # a full disk's error names the file
            dump_json(predictions, tmp)
        with files.writing(targets["predictions_csv"]) as tmp:
            write_predictions_csv(images, tmp)
        with files.writing(targets["compliance_json"]) as tmp:
            dump_json(report, tmp)
        if "per_folder" in estimates:
            from .plots import plot_compliance_by_folder

            plot_compliance_by_folder(estimates["per_folder"], estimates["estimate"], folder_plot)
        if record is not None:
            with files.writing(targets["run_record"]) as tmp:
                dump_json(record(), tmp)
    return dict(targets)


def output_names(tag: str | None = None) -> dict[str, str]:
    """The predict job's output file names; with a *tag* (a shard's name) they carry it, so that
    the fanned-out jobs of one workflow write distinct files for the merge job."""
    return job_output_names("predict", tag)


def annotation_sample(count: int, limit: int | None) -> set[int]:
    """Indices of the images to draw: all, or *limit* spread evenly over the *count* inputs."""
    if limit is None or limit >= count:
        return set(range(count))
    return {index * count // limit for index in range(limit)}


def predict_images(model, paths, output_dir, annotated_dir=None, device="cpu",
                   score_threshold: float = D.SCORE_THRESHOLD, tta: bool = False,
                   batch_size: int = D.INFERENCE_BATCH_SIZE, num_workers: int | None = None,
                   annotate: bool = True, progress=None, settings: dict | None = None,
                   annotate_max: int | None = None, annotated_tar=None, tag: str | None = None,
                   explain: str | None = None, explain_max_boxes: int = D.EXPLAIN_MAX_BOXES,
                   calibration: dict | None = None, estimator: str = D.COMPLIANCE_ESTIMATOR, resume: dict | None = None,
                   make_record=None) -> PredictionRun:
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
    also get one figure per folder and compliance_by_folder.png. With *resume* (the caller's part of the run's
    key: its model files' hashes), the records of the images done are kept in a progress file as they finish, and
    a run stopped part way, started again with the same key, reads only the others (prediction_progress.py);
    with resume["inputs_by_content"] the key holds the files read by content (a progress moved to another machine).
    *make_record(run)* gives the run record, written with the outputs as one set.
    """
    output_dir = Path(output_dir)
    annotated_dir = Path(annotated_dir) if annotated_dir else output_dir / "annotated"
    run = PredictionRun()
    names = output_names(tag)
    outputs = [output_dir / name for name in names.values()] + ([Path(annotated_tar)] if annotated_tar else [])
    floor = detection_floor(score_threshold)
    records: dict[str, dict] = {}  # image name -> record
    with contextlib.ExitStack() as stack:
        items, run.skipped = collect_inputs(paths, stack, [output_dir, *outputs, annotated_dir], run.inputs)
        drawn = {items[index].name for index in annotation_sample(len(items), annotate_max)} if annotate else set()
        journal = None
        if resume is not None:
            key = {**resume, "score_threshold": score_threshold, "floor": floor, "tta": tta,
                   "working_size": working_size(model), "explain": [explain, explain_max_boxes],
                   "annotated": str(annotated_tar or annotated_dir),
                   "inputs": inputs_fingerprint(items, run.inputs, drawn, bool(resume.get("inputs_by_content")))}
            journal = PredictionProgress(progress_path(output_dir, names["predictions_json"]), key,
                                         [item.name for item in items], batch_size)
            stack.callback(journal.close)
            if journal.stale:
                print(f"predict: {journal.path.name}: the progress of a stopped run with another model, setting or "
                      "input set (or unreadable); starting afresh")
        done = journal.done if journal is not None else []
        remove_outputs(outputs, annotated_dir)  # a rerun's files replace the last run's, none left over
        if journal is not None:  # drawn beside the progress file, moved in (or packed) once the run is done
            drawing_dir = journal.drawings
        elif annotated_tar is not None:  # drawn into a folder, then packed
            drawing_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="annotated.")))
        else:
            drawing_dir = annotated_dir
        if annotate:
            drawing_dir.mkdir(parents=True, exist_ok=True)
        used_names: set[str] = set()  # annotated names in input order, a resumed run's as a run never stopped
        next_number: dict[str, int] = {}
        path_of, folder_of = {item.name: item.path for item in items}, {item.name: item.folder for item in items}
        for record in done:
            if "sha256" in record:  # hashed by the run that decoded it, for the run record
                run.inputs_sha256[path_of[record["file"]]] = record.pop("sha256")
            if "skipped" in record:
                run.skipped.append({"file": record["file"], "reason": record["skipped"],
                                    "folder": folder_of[record["file"]]})
            else:
                records[record["file"]] = record
                used_names.update(drawn_files(record)[:1])
        if done:
            print(f"predict: resuming a stopped run: {len(done)} of {len(items)} inputs done "
                  f"({journal.path.name}), {len(items) - len(done)} to read")
            if progress is not None:
                progress(len(records))  # the bar counts the run's images, the resumed ones too
        writer = stack.enter_context(ThreadPoolExecutor(max_workers=2, thread_name_prefix="annotate"))
        pending = []
        # Detections down to the floor feed the probabilistic count; only those at the threshold are counted,
        # drawn and listed.
        for result in detect_files(model, items[len(done):], device, batch_size=batch_size, score_threshold=floor,
                                   tta=tta, num_workers=num_workers, keep_images=drawn,
                                   image_side=D.ANNOTATED_MAX_SIDE):
            hashed = {"sha256": result.sha256} if result.sha256 is not None else {}
            if hashed:
                run.inputs_sha256[result.item.path] = result.sha256
            if isinstance(result, Skipped):  # an image's folder: one of them alone is said so per folder
                run.skipped.append({"file": result.item.name, "reason": result.reason, "folder": result.item.folder})
                if journal is not None:
                    journal.add({"file": result.item.name, "skipped": result.reason, **hashed})
                    check_stop(journal.stopped_at(len(records), len(items)))
                continue
            soft = _keep_counted(result, score_threshold)
            annotated = None
            explained = []
            if result.item.name in drawn:
                annotated = _annotated_name(result.item, used_names, next_number)
                if explain:
                    explained = _write_explanations(model, result, device, explain, explain_max_boxes, annotated,
                                                    drawing_dir, writer, pending, tta)
                pil = Image.fromarray(result.image.permute(1, 2, 0).numpy())
                pending.append(writer.submit(save_annotated, pil, result.image_boxes(), result.labels, result.scores,
                                             drawing_dir / annotated))
                result.image = result.model_input = None
                while len(pending) > 4 * batch_size:  # bound the pictures queued writes hold: an image drawn
                    pending.pop(0).result()  # with --explain queues 1 + its overlays, not 1
            record = _image_record(result, annotated, soft)
            if explain and annotated:
                record["explanations"] = explained
            records[result.item.name] = record
            if journal is not None:
                journal.add({**record, **hashed})
                check_stop(journal.stopped_at(len(records), len(items)))
            if progress is not None:
                progress(1)
        for future in pending:
            future.result()  # re-raise a failed write (disk full) instead of losing it
        if annotated_tar is not None:
            pack_folder(drawing_dir, annotated_tar)  # always written: a workflow declares it as an output
    run.images = [records[item.name] for item in items if item.name in records]  # in input order, resumed or not
    run.overall = merge_compliance(image["compliance"] for image in run.images)
    size = working_size(model)
    run.estimates = prediction_estimates(run.images, calibration, score_threshold, tta, estimator, size, run.skipped)
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
    targets = {key: output_dir / names[key] for key in PREDICTION_FILES + (("run_record",) if make_record else ())}
    run.outputs = write_prediction_files(targets, predictions, compliance_report, run.images, run.estimates,
                                         output_dir / names["folder_plot"],
                                         make_record and (lambda: make_record(run)))
    run.outputs.update({
        "annotated_dir": annotated_dir if annotate and annotated_tar is None else None,
        "annotated_tar": Path(annotated_tar) if annotated_tar is not None else None,
        "folder_plot": output_dir / names["folder_plot"] if "per_folder" in run.estimates else None,
    })
    if journal is not None:  # the outputs are written: the drawings join them, and nothing is left to resume
        if annotate and annotated_tar is None:
            annotated_dir.mkdir(parents=True, exist_ok=True)
            for record in run.images:
                for file in drawn_files(record):
                    shutil.move(journal.drawings / file, annotated_dir / file)
        journal.finish()
    return run


def _write_explanations(model, result: Detections, device, method: str, max_boxes: int, annotated: str,
                        folder: Path, writer, pending: list, tta: bool) -> list[dict]:
    """Explain one image's best detections (utils.detection.explain), made with flip TTA or not as *tta* says;
    overlays are written by *writer*."""
    from .explain import explain_image

    records = []
    stem = annotated[len("annotated_"):-len(".jpg")]
    for explanation in explain_image(model, result.model_input, result.input_boxes(), result.labels, result.scores,
                                     device, method, max_boxes, tta, picture=result.image):
        name = f"explain_{stem}_{explanation.index}.jpg"
        pending.append(writer.submit(_save_jpeg, explanation.overlay, folder / name))
        records.append({"detection": explanation.index, "label": explanation.label, "score": explanation.score,
                        "method": method, "file": name, "evidence_in_box": round(explanation.evidence_in_box, 4)})
    return records


def _save_jpeg(picture: Image.Image, path: Path, quality: int = D.ANNOTATED_JPEG_QUALITY) -> None:
    with atomic_path(path) as tmp:
        picture.save(tmp, format="JPEG", quality=quality)


def summary_line(run: PredictionRun) -> str:
    return compliance_line(run.overall, run.estimates.get("estimate"))
