"""Shards: a large image collection packed into tar files of N images each, with an index.

A shard folder holds

    shard-000000.tar, shard-000001.tar, ...   the images (and their VOC XML, when given)
    index.json                                 small: the shards with their counts, sizes and sha256, and
                                               the count of the files skipped (the first 100 named)
    index.csv                                  one row per image: name, shard, bytes, sha256, annotation
    skipped.csv                                one row per file skipped: file, reason

The tars follow WebDataset's layout: members are `<key>.<ext>` files in key order, the key
being the image's path below the folder packed without its extension (`siteA/cam1/img` for
`siteA/cam1/img.jpg`: the folders travel with the images, for the figure per folder; a flat
folder gives flat members), an image's XML (`<key>.xml`) right after it, so
`webdataset.WebDataset(".../shard-{000000..000009}.tar")` reads them as samples. The project
does not depend on the `webdataset` package: its jobs need one shard as one file (a Pegasus
replica, unpacked by utils.data.pairs.open_folder like any set that travels as a .tar) and
an index the generator can read without opening a shard, not a streaming training loader.
One caveat of the layout: WebDataset splits a sample key at the first dot, so an image named
`a.b.jpg` is key `a`; our jobs use the full member names and are not affected.

The workflow generator reads only index.json, so generating a workflow over a million
images costs as much as over its shards (bench/workflow.py).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from .. import defaults as D
from ..atomic import atomic_path, write_json
from ..errors import InputError
from ..provenance import file_sha256
from .images import escaped_name, is_annotation_name, is_image_name, list_files, not_an_image

INDEX_JSON = "index.json"
INDEX_CSV = "index.csv"
SKIPPED_CSV = "skipped.csv"
INDEX_SKIPPED_LISTED = 100  # skipped files named in index.json; all are in skipped.csv (a RAW file beside each
                            # camera JPEG is skipped: a million of them made an index.json of ~150 MB to read whole)
FORMAT = "mask-detection shards 1 (webdataset layout)"
SHARD_PATTERN = "shard-{:06d}.tar"
INDEX_CSV_FIELDS = ("name", "shard", "bytes", "sha256", "annotation")


@dataclass(frozen=True)
class Shard:
    """One shard as index.json lists it."""

    name: str
    images: int
    annotations: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ShardIndex:
    folder: Path
    shards: tuple[Shard, ...]
    shard_size: int

    @property
    def num_images(self) -> int:
        return sum(shard.images for shard in self.shards)

    def paths(self) -> list[Path]:
        return [self.folder / shard.name for shard in self.shards]


def is_shard_folder(folder) -> bool:
    return (Path(folder) / INDEX_JSON).is_file()


def read_index(folder) -> ShardIndex:
    """index.json of a shard folder, checked; InputError naming the file and the problem."""
    folder = Path(folder)
    path = folder / INDEX_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        shards = tuple(Shard(s["name"], int(s["images"]), int(s["annotations"]), int(s["bytes"]), s["sha256"])
                       for s in data["shards"])
        shard_size = int(data["shard_size"])
    except FileNotFoundError:
        raise InputError(f"{path}: not found (a shard folder is made by bin/make_shards.py)") from None
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:  # Recursion: nested too deep
        raise InputError(f"{path}: not a shard index ({type(error).__name__}: {error})") from None
    if data.get("format") != FORMAT:
        raise InputError(f"{path}: unknown format {data.get('format')!r} (expected {FORMAT!r})")
    names = [shard.name for shard in shards]
    if not shards or len(set(names)) != len(names) or any("/" in name or not name.endswith(".tar")
                                                           for name in names):
        raise InputError(f"{path}: the shard list is empty, repeats a name or names a file outside the folder")
    return ShardIndex(folder, shards, shard_size)


def check_shard_files(index: ShardIndex) -> None:
    """Every shard of the index is there with its recorded size (hashes are checked by `verify`)."""
    for shard in index.shards:
        path = index.folder / shard.name
        if not path.is_file():
            raise InputError(f"{path}: listed in {index.folder / INDEX_JSON} but missing")
        if path.stat().st_size != shard.bytes:
            raise InputError(f"{path}: {path.stat().st_size} bytes, {index.folder / INDEX_JSON} says {shard.bytes}")


def verify(index: ShardIndex, workers: int = D.SHARD_WORKERS) -> list[str]:
    """The shards whose sha256 differs from the index (reads every shard)."""
    def bad(shard: Shard) -> str | None:
        return shard.name if file_sha256(index.folder / shard.name) != shard.sha256 else None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [name for name in pool.map(bad, index.shards) if name]


class ShardItem(NamedTuple):
    """One image to pack: the file, its VOC XML or None, and its member name in the shard: its path
    below the folder packed ('siteA/cam1/img.jpg'), so that the folders a collection's images sit in
    travel with them (a figure per folder)."""

    image: Path
    annotation: Path | None
    name: str


def shard_item(item) -> ShardItem:
    """*item* as a ShardItem: an (image, XML or None) pair packs flat, under the image's file name."""
    return item if isinstance(item, ShardItem) else ShardItem(Path(item[0]), item[1], Path(item[0]).name)


def _folder(path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: folder not found")
    if not path.is_dir():
        raise InputError(f"{path}: not a folder ({what} is a folder; its subfolders are packed too)")
    return path


def _key(relative: str) -> str:
    """A sample's key: its path below the folder without the extension ('siteA/img' for 'siteA/img.jpg')."""
    return str(PurePosixPath(relative).with_suffix(""))


def collect_images(images_dir, annotations_dir=None, exclude=()) -> tuple[list[ShardItem], list[dict]]:
    """The images below *images_dir* (subfolders included, symbolic links followed, the folders in *exclude*
    left out: the shards' or the run's own folder), each with its XML (the same path below *annotations_dir*,
    extension .xml) or None, in path order; and what was skipped, [{file, reason}].

    Skipped: what utils.data.images.list_files leaves out (links to nothing, names not valid UTF-8,
    link loops, a file seen twice), files that are no image by their bytes (predict's reason), a second
    image with the key (path without extension) of another (a shard holds one sample per key), both images when an XML
    names a key two images share (which one it describes is unknown), and XML files with no image.
    XML beside the images, without --annotations, is not packed and not listed.
    """
    images_dir = _folder(images_dir, "--images")
    prefix = f"{images_dir.as_posix().rstrip('/')}/"
    files, skipped = list_files(images_dir, prefix, exclude=exclude)
    xml_files = [file for file in files if is_annotation_name(file.relative)]
    annotations = {}
    if annotations_dir is not None:
        annotations_dir = _folder(annotations_dir, "--annotations")
        if annotations_dir.resolve() != images_dir.resolve():
            xml_files, more = list_files(annotations_dir, f"{annotations_dir.as_posix().rstrip('/')}/",
                                         exclude=exclude)
            skipped += more
            xml_files = [file for file in xml_files if is_annotation_name(file.relative)]
            prefix = f"{annotations_dir.as_posix().rstrip('/')}/"
        annotations = {_key(file.relative): file for file in xml_files}
    by_key: dict[str, list] = {}
    for file in files:
        if is_annotation_name(file.relative):
            continue
        # an image by its bytes, as predict reads the shard (images.IMAGE_FORMATS): a name of no image extension
        # (.jfif, none) has its header read now, so that no shard carries what predict would skip
        if not is_image_name(file.relative) and (problem := not_an_image(file.path, escaped_name(file.path))):
            skipped.append({"file": escaped_name(file.path), "reason": problem})
        else:
            by_key.setdefault(_key(file.relative), []).append(file)
    items = []
    for key, images in by_key.items():
        xml = annotations.pop(key, None)
        if len(images) > 1 and xml is not None:
            names = " and ".join(PurePosixPath(image.relative).name for image in images)
            skipped += [{"file": escaped_name(file.path), "reason": f"{names} share the stem of {xml.path}: which "
                                                                    "one it describes is unknown (rename one)"}
                        for file in (*images, xml)]
            continue
        first = PurePosixPath(images[0].relative).name
        skipped += [{"file": escaped_name(image.path), "reason": f"same stem as {first}: a shard holds one sample "
                                                                 "per key"} for image in images[1:]]
        items.append(ShardItem(images[0].path, xml.path if xml else None, images[0].relative))
    skipped += [{"file": escaped_name(f"{prefix}{file.relative}"), "reason": "annotation without image"}
                for file in annotations.values()]
    items.sort(key=lambda item: PurePosixPath(item.name).parts)
    return items, skipped


def _member(item: ShardItem, file: Path) -> str:
    """The member name of *item*'s image or XML: beside each other, in the image's folder."""
    folder = PurePosixPath(item.name).parent
    return item.name if file is item.image else str(folder / file.name)


def _write_shard(path: Path, members: list[ShardItem]) -> tuple[Shard, list[dict]]:
    """Write one shard atomically; returns its index entry and its images' rows."""
    rows, count_xml = [], 0
    with atomic_path(path) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for item in members:
                row = {"name": item.name, "shard": path.name, "annotation": ""}
                for file in (item.image, item.annotation):
                    if file is None:
                        continue
                    data = file.read_bytes()
                    info = tarfile.TarInfo(_member(item, file))
                    info.size, info.mode, info.mtime = len(data), 0o644, int(file.stat().st_mtime)
                    tar.addfile(info, io.BytesIO(data))
                    if file is item.image:
                        row.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
                    else:
                        row["annotation"] = info.name
                        count_xml += 1
                rows.append(row)
    return Shard(path.name, len(members), count_xml, path.stat().st_size, file_sha256(path)), rows


def write_shards(items: list, out_dir, shard_size: int, workers: int = D.SHARD_WORKERS,
                 skipped: list[dict] | None = None, progress=None, extra: dict | None = None) -> ShardIndex:
    """Pack *items* (ShardItems, or (image, XML or None) pairs packed flat) into shards of *shard_size*
    images in *out_dir*; write the index.

    Shards are written in parallel (reading and hashing release the GIL), each one
    atomically, and the index last: a folder with an index.json is complete. *extra*
    goes into index.json as is (where the shards came from). *skipped* goes to skipped.csv, every entry, and
    to index.json, counted and the first INDEX_SKIPPED_LISTED named.
    """
    if shard_size < 1:
        raise InputError(f"shard size {shard_size}: must be at least 1")
    out_dir = Path(out_dir)
    if not items:
        raise InputError(f"{(extra or {}).get('source', out_dir)}: no images to pack into shards")
    items = [shard_item(item) for item in items]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / INDEX_JSON).unlink(missing_ok=True)  # an index names a complete folder: none while writing
    groups = [items[start:start + shard_size] for start in range(0, len(items), shard_size)]
    stale = {p.name for p in out_dir.glob("shard-*.tar")} - {SHARD_PATTERN.format(i) for i in range(len(groups))}
    for name in stale:  # shards of an earlier, larger packing of this folder
        (out_dir / name).unlink()

    def one(number: int):
        result = _write_shard(out_dir / SHARD_PATTERN.format(number), groups[number])
        if progress is not None:
            progress(len(groups[number]))
        return result

    shards = []
    # index.csv is written a shard's rows at a time, as the shards are done (in order): every image's row kept
    # until the end, then the whole file as one string, held ~450 bytes an image (450 MB for a million)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, atomic_path(out_dir / INDEX_CSV) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=INDEX_CSV_FIELDS, lineterminator="\n")
            writer.writeheader()
            for shard, rows in pool.map(one, range(len(groups))):
                shards.append(shard)
                writer.writerows(rows)
    shards = tuple(shards)
    index = {"format": FORMAT, "shard_size": shard_size, "num_shards": len(shards),
             "num_images": sum(s.images for s in shards), "num_annotations": sum(s.annotations for s in shards),
             "bytes": sum(s.bytes for s in shards), **(extra or {}), "num_skipped": 0, "skipped": [],
             "shards": [vars(shard) for shard in shards]}
    _write_skipped(out_dir, index, skipped)
    return ShardIndex(out_dir, shards, shard_size)


def _write_skipped(out_dir: Path, index: dict, skipped: list[dict] | None) -> None:
    """*skipped* into skipped.csv, every entry, then *index* (index.json's content) with them counted and the first
    INDEX_SKIPPED_LISTED named, written as index.json."""
    skipped = list(skipped or [])
    with atomic_path(out_dir / SKIPPED_CSV) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=("file", "reason"), lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(skipped)
    write_json(out_dir / INDEX_JSON, {**index, "num_skipped": len(skipped), "skipped": skipped[:INDEX_SKIPPED_LISTED]})


def pack_or_reuse(items: list, out_dir, shard_size: int, source: str,
                  skipped: list[dict] | None = None) -> ShardIndex:
    """The shards of *items* in *out_dir*: the ones already there when they were packed from the same
    files (names, sizes, times: source_signature) at the same size, else packed anew (write_shards). Either way
    skipped.csv and index.json list *skipped*, the files skipped now: the shards' packing may have skipped
    others, or have been made before skipped.csv was written."""
    out_dir = Path(out_dir)
    signature = source_signature(items)
    try:
        previous = json.loads((out_dir / INDEX_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = {}
    if previous.get("source_signature") == signature and previous.get("shard_size") == shard_size:
        index = read_index(out_dir)
        _write_skipped(out_dir, previous, skipped)
        return index
    return write_shards(items, out_dir, shard_size, skipped=skipped,
                        extra={"source": source, "source_signature": signature})


def read_index_csv(folder) -> list[dict]:
    """index.csv's rows (name, shard, bytes, sha256, annotation)."""
    return list(index_csv_rows(folder))


def index_csv_rows(folder):
    """index.csv's rows one at a time, as they are read (a list of a million images' rows held ~330 MB);
    InputError, at the first, when there is no index.csv."""
    path = Path(folder) / INDEX_CSV
    try:
        handle = open(path, newline="", encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: not found") from None
    with handle:
        yield from csv.DictReader(handle)


def source_signature(items: list) -> str:
    """A hash of what *items* hold: each image's member name, size and modification time (no image is read)
    and each XML file's name and bytes. Equal when the files are unchanged, so that a rerun reuses
    the shards it made; the XML is hashed by content because the generator rewrites
    annotations_clean/ on every run (new times, same bytes), and XML files are small."""
    digest = hashlib.sha256()
    for image, annotation, name in map(shard_item, items):
        stat = image.stat()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        if annotation is not None:
            digest.update(f"{annotation.name}\0".encode("utf-8", "surrogateescape")
                          + hashlib.sha256(annotation.read_bytes()).digest())
    return digest.hexdigest()
