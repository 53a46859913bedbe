"""The generator's inputs: validate and split the data at generation time, find the prediction images.

Pegasus needs every file name when the workflow is planned, so the validation and
the split run here, before the catalogs are built, rather than as jobs.

Everything is checked before the run folder is touched: check_pred_images and find_videos read
--pred-images and --pred-videos, plan_data validates and splits the data (and assigns the folds) in
memory and checks what needs the split; only then does write_data write the run folder's data files,
so that a refused (re)generation leaves an existing run folder as it was.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_text
from ..classes import NO_LABEL_MAP, LabelMap
from .config import ConfigError, ShardFile, SplitEntry, VideoFile, check_video_tags

log = logging.getLogger(__name__)


def _split_entry(image: str, annotation: str, split: str, data_dir: Path) -> SplitEntry:
    """A split.csv row as a SplitEntry: names without a folder are in data_dir/images and data_dir/annotations."""
    image_path, annotation_path = Path(image), Path(annotation)
    if not image_path.is_absolute():
        image_path = data_dir / "images" / image_path.name
    if not annotation_path.is_absolute():
        annotation_path = data_dir / "annotations" / annotation_path.name
    return SplitEntry(image_path, annotation_path, split)


def write_if_changed(path: Path, text: str) -> None:
    """Rewrite only on change, so that an unchanged split keeps its file (and mtime) as it was."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    write_text(path, text)


@dataclass
class DataSplit:
    """The data validated and split, and the folds assigned, in memory (plan_data); write_data writes them."""

    data_dir: Path
    run_dir: Path
    result: object  # utils.data.validation.ValidationResult
    split_text: str  # split.csv
    entries: list[SplitEntry]
    folds_text: str | None = None  # folds.csv, with --folds

    @property
    def report(self) -> dict:
        return self.result.report


def plan_data(data_dir: Path, run_dir: Path, seed: int, fractions, near_duplicate_distance: int,
              label_map: LabelMap = NO_LABEL_MAP, folds: int = 0, label=lambda name: f"--{name}") -> DataSplit:
    """Validate the data and split the clean pairs (annotations at their cleaned copies in
    RUN_DIR/annotations_clean/, object names mapped through *label_map*), with --folds assign the folds, and
    check what needs the split: no split may be empty, every fold needs a group of images. Writes nothing;
    *label* names a setting in errors (WorkflowSettings.label)."""
    from ..data.split import SPLITS, SplitError, split_pairs
    from ..data.validation import (ValidationInputError, annotation_classes, clean_annotation_pairs,
                                   validate_dataset)

    images_dir, annotations_dir = data_dir / "images", data_dir / "annotations"
    for folder in (images_dir, annotations_dir):
        if not folder.is_dir():
            raise ConfigError(f"{folder}: not found (--data must contain images/ and annotations/)")
    try:
        result = validate_dataset(images_dir, annotations_dir, near_duplicate_distance=near_duplicate_distance,
                                  label_map=label_map)
        if not result.clean_pairs:
            counts = ", ".join(f"{kind}={count}" for kind, count in result.report["problem_counts"].items() if count)
            raise ConfigError(f"{data_dir}: no usable image/annotation pairs among its "
                              f"{result.report['images_total']} images ({counts or 'none found'}; "
                              "bin/validate_data.py lists every problem)")
        classes_of = annotation_classes(result)
        rows = split_pairs(clean_annotation_pairs(result, run_dir), result.duplicate_groups, fractions, seed,
                           classes_of=classes_of, label_map=label_map)
    except (ValidationInputError, SplitError) as error:
        raise ConfigError(str(error)) from None
    # Said where it is seen: the images in them are in no count of the 'Validated' line.
    ignored = [problem for problem in result.report["problems"] if problem["kind"] == "subfolder_ignored"]
    if ignored:
        log.warning("%s: %d subfolder(s) not read (the data set is flat; first: %s: %s); every one in %s", data_dir,
                    len(ignored), ignored[0]["file"], ignored[0]["problem"], run_dir / "validation_report.json")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["image", "annotation", "split"], extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: str(value) if isinstance(value, Path) else value for key, value in row.items()})
    entries = [_split_entry(str(row["image"]), str(row["annotation"]), row["split"], data_dir) for row in rows]
    for split in SPLITS:
        if not any(entry.split == split for entry in entries):
            raise ConfigError(f"{label('fractions')} {' '.join(f'{value:g}' for value in fractions)}: the {split} "
                              f"split of the {len(entries)} usable images would be empty; add images or change "
                              "the fractions")
    folds_text = (fold_assignment_text(entries, result.duplicate_groups, folds, seed, label_map, classes_of,
                                       label("folds"))
                  if folds else None)
    return DataSplit(data_dir, run_dir, result, buffer.getvalue(), entries, folds_text)


def write_data(split: DataSplit) -> tuple[Path, Path | None]:
    """Write the run folder's data files: validation_report.json, clean_manifest.csv, annotations_clean/
    (annotations with the fixable problems fixed and object names mapped to class names, which the jobs get),
    split.csv and, with --folds, folds.csv. Returns the paths of split.csv and folds.csv (None without)."""
    from ..data.validation import write_clean_outputs

    split.run_dir.mkdir(parents=True, exist_ok=True)
    write_clean_outputs(split.result, split.run_dir)
    split_path = split.run_dir / "split.csv"
    write_if_changed(split_path, split.split_text)
    folds_path = None
    if split.folds_text is not None:
        folds_path = split.run_dir / "folds.csv"
        write_if_changed(folds_path, split.folds_text)
    return split_path, folds_path


@dataclass(frozen=True)
class PredictionImages:
    """--pred-images, checked (check_pred_images): a shard folder's index, or a plain folder's images."""

    index: object | None = None  # utils.data.shards.ShardIndex of a shard folder
    items: tuple = ()            # (image, None) of a plain folder, sorted
    skipped: tuple = ()          # its files that are not images, and repeated stems
    source: str = ""


def check_pred_images(pred_images: Path | None, run_dir: Path | None = None) -> PredictionImages | None:
    """--pred-images read and checked, writing nothing: a shard folder with a valid index and every shard, or a
    folder holding images (below it, *run_dir* is left out: a run folder inside the photos' folder holds the
    run's own pictures). None without the flag (the test split is predicted)."""
    from ..data.shards import check_shard_files, collect_images, is_shard_folder, read_index
    from ..errors import InputError

    if pred_images is None:
        return None
    try:
        if is_shard_folder(pred_images):
            index = read_index(pred_images)
            check_shard_files(index)
            return PredictionImages(index=index)
        if not pred_images.exists():
            raise ConfigError(f"{pred_images}: --pred-images folder not found")
        if not pred_images.is_dir():
            raise ConfigError(f"{pred_images}: not a folder (--pred-images takes a folder of images, or of shards "
                              "made by bin/make_shards.py)")
        items, skipped = collect_images(pred_images, exclude=[run_dir] if run_dir is not None else [])
    except InputError as error:
        raise ConfigError(str(error)) from None
    if not items:
        left_out = f" ({len(skipped)} file(s) left out, first {skipped[0]['file']}: {skipped[0]['reason']})" \
            if skipped else ""
        raise ConfigError(f"{pred_images}: no images to predict on{left_out}")
    return PredictionImages(items=tuple(items), skipped=tuple(skipped), source=str(pred_images.resolve()))


def prediction_shards(pred_images: PredictionImages | None, entries: list[SplitEntry], run_dir: Path,
                      images_per_job: int) -> list[ShardFile]:
    """The prediction set as shards, one predict job each.

    A shard folder (bin/make_shards.py) is used as it is; a plain folder of images, or by
    default the test split's images, is packed into RUN_DIR/pred_shards with *images_per_job*
    images per shard, and a rerun over the unchanged images (same names, sizes and times)
    reuses those shards.
    """
    from ..data.shards import SKIPPED_CSV, pack_or_reuse
    from ..errors import InputError

    if images_per_job < 1:
        raise ConfigError(f"--images-per-job {images_per_job}: must be at least 1")
    if pred_images is not None and pred_images.index is not None:
        return _shard_files(pred_images.index, resolve=True)
    if pred_images is not None:
        items, skipped, source = list(pred_images.items), list(pred_images.skipped), pred_images.source
    else:
        items = sorted(((entry.image, None) for entry in entries if entry.split == "test"),
                       key=lambda item: item[0].name)
        skipped, source = [], "test split"
    if not items:
        raise ConfigError(f"{source}: no images to predict on")
    try:
        index = pack_or_reuse(items, run_dir / "pred_shards", images_per_job, source, skipped)
    except InputError as error:
        raise ConfigError(str(error)) from None
    if skipped:  # said where it is seen (generation's output), listed with the reasons beside the shards
        log.warning("%s: %d file(s) not packed for prediction (first: %s: %s); every one with its reason in %s",
                    source, len(skipped), skipped[0]["file"], skipped[0]["reason"],
                    run_dir / "pred_shards" / SKIPPED_CSV)
    return _shard_files(index)


def data_shards(entries: list[SplitEntry], run_dir: Path, images_per_shard: int) -> dict[str, list[ShardFile]]:
    """Each split's clean pairs (image, annotations_clean/ XML) packed into RUN_DIR/data_shards/<split>/,
    so that the workflow's replicas and file uses grow with the shards, not the images. A rerun over
    unchanged pairs reuses the shards."""
    from ..data.shards import pack_or_reuse
    from ..errors import InputError

    shards = {}
    for split in ("train", "val", "test"):
        items = sorted(((entry.image, entry.annotation) for entry in entries if entry.split == split),
                       key=lambda item: item[0].name)
        if not items:
            raise ConfigError(f"the {split} split is empty; add images or change --fractions")
        try:
            index = pack_or_reuse(items, run_dir / "data_shards" / split, images_per_shard, f"{split} split")
        except InputError as error:
            raise ConfigError(str(error)) from None
        shards[split] = _shard_files(index)
    return shards


def _shard_files(index, resolve: bool = False) -> list[ShardFile]:
    """The shards of a ShardIndex as the generator's ShardFiles (path, images)."""
    return [ShardFile(path.resolve() if resolve else path, shard.images)
            for path, shard in zip(index.paths(), index.shards)]


VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".mjpeg", ".y4m",
                    ".3gp")
SKIPPED_LISTED = 20  # the files of --pred-videos not taken that the warning names


def find_videos(folder: Path) -> list[VideoFile]:
    """The videos directly in *folder* (--pred-videos), each with its frame count (its job's time limit);
    a video OpenCV cannot open, or that gives no frame, is a ConfigError naming it (a job would only fail
    later). What is not taken (other extensions, folders) is warned about, counted and named."""
    if not folder.exists():
        raise ConfigError(f"{folder}: --pred-videos folder not found")
    if not folder.is_dir():
        raise ConfigError(f"{folder}: not a folder (--pred-videos takes a folder of videos)")
    entries = sorted(folder.iterdir())
    taken = [p for p in entries if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS]
    skipped = [p.name + ("/" if p.is_dir() else "") for p in entries if p not in taken]
    if skipped:
        shown = ", ".join(skipped[:SKIPPED_LISTED]) + (f", and {len(skipped) - SKIPPED_LISTED} more"
                                                       if len(skipped) > SKIPPED_LISTED else "")
        log.warning("%s: %d entr%s not taken as videos (not a file with one of the extensions %s): %s", folder,
                    len(skipped), "y" if len(skipped) == 1 else "ies", " ".join(VIDEO_EXTENSIONS), shown)
    videos = [VideoFile(path.resolve(), video_frames(path)) for path in taken]
    if not videos:
        raise ConfigError(f"{folder}: no videos ({', '.join(VIDEO_EXTENSIONS)}) in --pred-videos")
    check_video_tags(videos)
    return videos


# Of a video whose header gives no frame count: its packets (frames, not decoded) are counted in up to this much of
# it, and the rest is estimated at the same bytes a frame; decoding every frame of an hour of Motion JPEG took
# minutes. A byte bound, not a time one, so that the same video always gives the same time limit.
VIDEO_SCAN_BYTES = 256 << 20


def video_frames(path: Path) -> int:
    """The frame count of the video at *path*, from its header, or, where the header gives none that can be
    believed (negative, 0, absurd: an MKV without its duration, raw Motion JPEG), from its packets
    (frames_without_count); ConfigError when OpenCV cannot open it or it gives no frame."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise ConfigError(f"{path}: not a video OpenCV can read")
        if not capture.grab():
            raise ConfigError(f"{path}: the video opened but gave no frame (empty, damaged or unsupported codec)")
        frames = capture.get(cv2.CAP_PROP_FRAME_COUNT)
        if math.isfinite(frames) and 0 < frames < 2 ** 31:
            return int(frames)
    finally:
        capture.release()
    return frames_without_count(path, f"its header gives no frame count ({frames:g})")


def frames_without_count(path: Path, why: str) -> int:
    """The frames of the video at *path*, whose header cannot tell (*why*): its packets counted without decoding
    them (OpenCV's raw mode), all of them in a file of up to VIDEO_SCAN_BYTES, else in its first VIDEO_SCAN_BYTES
    with the rest taken at the same bytes a frame, said in a warning. The container's own bytes count as frames'
    there, so frames of even size are estimated a little long; a start of larger frames than the rest's gives too
    few, which the time limit's SAFETY margin (runtimes.py) absorbs. Where the OpenCV backend has no raw mode
    (not FFmpeg), every frame is decoded and counted."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        raw = capture.set(cv2.CAP_PROP_FORMAT, -1)  # grab() reads a packet, and retrieve() gives its bytes
        counted = packet_bytes = 0
        while (packet_bytes < VIDEO_SCAN_BYTES or not raw) and capture.grab():
            counted += 1
            if raw:
                ok, packet = capture.retrieve()
                packet_bytes += packet.size if ok and packet is not None else 0
    finally:
        capture.release()
    if packet_bytes < VIDEO_SCAN_BYTES:  # the file ended first: every frame counted
        log.info("%s: %s; its %d frames counted%s", path, why, counted,
                 "" if raw else " by decoding them (this OpenCV backend has no raw mode)")
        return max(counted, 1)  # video_frames decoded one
    size = path.stat().st_size
    estimate = math.ceil(counted * size / packet_bytes)
    log.warning("%s: %s; %d frames assumed for its job's time limit: %d frames in its first %s MB, and the rest "
                "of its %s MB taken at the same bytes a frame", path, why, estimate, counted,
                f"{packet_bytes / 1e6:,.1f}", f"{size / 1e6:,.1f}")
    return estimate


def fold_assignment_text(entries: list[SplitEntry], duplicate_groups, folds: int, seed: int,
                         label_map: LabelMap = NO_LABEL_MAP, classes_of: dict | None = None,
                         setting: str = "--folds") -> str:
    """folds.csv's text: the train+val pool assigned to *folds* cross-validation folds (utils.data.folds: the
    split's near-duplicate groups stay together, stratified on the rare class, each split spread over the folds
    on its own so that every fold model has training and validation images). *classes_of*: the class names
    per image (read from the annotations when None)."""
    from ..data.folds import FoldError, assign_folds, folds_csv_text
    from ..data.voc import VocError

    pool = [entry for entry in entries if entry.split in ("train", "val")]
    split_of = {entry.image.name: entry.split for entry in pool}
    try:
        assignment = assign_folds(pool, folds, duplicate_groups, seed, classes_of=classes_of, label_map=label_map,
                                  split_of=split_of, setting=setting)
    except (FoldError, VocError) as error:
        raise ConfigError(str(error)) from None
    return folds_csv_text(assignment)
