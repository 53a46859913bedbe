"""Dataset validation: find every problem in a folder of VOC pairs and keep only usable pairs.

``validate_dataset`` checks each image and annotation and returns a ``ValidationResult``
whose report lists every problem as ``{"file", "image", "kind", "problem", "excluded"}``
("file": the file at fault; "image": the image it affects, None for an annotation
without image; "excluded": whether the image leaves the clean set), so that nothing
leaves the data set unreported: ``images_total == images_usable + len(images_excluded)``
and every excluded image is the "image" of at least one excluding problem.

Checks: entries that cannot be read as files (a name not valid UTF-8, a link to nothing,
not a regular file, no image by its bytes; utils.data.pairs.pair_folders); image without annotation and the
reverse; images sharing one name stem (annotations are matched by stem, so they are ambiguous: the one the XML's
<filename> names keeps it, utils.data.pairs.pair_folders); unreadable, truncated or non-image files (full
decode with utils.data.images.load_rgb_hashed, which hashes the file too); XML that is not
well-formed or lacks required fields (utils.data.voc.parse_voc); unknown class names, boxes outside the
image, zero- or negative-area boxes (utils.data.voc.clean_objects: overshoots of at most
CLIP_TOLERANCE_PX are clipped, anything else drops the object); an XML <size> that
differs from the decoded image, or none (reported; the real size is used; where it is the stored size of
an image its EXIF orientation turns, the boxes are turned with the pixels); images left with no
objects; exact duplicates (sha256 of the file) and near duplicates (perceptual hash,
Hamming distance <= near_duplicate_distance), of which one per group is kept.

Label map: object names are read through *label_map* (another data set's names as
classes, utils.classes.LabelMap); the report counts each renaming in "labels_mapped"
({"with_incorrect_mask -> mask_weared_incorrect": 12}), and a renamed annotation counts
as cleaned, so annotations_clean/ holds only class names. Names the map does not cover
stay unknown classes (object dropped, reported).

Cleaned annotations: ``write_clean_outputs`` writes the annotation of EVERY usable
pair to ``OUTPUT_DIR/annotations_clean/`` -- rewritten with the kept (clipped) objects
and the real image size where cleaning changed something, copied byte for byte
otherwise -- and ``clean_manifest.csv`` points at those files. The folder is therefore
a complete annotation set that later jobs can take as ``--annotations`` (jobs resolve
files by name, as Pegasus stages them flat, so a folder mixing cleaned and original
files would be ambiguous). Paths in the manifest are relative to the manifest's
folder when inside it (annotations_clean/...), else absolute; images that came from
a .tar archive (unpacked to a temporary folder) are written by file name only and
must be resolved with ``--images``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import imagehash
import numpy as np
from tqdm import tqdm

from ..atomic import follow_umask, replace_folder, write_json
from .. import defaults as D
from ..classes import CLASSES, NO_LABEL_MAP, LabelMap
from ..errors import InputError
from ..parallel import ordered_map
from .images import load_rgb_hashed, stored_size_and_orientation
from .near_duplicates import near_duplicates
from .pairs import Pair, pair_folders, write_pairs_csv
from .voc import (CLIP_TOLERANCE_PX, VocAnnotation, VocError, boxes_on_stored_pixels, clean_objects, parse_voc,
                  turn_boxes, write_voc)

# Problem kinds and whether they take the image out of the clean set.
PROBLEM_KINDS = {
    "missing_annotation": True,       # image without an XML file of the same stem
    "missing_image": True,            # XML without an image of the same stem
    "ambiguous_name": True,           # several images share the stem of one XML file
    "unreadable_image": True,         # not an image, truncated, cannot be decoded
    "bad_annotation": True,           # XML not well-formed or lacking required fields
    "unknown_class": False,           # object dropped
    "box_out_of_bounds": False,       # object dropped
    "box_clipped": False,             # object kept, box clipped to the image
    "zero_area_box": False,           # object dropped
    "size_mismatch": False,           # XML <size> differs from the image; real size used
    "size_missing": False,            # XML without a usable <size> (none, or 0x0); the image's size used
    "boxes_turned": False,            # boxes drawn on the stored pixels of an EXIF-turned image, turned with them
    "no_objects": True,               # nothing left to learn from
    "exact_duplicate": True,          # same bytes as the kept image of its group
    "near_duplicate": True,           # perceptual hash close to another image of its group
    "subfolder_ignored": False,       # a folder inside images/ or annotations/: its files are not read
    "file_not_read": False,           # a name not valid UTF-8, a link to nothing, not a regular file, no image
    "doctype_dropped": False,         # the clean copy is written without the file's <!DOCTYPE> (and its entities)
}
CLEAN_ANNOTATIONS_DIRNAME = "annotations_clean"
REPORT_NAME = "validation_report.json"
MANIFEST_NAME = "clean_manifest.csv"


class ValidationInputError(InputError):
    """The inputs cannot be validated at all (missing folder); str() says which and why."""


@dataclass
class ValidationResult:
    """report: the JSON-able report; clean_pairs: usable pairs, sorted by image name, whose
    annotation is the ORIGINAL file (use ``annotations`` or write_clean_outputs()["pairs"]
    for the cleaned version); duplicate_groups: image names per group, the kept one first."""

    report: dict
    clean_pairs: list[Pair]
    duplicate_groups: list[list[str]]
    # Cleaned annotation (kept objects, real image size) per usable image file name.
    annotations: dict[str, VocAnnotation] = field(default_factory=dict)
    # Image file names whose annotation was changed by cleaning.
    changed: set[str] = field(default_factory=set)
    # Image path -> sha256 of the bytes read to check it (the run record's: not read again).
    images_sha256: dict = field(default_factory=dict)


@dataclass
class _ImageFacts:
    sha256: str | None = None
    size: tuple[int, int] | None = None
    phash: int | None = None
    error: str | None = None
    stored_size: tuple[int, int] | None = None  # before the EXIF orientation turns it
    orientation: int = 1


def _inspect_image(path: Path) -> _ImageFacts:
    """Hash the bytes, decode fully and take the perceptual hash of the decoded image."""
    # one open, decoded from the file and hashed in blocks (load_rgb_hashed): read whole, a file was held
    # whole, one that is no image too (a 4 GB video named .jpg: 4 GB a validation thread)
    image, sha256, error = load_rgb_hashed(path)
    if error is not None:
        return _ImageFacts(sha256=sha256, error=error.problem)
    bits = imagehash.phash(image).hash.flatten()
    stored_size, orientation = stored_size_and_orientation(path)
    return _ImageFacts(sha256=sha256, size=image.size,
                       phash=int(np.packbits(bits).view(">u8")[0]), stored_size=stored_size, orientation=orientation)


def _object_problem_kind(message: str) -> str:
    # clean_objects gives one message per dropped or clipped object; its wording says which rule applied.
    if "unknown class" in message:
        return "unknown_class"
    if "zero or negative area" in message:
        return "zero_area_box"
    if message.endswith("clipped"):
        return "box_clipped"
    return "box_out_of_bounds"


class _UnionFind:
    def __init__(self, n):
        self.parent = list(range(n))

    def find(self, i):
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i, j):
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)


def _check_folder(path, role: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise ValidationInputError(f"{path}: {role} folder does not exist")
    if not path.is_dir():
        raise ValidationInputError(f"{path}: {role} path is not a folder")
    return path


def validate_dataset(images_dir, annotations_dir, near_duplicate_distance: int = D.NEAR_DUPLICATE_DISTANCE,
                     known_classes=CLASSES,
                     tolerance: float = CLIP_TOLERANCE_PX, workers: int | None = None,
                     progress: bool | None = None, label_map: LabelMap = NO_LABEL_MAP) -> ValidationResult:
    """Validate the VOC pairs of *images_dir* / *annotations_dir* (may be the same folder).

    near_duplicate_distance: largest perceptual-hash Hamming distance (of 64 bits) that
    still counts as a near duplicate; a negative value turns near-duplicate search off.
    workers: threads for decoding (PIL and the hashes release the GIL); default min(VALIDATE_WORKERS_MAX, CPUs).
    progress: show a tqdm bar; default only when stderr is a terminal.
    """
    images_dir = _check_folder(images_dir, "images")
    annotations_dir = _check_folder(annotations_dir, "annotations")
    known_classes = tuple(known_classes)
    pairing = pair_folders(images_dir, annotations_dir)
    problems: list[dict] = []

    def problem(file, kind, text, image=None):
        # "image": the image the problem affects; an annotation's problem names its image.
        if image is None and Path(file).suffix.lower() != ".xml":
            image = file
        problems.append({"file": Path(file).name, "image": Path(image).name if image else None, "kind": kind,
                         "problem": text, "excluded": PROBLEM_KINDS[kind]})

    for image in pairing.images_without_annotation:
        # a photo by its bytes, whatever its name (a .jfif, none): its extension is no second problem
        problem(image, "missing_annotation", f"no annotation {image.stem}.xml in {annotations_dir}")
    for annotation in pairing.annotations_without_image:
        problem(annotation, "missing_image", f"no image named {annotation.stem}.* in {images_dir}")
    for folder in pairing.folders:  # the data set is flat: said, so that no photo is lost unreported
        files = sum(1 for path in folder.rglob("*") if path.is_file())
        problems.append({"file": f"{folder.name}/", "image": None, "kind": "subfolder_ignored",
                         "problem": f"a folder inside {folder.parent}: its {files} file(s) are not read (the images "
                                    "and annotations must sit in the folders themselves)",
                         "excluded": PROBLEM_KINDS["subfolder_ignored"]})

    for item in pairing.left_out:  # never an image of the set: the name or the link is what fails
        problems.append({"file": Path(item["file"]).name, "image": None, "kind": "file_not_read",
                         "problem": item["reason"], "excluded": PROBLEM_KINDS["file_not_read"]})

    # Annotations are matched by stem: two images with one stem cannot both own the XML file.
    pairs, by_stem = [], {}
    for pair in pairing.pairs:
        by_stem.setdefault(pair.stem, []).append(pair)
    for stem, group in by_stem.items():
        pairs.append(group[0])
        for other in group[1:]:
            problem(other.image, "ambiguous_name",
                    f"shares the stem {stem!r} with {group[0].image.name}, which keeps {group[0].annotation.name}")

    workers = workers or min(D.VALIDATE_WORKERS_MAX, os.cpu_count() or 1)
    show = sys.stderr.isatty() if progress is None else progress
    with ThreadPoolExecutor(max_workers=workers) as pool:
        facts = list(tqdm(ordered_map(pool, lambda p: _inspect_image(p.image), pairs, ahead=4 * workers),
                          total=len(pairs), desc="validate", unit="img", disable=not show))

    candidates = []  # (pair, facts, cleaned annotation, changed)
    objects_dropped = objects_clipped = 0
    labels_mapped: dict[str, int] = {}
    for pair, fact in zip(pairs, facts):
        # Both files are checked, so that a pair broken on both sides reports both.
        try:
            ann = parse_voc(pair.annotation, label_map)
        except VocError as exc:
            ann = None
            problem(pair.annotation, "bad_annotation", exc.problem, image=pair.image)
        if fact.error is not None:
            problem(pair.image, "unreadable_image", fact.error)
        if ann is None or fact.error is not None:
            continue
        width, height = fact.size
        renamed = [f"{obj.source_name} -> {obj.name}" for obj in ann.objects if obj.source_name]
        for renaming in renamed:
            labels_mapped[renaming] = labels_mapped.get(renaming, 0) + 1
        changed = bool(renamed)  # the cleaned copy must hold the class names, not the file's
        if ann.doctype:  # a byte copy would hand its DTD and entities (a SYSTEM file, a URL) to the next reader
            problem(pair.annotation, "doctype_dropped", f"{ann.doctype[:80]} is not kept in the clean copy "
                    "(never read here: entities are not expanded, DTDs not loaded)", image=pair.image)
            changed = True
        turned = boxes_on_stored_pixels(ann, fact.orientation, fact.stored_size)
        if turned:
            problem(pair.annotation, "boxes_turned", turned, image=pair.image)
            ann, changed = turn_boxes(ann, fact.orientation), True
        if ann.width is None:
            problem(pair.annotation, "size_missing", f"{ann.size_problem}: {pair.image.name}'s own {width}x{height} "
                    "is used", image=pair.image)
            changed = True  # the clean copy holds the size
        elif (ann.width, ann.height) != (width, height):
            problem(pair.annotation, "size_mismatch",
                    f"<size> says {ann.width}x{ann.height} but {pair.image.name} is {width}x{height}; "
                    f"the real size is used", image=pair.image)
            changed = True
        kept, object_problems = clean_objects(ann, width, height, known_classes=known_classes, tolerance=tolerance)
        for text in object_problems:
            kind = _object_problem_kind(text)
            objects_clipped += kind == "box_clipped"
            objects_dropped += kind != "box_clipped"
            problem(pair.annotation, kind, text, image=pair.image)
        changed = changed or bool(object_problems)
        if not kept:
            reason = (f"no usable objects left ({len(ann.objects)} in the annotation, all dropped)" if ann.objects
                      else "the annotation has no objects")
            problem(pair.image, "no_objects", reason)
            continue
        cleaned = replace(ann, width=width, height=height, objects=kept, filename=pair.image.name, size_problem=None)
        candidates.append((pair, fact, cleaned, changed))

    # Duplicates among otherwise usable images: exact (same sha256) and near (phash distance).
    union = _UnionFind(len(candidates))
    first_with_sha = {}
    for index, (_, fact, _, _) in enumerate(candidates):
        union.union(first_with_sha.setdefault(fact.sha256, index), index)
    nearest: dict[int, tuple[int, str]] = {}  # each image's nearest near duplicate: a duplicate's message names it
    if near_duplicate_distance >= 0 and len(candidates) > 1:
        hashes = np.array([fact.phash for _, fact, _, _ in candidates], dtype=np.uint64)
        links, nearest = near_duplicates(hashes, [pair.image.name for pair, _, _, _ in candidates],
                                         near_duplicate_distance)
        for i, j in links:
            union.union(i, j)
    groups = {}
    for index in range(len(candidates)):
        groups.setdefault(union.find(index), []).append(index)

    duplicate_groups, excluded_duplicates = [], set()
    for members in groups.values():
        if len(members) < 2:
            continue
        # Keep the image with the most objects (ties: first by name) so the least annotation work is lost.
        members.sort(key=lambda i: (-len(candidates[i][2].objects), candidates[i][0].image.name))
        keep = members[0]
        kept_pair, kept_fact = candidates[keep][0], candidates[keep][1]
        duplicate_groups.append([candidates[i][0].image.name for i in members])
        for i in members[1:]:
            pair, fact = candidates[i][0], candidates[i][1]
            excluded_duplicates.add(i)
            if fact.sha256 == kept_fact.sha256:
                problem(pair.image, "exact_duplicate",
                        f"same content (sha256) as {kept_pair.image.name}, which is kept")
            else:
                distance, name = nearest.get(i, (None, kept_pair.image.name))
                problem(pair.image, "near_duplicate",
                        f"near duplicate of {name} (perceptual hash distance {distance} <= "
                        f"{near_duplicate_distance}); group kept {kept_pair.image.name}")

    usable = [c for i, c in enumerate(candidates) if i not in excluded_duplicates]
    usable.sort(key=lambda c: c[0].image.name)
    clean_pairs = [c[0] for c in usable]
    annotations = {c[0].image.name: c[2] for c in usable}
    changed = {c[0].image.name for c in usable if c[3]}

    all_images = [p.image for p in pairing.pairs] + list(pairing.images_without_annotation)
    usable_names = {p.image.name for p in clean_pairs}
    images_excluded = sorted({p.name for p in all_images} - usable_names)
    objects_per_class = {name: 0 for name in known_classes}
    images_with_class = {name: 0 for name in known_classes}
    for ann in annotations.values():
        for obj in ann.objects:
            objects_per_class[obj.name] += 1
        for name in {obj.name for obj in ann.objects}:
            images_with_class[name] += 1
    problem_counts = {kind: 0 for kind in PROBLEM_KINDS}
    for entry in problems:
        problem_counts[entry["kind"]] += 1

    report = {
        "images_dir": str(images_dir),
        "annotations_dir": str(annotations_dir),
        "images_total": len(all_images),
        "annotations_total": len(pairing.pairs) + len(pairing.annotations_without_image),
        "images_usable": len(clean_pairs),
        "images_excluded": images_excluded,
        "annotations_cleaned": len(changed),
        "objects_kept": sum(objects_per_class.values()),
        "objects_dropped": objects_dropped,
        "objects_clipped": objects_clipped,
        "objects_per_class": objects_per_class,
        "images_with_class": images_with_class,
        "label_map": str(label_map),
        "labels_mapped": dict(sorted(labels_mapped.items())),
        "problem_counts": problem_counts,
        "problems": problems,
        "duplicate_groups": duplicate_groups,
        "near_duplicate_distance": near_duplicate_distance,
        "clip_tolerance_px": tolerance,
    }
    return ValidationResult(report=report, clean_pairs=clean_pairs, duplicate_groups=duplicate_groups,
                            annotations=annotations, changed=changed,
                            images_sha256={pair.image: fact.sha256 for pair, fact in zip(pairs, facts) if fact.sha256})


def csv_entry(path: Path, csv_folder: Path, by_name: bool = False) -> str:
    """How a CSV names *path*: relative to the CSV's folder when inside it, else absolute."""
    if by_name:
        return Path(path).name
    path, csv_folder = Path(path).resolve(), Path(csv_folder).resolve()
    return str(path.relative_to(csv_folder)) if path.is_relative_to(csv_folder) else str(path)


def write_clean_outputs(result: ValidationResult, output_dir, images_by_name: bool = False) -> dict:
    """Write annotations_clean/, clean_manifest.csv and validation_report.json into *output_dir*.

    Returns their paths ("annotations_clean", "manifest", "report") and "pairs": the clean
    pairs with each annotation pointing at its cleaned copy (``result.clean_pairs`` point
    at the original annotation files, whose objects may still need the cleaning).

    annotations_clean/ is built in a temporary folder and swapped in whole, so readers
    never see a half-written set and files from an earlier run do not linger.
    images_by_name: write image entries as bare file names (the images came from an archive).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    clean_dir = output_dir / CLEAN_ANNOTATIONS_DIRNAME
    staging = Path(tempfile.mkdtemp(prefix=f".{CLEAN_ANNOTATIONS_DIRNAME}.", dir=output_dir))
    follow_umask(staging, folder=True)  # it becomes annotations_clean/, which later jobs (maybe other users) read
    try:
        for pair in result.clean_pairs:
            target = staging / pair.annotation.name
            if pair.image.name in result.changed:
                write_voc(target, result.annotations[pair.image.name])
            else:
                shutil.copyfile(pair.annotation, target)
        replace_folder(staging, clean_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    manifest = output_dir / MANIFEST_NAME
    rows = [{"image": csv_entry(pair.image, output_dir, images_by_name),
             "annotation": csv_entry(clean_dir / pair.annotation.name, output_dir, False)}
            for pair in result.clean_pairs]
    write_pairs_csv(manifest, rows)
    report_path = output_dir / REPORT_NAME
    write_json(report_path, {**result.report, "clean_annotations_dir": CLEAN_ANNOTATIONS_DIRNAME,
                             "clean_manifest": MANIFEST_NAME})
    return {"report": report_path, "manifest": manifest, "annotations_clean": clean_dir,
            "pairs": clean_annotation_pairs(result, output_dir)}


def clean_annotation_pairs(result: ValidationResult, output_dir) -> list[Pair]:
    """The clean pairs with each annotation at its cleaned copy in *output_dir*/annotations_clean/, where
    write_clean_outputs puts it (computed without writing)."""
    clean_dir = Path(output_dir) / CLEAN_ANNOTATIONS_DIRNAME
    return [Pair(pair.image, clean_dir / pair.annotation.name) for pair in result.clean_pairs]


def annotation_classes(result: ValidationResult) -> dict[str, set[str]]:
    """The class names in each usable image's cleaned annotation, by image file name: what
    utils.data.split.image_classes reads back from annotations_clean/, without reading it."""
    return {name: {obj.name for obj in annotation.objects} for name, annotation in result.annotations.items()}


def format_summary(report: dict) -> str:
    """A few lines of counts for stdout."""
    lines = [
        f"images: {report['images_total']} total, {report['images_usable']} usable, "
        f"{len(report['images_excluded'])} excluded",
        f"annotations: {report['annotations_total']} total, {report['annotations_cleaned']} cleaned",
        f"objects: {report['objects_kept']} kept, {report['objects_dropped']} dropped, "
        f"{report['objects_clipped']} clipped",
        "objects per class: " + ", ".join(f"{k}={v}" for k, v in report["objects_per_class"].items()),
        f"duplicate groups: {len(report['duplicate_groups'])}",
    ]
    if report.get("label_map"):  # reports of runs without a map (or from before maps) have no line
        mapped = report.get("labels_mapped") or {}
        lines.insert(-1, "labels mapped: " + (", ".join(f"{k} ({n})" for k, n in mapped.items()) if mapped else
                                              f"none (no object name matches --label-map {report['label_map']})"))
    counts = {k: v for k, v in report["problem_counts"].items() if v}
    lines.append("problems: " + (", ".join(f"{k}={v}" for k, v in counts.items()) if counts else "none"))
    return "\n".join(lines)
