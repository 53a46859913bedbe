"""The generator's inputs: validate and split the data at generation time, find the prediction images.

Pegasus needs every file name when the workflow is planned, so the validation and
the split run here, before the catalogs are built, rather than as jobs.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..atomic import write_text
from ..classes import NO_LABEL_MAP, LabelMap
from .config import ConfigError, ShardFile, SplitEntry, VideoFile


def read_split_csv(path: Path, data_dir: Path) -> list[SplitEntry]:
    """split.csv's rows; names without a folder are looked up in data_dir/images and data_dir/annotations."""
    entries = []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            image, annotation = Path(row["image"]), Path(row["annotation"])
            if not image.is_absolute():
                image = data_dir / "images" / image.name
            if not annotation.is_absolute():
                annotation = data_dir / "annotations" / annotation.name
            entries.append(SplitEntry(image, annotation, row["split"]))
    return entries


def write_if_changed(path: Path, text: str) -> None:
    """Rewrite only on change, so that an unchanged split keeps its file (and mtime) as it was."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    write_text(path, text)


def validate_and_split(data_dir: Path, run_dir: Path, seed: int, fractions, near_duplicate_distance: int,
                       label_map: LabelMap = NO_LABEL_MAP):
    """Validate the data and split the clean pairs; returns (validation report, split.csv path).

    Writes into the run dir: validation_report.json, clean_manifest.csv, annotations_clean/
    (annotations with the fixable problems fixed and object names mapped through *label_map*
    to class names, which the jobs get) and split.csv.
    """
    from ..data.split import SplitError, split_pairs
    from ..data.validation import ValidationInputError, validate_dataset, write_clean_outputs

    images_dir, annotations_dir = data_dir / "images", data_dir / "annotations"
    for folder in (images_dir, annotations_dir):
        if not folder.is_dir():
            raise ConfigError(f"{folder}: not found (--data must contain images/ and annotations/)")
    try:
        result = validate_dataset(images_dir, annotations_dir, near_duplicate_distance=near_duplicate_distance,
                                  label_map=label_map)
        clean = write_clean_outputs(result, run_dir)
        if not clean["pairs"]:
            raise ConfigError(f"{data_dir}: no usable image/annotation pairs (see {clean['report']})")
        rows = split_pairs(clean["pairs"], result.duplicate_groups, fractions, seed, label_map=label_map)
    except (ValidationInputError, SplitError) as error:
        raise ConfigError(str(error)) from None
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["image", "annotation", "split"], extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: str(value) if isinstance(value, Path) else value for key, value in row.items()})
    split_path = run_dir / "split.csv"
    write_if_changed(split_path, buffer.getvalue())
    return result.report, split_path


def prediction_shards(pred_images: Path | None, entries: list[SplitEntry], run_dir: Path,
                      images_per_job: int) -> list[ShardFile]:
    """The prediction set as shards, one predict job each.

    A shard folder (bin/make_shards.py) is used as it is; a plain folder of images, or by
    default the test split's images, is packed into RUN_DIR/pred_shards with *images_per_job*
    images per shard, and a rerun over the unchanged images (same names, sizes and times)
    reuses those shards.
    """
    from ..data.shards import check_shard_files, collect_images, is_shard_folder, pack_or_reuse, read_index
    from ..errors import InputError

    if images_per_job < 1:
        raise ConfigError(f"--images-per-job {images_per_job}: must be at least 1")
    try:
        if pred_images is not None and is_shard_folder(pred_images):
            index = read_index(pred_images)
            check_shard_files(index)
            return _shard_files(index, resolve=True)
        if pred_images is not None:
            if not pred_images.is_dir():
                raise ConfigError(f"{pred_images}: --pred-images folder not found")
            items, skipped = collect_images(pred_images)
            source = str(pred_images.resolve())
        else:
            items = sorted(((entry.image, None) for entry in entries if entry.split == "test"),
                           key=lambda item: item[0].name)
            skipped, source = [], "test split"
        if not items:
            raise ConfigError(f"{pred_images or 'the test split'}: no images to predict on")
        return _shard_files(pack_or_reuse(items, run_dir / "pred_shards", images_per_job, source, skipped))
    except InputError as error:
        raise ConfigError(str(error)) from None


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


VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


def find_videos(folder: Path) -> list[VideoFile]:
    """The videos directly in *folder* (--pred-videos), with their frame counts read from the headers;
    a video OpenCV cannot open is a ConfigError naming it (a job would only fail later)."""
    import cv2

    if not folder.is_dir():
        raise ConfigError(f"{folder}: --pred-videos folder not found")
    videos = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS):
        capture = cv2.VideoCapture(str(path))
        try:
            if not capture.isOpened():
                raise ConfigError(f"{path}: not a video OpenCV can read")
            videos.append(VideoFile(path.resolve(), max(1, int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0))))
        finally:
            capture.release()
    if not videos:
        raise ConfigError(f"{folder}: no videos ({', '.join(VIDEO_EXTENSIONS)}) in --pred-videos")
    return videos


def write_folds(run_dir: Path, entries: list[SplitEntry], report: dict, folds: int, seed: int,
                label_map: LabelMap = NO_LABEL_MAP) -> Path:
    """Assign the train+val pool to *folds* cross-validation folds (utils.data.folds: the split's
    near-duplicate groups stay together, stratified on the rare class, each split spread over the folds
    on its own so that every fold model has training and validation images) and write RUN_DIR/folds.csv."""
    from ..data.folds import FoldError, assign_folds, folds_csv_text
    from ..data.voc import VocError

    pool = [entry for entry in entries if entry.split in ("train", "val")]
    split_of = {entry.image.name: entry.split for entry in pool}
    try:
        assignment = assign_folds(pool, folds, report.get("duplicate_groups", []), seed, label_map=label_map,
                                  split_of=split_of)
    except (FoldError, VocError) as error:
        raise ConfigError(str(error)) from None
    path = run_dir / "folds.csv"
    write_if_changed(path, folds_csv_text(assignment))
    return path
