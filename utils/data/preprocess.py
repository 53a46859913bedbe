"""Preprocessing of the val and test sets, and the input/output plumbing it shares with augmentation.

Every image is kept as it is where it can be (--format source, the default: a JPEG or PNG photo
that is not shrunk is copied byte for byte, any other written as lossless PNG) or
re-encoded as 8-bit RGB JPEG or PNG, optionally with its longest side capped; its VOC
annotation is carried along with the objects cleaned (utils.data.voc.clean_objects) and the
boxes moved by torchvision.transforms.v2 with the pixels (utils.data.box_transforms, imported
only when a photo is shrunk, so that a set kept at its size is written without torch). Outputs
are flat folders (image and XML side by side, which
utils.data.pairs.pair_folders reads back) or a flat .tar, named <prefix><stem>.<ext>
(the prefix a plain file-name part, utils.naming.name_part_problem).

Both are written whole or not at all: the .tar from a temporary folder, the output folder
in a hidden folder beside it that replaces it once complete (output_folder), so no file of
an earlier set lingers. The output folder lists its files in a hidden SET_FILES_NAME; a
folder holding anything else is refused (check_output_dir), never replaced.

Unreadable inputs are skipped, and every skipped file and dropped or clipped
object is listed in the job report; the job fails only when nothing was processed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..atomic import atomic_path, follow_umask, replace_folder, write_json
from .. import defaults as D
from ..classes import CLASSES, NO_LABEL_MAP, LabelMap
from ..errors import InputError, shown
from ..naming import name_part_problem
from .images import ImageError, file_encoding, load_rgb
from .pairs import SUBFOLDER_NOT_READ, Pair, open_folder, pack_folder, pair_folders, read_pairs_csv
from ..provenance import run_record
from ..stop import check_stop
from .voc import VocAnnotation, VocError, clean_objects, parse_voc_for_image, write_voc

FORMATS = {"jpg": "JPEG", "png": "PNG"}
# --format source: a JPEG or PNG photo that needs no resizing goes into the set byte for byte, any other as lossless
# PNG; so a val or test image decodes to the very pixels predict reads from the photo (utils/defaults.py
# PREPROCESS_FORMAT says why)
SOURCE = "source"
# MPO: a JPEG with a multi-picture (MPF) preview, as many cameras and phones write; Pillow decodes its first
# picture, the photo, from the copy as from the photo
KEPT_ENCODINGS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png"}


class NothingProcessedError(InputError, RuntimeError):
    """No input could be processed; str() says why in one line."""


@dataclass
class JobLog:
    """What a data job did, for its report: nothing is dropped without a line here."""

    inputs: int = 0
    processed: int = 0
    written: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"file", "problem"}: input not used at all
    object_problems: list[dict] = field(default_factory=list)  # {"file", "problem"}: object dropped or clipped
    extra: dict = field(default_factory=dict)

    def skip(self, file, problem: str):
        self.skipped.append({"file": str(file), "problem": problem})

    def as_report(self) -> dict:
        return {"inputs": self.inputs, "images_processed": self.processed, "files_written": len(self.written),
                "images_skipped": len(self.skipped), "skipped": self.skipped,
                "object_problems": self.object_problems, **self.extra}


@dataclass
class LoadedPair:
    pair: Pair
    image: object  # PIL RGB image
    annotation: VocAnnotation  # objects cleaned against the real image size


# ---------------------------------------------------------------------------------------------
# Inputs

def _as_list(paths) -> list[Path]:
    return [Path(p).resolve() for p in (paths if isinstance(paths, (list, tuple)) else [paths])]


def display_paths(paths) -> str:
    """A path, or several shards, as one short name for a message."""
    paths = paths if isinstance(paths, (list, tuple)) else [paths]
    return str(paths[0]) if len(paths) == 1 else f"{paths[0]} (and {len(paths) - 1} more shards)"


@contextlib.contextmanager
def open_inputs(images, annotations, split_csv=None, split=None, log: JobLog | None = None):
    """Yield the list of Pairs to process from folders or .tar archives (the same path may be both);
    *images* / *annotations* may also be lists of .tar shards (utils.data.pairs.open_folder).

    With *split_csv*, pairs come from the CSV (optionally only rows of *split*), names
    resolved inside the given folders; without it, images and XML are paired by stem.
    Entries whose files are missing are reported in *log* and left out.
    """
    log = log if log is not None else JobLog()
    with contextlib.ExitStack() as stack:
        images_dir = stack.enter_context(open_folder(images))
        same = _as_list(annotations) == _as_list(images)
        annotations_dir = images_dir if same else stack.enter_context(open_folder(annotations))
        if split_csv is not None:
            rows = read_pairs_csv(split_csv, images_dir=images_dir, annotations_dir=annotations_dir, split=split)
            pairs = []
            for pair in rows:
                missing = [p for p in (pair.image, pair.annotation) if not p.is_file()]
                if missing:
                    log.skip(missing[0].name, f"listed in {Path(split_csv).name} but not found in the inputs")
                else:
                    pairs.append(pair)
            if not rows:
                where = f" with split {split!r}" if split else ""
                raise NothingProcessedError(f"{split_csv}: no rows{where}")
        else:
            pairing = pair_folders(images_dir, annotations_dir)
            pairs = pairing.pairs
            for path in pairing.images_without_annotation:
                log.skip(path.name, "image has no annotation file (no .xml with the same stem)")
            for path in pairing.annotations_without_image:
                log.skip(path.name, "annotation has no image with the same stem")
            for folder in pairing.folders:
                log.skip(f"{folder.name}/", SUBFOLDER_NOT_READ)
            for item in pairing.left_out:  # the reason evaluate and predict give
                log.skip(Path(item["file"]).name, item["reason"])
        log.inputs = len(pairs) + len(log.skipped)
        yield pairs


def load_pair(pair: Pair, log: JobLog, label_map: LabelMap = NO_LABEL_MAP) -> LoadedPair | None:
    """Decode the image (8-bit RGB) and parse (names through *label_map*) and clean its annotation; None (and
    a report line) on failure."""
    try:
        image = load_rgb(pair.image)
    except ImageError as exc:
        log.skip(pair.image.name, exc.problem)
        return None
    try:
        ann, turned = parse_voc_for_image(pair.annotation, pair.image, image.size, label_map)
    except VocError as exc:
        log.skip(pair.annotation.name, exc.problem)
        return None
    if turned:
        log.object_problems.append({"file": pair.annotation.name, "problem": turned})
    if (ann.width, ann.height) != image.size:
        said = (ann.size_problem if ann.width is None
                else f"size in XML {ann.width}x{ann.height} differs from the image's {image.width}x{image.height}")
        log.object_problems.append({"file": pair.annotation.name,
                                    "problem": f"{said}; boxes checked against the image"})
    kept, problems = clean_objects(ann, image.width, image.height, known_classes=CLASSES)
    log.object_problems.extend({"file": pair.annotation.name, "problem": p} for p in problems)
    ann = VocAnnotation(filename=ann.filename, width=image.width, height=image.height, depth=3, objects=kept,
                        folder=ann.folder)
    return LoadedPair(pair, image, ann)


# ---------------------------------------------------------------------------------------------
# Outputs

# A set written with --output-dir is staged in a hidden folder beside the output folder and renamed into its place
# when complete; the hidden list SET_FILES_NAME inside it names the set's files, so that the next run into the
# folder knows what it may replace (the whole folder, as validate_data's annotations_clean/) and what it must not.
SET_FILES_NAME = ".set_files.json"


def _set_files(folder: Path) -> set[str]:
    """The file names an earlier run listed in *folder*'s SET_FILES_NAME; none when it is missing or unreadable."""
    try:
        listed = json.loads((folder / SET_FILES_NAME).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return set()
    return {name for name in listed if isinstance(name, str)} if isinstance(listed, list) else set()


def check_output_dir(output_dir, *inputs) -> None:
    """Raise InputError (one line naming the folder) unless the set may replace *output_dir* whole: the folder is
    new, or holds nothing but the files an earlier preprocess or augment run listed in it (an older set, never
    anything of its owner's), and it is none of the *inputs* (paths, or lists of them) and does not hold the working
    directory."""
    if output_dir is None:
        return
    given, folder = Path(output_dir), Path(output_dir).resolve()
    if folder in {path for paths in inputs for path in _as_list(paths)}:
        raise InputError(f"{given}: the output folder is also an input; write the set to another folder")
    if Path.cwd().resolve().is_relative_to(folder):
        raise InputError(f"{given}: the output folder holds the working directory; write the set to another folder")
    if not folder.exists():
        return
    if not folder.is_dir():
        raise InputError(f"{given}: the output folder is not a folder")
    listed = _set_files(folder)
    others = sorted(entry.name for entry in os.scandir(folder) if entry.name != SET_FILES_NAME
                    and not (entry.name in listed and entry.is_file(follow_symlinks=False)))
    if others:
        more = f" (and {len(others) - 1} more)" if len(others) > 1 else ""
        raise InputError(f"{given}: holds {shown(others[0])}{more}, which no earlier preprocess or augment run "
                         "wrote there; the new set replaces the output folder whole, so give a new or empty folder")


@contextlib.contextmanager
def output_folder(output_dir=None, output_tar=None, job: str = "preprocess"):
    """Yield the folder to write into: a hidden one beside *output_dir* that replaces it when the block ends
    (check_output_dir first), or a temporary one packed into *output_tar*. On an error nothing is replaced."""
    if (output_dir is None) == (output_tar is None):
        raise ValueError("give exactly one of output_dir and output_tar")
    if output_dir is not None:
        target = Path(output_dir).resolve()
        check_output_dir(output_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        follow_umask(staging, folder=True)  # it becomes the set folder, which later jobs (maybe other users) read
        try:
            yield staging
            write_json(staging / SET_FILES_NAME, {"written_by": job,
                                                  "files": sorted(p.name for p in staging.iterdir())})
            check_output_dir(output_dir)  # again: files put there while the job ran are not removed either
            replace_folder(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # left only by an error
        return
    output_tar = Path(output_tar)
    output_tar.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output_tar.stem}.", dir=output_tar.parent) as tmp:
        yield Path(tmp)
        pack_folder(tmp, output_tar)


# What a job stopped by SIGTERM (utils.stop) says: output_folder's cleanup has run by the time it is printed.
STOPPED = ("stopped before the set was complete; the partial set is removed, an earlier set in the output folder is "
           "left as it was, and a rerun writes the whole set")


def default_report_path(output_dir=None, output_tar=None) -> Path:
    """The report goes next to the output, never inside it (a set folder holds only pairs)."""
    target = Path(output_dir if output_dir is not None else output_tar)
    name = target.name[:-4] if target.name.endswith(".tar") else target.name
    return target.with_name(f"{name}.report.json")


def write_pair(folder: Path, stem: str, image, ann: VocAnnotation, image_format: str = "jpg",
               quality: int = D.JPEG_QUALITY, copy_from: Path | None = None) -> list[str]:
    """Write <stem>.<image_format> (*image* encoded, or the file *copy_from* as it is, whose decoded pixels
    *image* are) and <stem>.xml atomically into *folder*; return the file names."""
    image_name = f"{stem}.{image_format}"
    with atomic_path(folder / image_name) as tmp:
        if copy_from is not None:
            shutil.copyfile(copy_from, tmp)
        else:
            options = {"quality": int(quality)} if image_format == "jpg" else {"compress_level": D.PNG_COMPRESS_LEVEL}
            image.save(tmp, format=FORMATS[image_format], **options)
    xml_name = f"{stem}.xml"
    write_voc(folder / xml_name, VocAnnotation(filename=image_name, width=image.width, height=image.height,
                                               depth=3, objects=ann.objects, folder=ann.folder))
    return [image_name, xml_name]


def finish_report(log: JobLog, job: str, params: dict, inputs, report_path, started: float) -> dict:
    report = {"job": job, **log.as_report(), "seconds": round(time.perf_counter() - started, 3),
              "run_record": run_record(job, params, inputs)}
    write_json(report_path, report)
    return report


# ---------------------------------------------------------------------------------------------
# Preprocessing

def kept_encoding(path: Path) -> str | None:
    """The extension under which --format source keeps the photo *path* as it is ("jpg", "png"), or None
    when it is written as PNG: a format other than JPEG or PNG (TIFF, WebP, BMP). A photo stored turned keeps its
    EXIF orientation, which every reader of the sets applies as predict does (images.load_rgb); its XML gives the
    boxes as displayed. (Written upright as PNG, a 12 MP phone photo in portrait took 3-4 s, and 10 MB.)"""
    try:
        return KEPT_ENCODINGS.get(file_encoding(path))
    except ImageError:  # it decoded a moment ago; if its header cannot be read now, write its pixels as PNG
        return None


def write_photo(folder: Path, stem: str, loaded: LoadedPair, image, ann: VocAnnotation, image_format: str,
                quality: int = D.JPEG_QUALITY) -> list[str]:
    """write_pair for a photo *loaded* by load_pair: with SOURCE, the photo's own file when *image* is its decoded
    pixels unchanged and kept_encoding keeps it, else lossless PNG; "jpg" or "png" re-encode it."""
    kept = image_format == SOURCE and image is loaded.image and kept_encoding(loaded.pair.image)
    written_format = kept or ("png" if image_format == SOURCE else image_format)
    return write_pair(folder, stem, image, ann, written_format, quality,
                      copy_from=loaded.pair.image if kept else None)


def preprocess_set(images, annotations, prefix: str, output_dir=None, output_tar=None, split_csv=None,
                   split=None, max_size: int | None = D.PREPROCESS_MAX_SIZE, image_format: str = D.PREPROCESS_FORMAT,
                   quality: int = D.JPEG_QUALITY, report=None, progress: bool = True,
                   label_map: LabelMap = NO_LABEL_MAP) -> dict:
    """Preprocess one set; return the report (also written to *report*). Raises NothingProcessedError.

    Object names are read through *label_map* and written as the class names.
    """
    if image_format not in (*FORMATS, SOURCE):
        raise InputError(f"unknown image format {image_format!r} (choose from {', '.join((*FORMATS, SOURCE))})")
    if max_size is not None and max_size < 16:
        raise InputError(f"--max-size must be at least 16 px, got {max_size}")
    prefix_problem = name_part_problem(prefix or "")
    if prefix_problem:
        raise InputError(f"--prefix: {prefix_problem}")
    check_output_dir(output_dir, images, annotations)
    started = time.perf_counter()
    report = Path(report) if report else default_report_path(output_dir, output_tar)
    params = {"images": images, "annotations": annotations, "prefix": prefix, "split_csv": split_csv,
              "split": split, "max_size": max_size, "format": image_format, "quality": quality,
              "output_dir": output_dir, "output_tar": output_tar, "label_map": str(label_map)}
    # images_shrunk: how many --max-size changed, so that the report says whether the test set's figure can differ
    # from the prediction set's on the same photos (utils/reporting/html_parts.test_split_predicted)
    log = JobLog(extra={"images_shrunk": 0})
    used_inputs, produced = [], set()
    with open_inputs(images, annotations, split_csv, split, log) as pairs:
        with output_folder(output_dir, output_tar) as folder:
            for pair in tqdm(pairs, desc=f"preprocess {prefix or ''}".strip(), unit="img", disable=not progress):
                check_stop(STOPPED)
                stem = f"{prefix}{pair.stem}"
                if stem in produced:
                    log.skip(pair.image.name, f"another input already produced {stem} "
                                              "(two images with the same stem)")
                    continue
                loaded = load_pair(pair, log, label_map)
                if loaded is None:
                    continue
                image, ann = loaded.image, loaded.annotation
                if max_size and max(image.size) > max_size:
                    # torchvision only here: a set kept at its own size (the default) never imports torch,
                    # about 4 s of each job's start, and a bad flag or folder is refused at once
                    from .box_transforms import resize_longest_side

                    image, ann = resize_longest_side(image, ann, max_size)
                log.extra["images_shrunk"] += image is not loaded.image
                log.written += write_photo(folder, stem, loaded, image, ann, image_format, quality)
                produced.add(stem)
                log.processed += 1
                used_inputs += [pair.image, pair.annotation]
            if log.processed == 0:
                finish_report(log, "preprocess", params, used_inputs, report, started)
                raise NothingProcessedError(f"{display_paths(images)}: no image could be processed "
                                            f"({len(log.skipped)} skipped; see {report})")
        return finish_report(log, "preprocess", params, used_inputs, report, started)
