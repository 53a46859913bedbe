"""Image/annotation pairs: the unit of data passed between jobs.

Jobs exchange folders of VOC pairs (images/ + annotations/). In the Pegasus
workflow a folder travels as one .tar of flat files, so every folder argument may
also name a .tar archive, unpacked to a temporary folder for the job's lifetime (predict reads a plain one
where its files lie: members_in_place).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import os
import tarfile
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from .. import defaults as D
from ..atomic import atomic_path
from ..errors import InputError, require_set
from ..provenance import file_sha256, sets_sha256
from .images import (NOT_UTF8, ImageError, escaped_name, is_annotation_name, is_image_name, load_rgb_hashed,
                     not_an_image, valid_utf8_name)
from .voc import VocError, parse_voc


@dataclass(frozen=True)
class Pair:
    image: Path
    annotation: Path
    image_sha256: str | None = field(default=None, compare=False)  # from the read scan_pairs decoded it with
    image_size: tuple[int, int] | None = field(default=None, compare=False)  # (width, height) as displayed, ditto

    @property
    def stem(self) -> str:
        return self.image.stem


SUBFOLDER_NOT_READ = ("a subfolder: its files are not read (the images and annotations must sit in the folder or "
                      "archive itself)")


@dataclass
class Pairing:
    pairs: list[Pair] = field(default_factory=list)
    images_without_annotation: list[Path] = field(default_factory=list)
    annotations_without_image: list[Path] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)  # subfolders of either folder, whose files are not read
    # Entries of either folder that cannot be an input, [{file, reason}]: names that are not valid UTF-8 (no JSON,
    # CSV, XML or tar member can hold them), links to nothing (or a loop of links), anything not a file or folder,
    # files of the images' folder that are neither an image by their bytes nor a VOC file.
    left_out: list[dict] = field(default_factory=list)


def _entry_problem(path: Path) -> str | None:
    """Why the folder entry *path* cannot be read as an input file, or None (a file, or a folder)."""
    if not valid_utf8_name(path.name):
        return NOT_UTF8
    if path.is_file() or path.is_dir():
        return None
    if path.is_symlink():
        try:
            target = escaped_name(path.readlink())
        except OSError:
            target = "?"
        return f"a symbolic link to nothing (its target {target} does not exist, or the links form a loop)"
    return "not a regular file" if path.exists() else "no longer there"


def _extract(archive_path: Path, into: str, suffixes=None, seen: dict | None = None) -> None:
    """Unpack *archive_path* into *into*: only members ending in *suffixes* when given; a name
    that an earlier archive (in *seen*) already gave is an InputError naming both."""
    try:
        with tarfile.open(archive_path) as archive:
            members = [m for m in archive.getmembers()
                       if suffixes is None or m.name.lower().endswith(tuple(suffixes))]
            if seen is not None:
                for member in members:
                    if member.name in seen:
                        raise InputError(f"{archive_path}: {member.name} is also in {seen[member.name]}")
                    seen[member.name] = archive_path.name
            archive.extractall(into, members=members, filter="data")  # "data" refuses absolute paths, links out
    except tarfile.FilterError as error:  # a member that would land outside the folder: hostile, not damaged
        member = getattr(getattr(error, "tarinfo", None), "name", "?")
        raise InputError(f"{archive_path}: unsafe member {member!r} (it would be written outside the folder it "
                         "is unpacked into: an absolute path, '..' or a link leading out); not unpacked") from None
    except tarfile.TarError as error:
        raise InputError(f"{archive_path}: damaged .tar archive ({error})") from None
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # a write names no file ('[Errno 28] No space left on device'): say where, and how much it needs there
        raise InputError(f"{archive_path}: the temporary folder {Path(into).parent} has no room for it "
                         f"({os.strerror(error.errno)}; it needs about {archive_path.stat().st_size / 1e6:.1f} MB; "
                         "point TMPDIR at a disk with room)") from None


@dataclass(frozen=True)
class TarMember:
    """A file of an uncompressed .tar read where it lies: its path in the archive and where its bytes are."""

    relative: str
    offset: int
    size: int


def members_in_place(archive_path) -> list[TarMember] | None:
    """The files of the uncompressed .tar *archive_path* in the order list_files gives them once unpacked (path
    order; hidden names left out), to be read where they lie: a 50 GB archive takes no room in the temporary
    folder and its first image is read at once, not after the whole archive is unpacked. None when it is to be
    unpacked (open_folder) for its files to read as a folder's, or to be refused with its reason: compressed or
    no .tar, a link, a sparse or special file, a name given twice or that is a folder's too, a name that is not
    UTF-8 or would leave the folder it unpacks into. Only the members' headers are read (seeks over the rest)."""
    found, folders = {}, set()
    try:
        with tarfile.open(archive_path, "r:") as archive:
            for info in archive:
                name = PurePosixPath(info.name)
                parts = [part for part in name.parts if part != "."]
                if name.is_absolute() or ".." in parts or not valid_utf8_name(info.name):
                    return None
                if info.isdir():
                    continue
                relative = "/".join(parts)
                if not info.isreg() or info.sparse is not None or not parts or relative in found:
                    return None
                folders.update("/".join(parts[:end]) for end in range(1, len(parts)))
                found[relative] = TarMember(relative, info.offset_data, info.size)
    except (tarfile.TarError, OSError):
        return None
    if folders & found.keys():
        return None
    return sorted((member for relative, member in found.items()
                   if not any(part.startswith(".") for part in relative.split("/"))),
                  key=lambda member: member.relative.split("/"))


def open_member(archive: tarfile.TarFile, member: TarMember):
    """A file object on the bytes of *member* (members_in_place's) in the open *archive*: a window read where they
    lie, nothing read until asked for."""
    info = tarfile.TarInfo(member.relative)  # a regular file's: its data where the listing found it
    info.offset_data, info.size = member.offset, member.size
    return archive.extractfile(info)


@contextlib.contextmanager
def open_folder(path, suffixes=None):
    """Yield a folder for *path*: the folder itself, or a .tar unpacked to a temporary folder.

    *path* may also be a list: one entry as above, several .tar shards (a sharded set)
    unpacked into one temporary folder. *suffixes* (".xml",) unpacks only those members.
    """
    paths = [Path(p) for p in path] if isinstance(path, (list, tuple)) else [Path(path)]
    kind = require_set(paths)  # a missing path or one of another kind: one line naming it
    if kind == "shards":
        with tempfile.TemporaryDirectory(prefix="shards.") as tmp:
            seen: dict = {}
            for shard in paths:
                _extract(shard, tmp, suffixes, seen)
            yield Path(tmp)
        return
    path = paths[0]
    if kind == "folder":
        yield path
        return
    with tempfile.TemporaryDirectory(prefix=f"{path.stem}.") as tmp:
        _extract(path, tmp, suffixes)
        yield Path(tmp)


def pack_files(members, archive) -> Path:
    """Pack *members*, (file, name in the archive) pairs in the order given, into the .tar *archive*, atomically."""
    with atomic_path(archive) as tmp:
        write_tar(members, tmp)
    return Path(archive)


def write_tar(members, path) -> None:
    """Pack *members* (pack_files') into a .tar at *path* as it is (a temporary path of a set of files)."""
    with tarfile.open(path, "w") as tar:
        for file, name in members:
            tar.add(file, arcname=name)


def pack_folder(folder, archive, prefix: str = "") -> Path:
    """Pack the files of *folder* (sorted, by their path in it after *prefix*) into the .tar *archive*, atomically."""
    folder = Path(folder)
    return pack_files(((file, f"{prefix}{file.relative_to(folder).as_posix()}")
                       for file in sorted(p for p in folder.rglob("*") if p.is_file())), archive)


def pair_folders(images_dir, annotations_dir) -> Pairing:
    """Pair images and XML files by file stem; report the unmatched on both sides."""
    images_dir, annotations_dir = Path(images_dir), Path(annotations_dir)
    pairing = Pairing()
    entries = {}  # folder -> its usable entries; the others are left out, said once each
    for folder in dict.fromkeys((images_dir, annotations_dir)):
        entries[folder] = []
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if path.name.startswith("."):
                continue
            problem = _entry_problem(path)
            if problem:
                pairing.left_out.append({"file": escaped_name(path), "reason": problem})
            else:
                entries[folder].append(path)
    images = {}
    for path in entries[images_dir]:
        if not path.is_file() or is_annotation_name(path):
            continue
        # a photo by its bytes, whatever its name (images.IMAGE_FORMATS): a name of no image extension is read now
        if not is_image_name(path) and (problem := not_an_image(path, path)):
            pairing.left_out.append({"file": escaped_name(path), "reason": problem})
        else:
            images.setdefault(path.stem, []).append(path)
    annotations = {p.stem: p for p in entries[annotations_dir] if p.is_file() and p.suffix.lower() == ".xml"}
    for stem, paths in images.items():
        if stem in annotations and len(paths) > 1:
            paths = _named_image_first(paths, annotations[stem])
        for path in paths:
            if stem in annotations:
                pairing.pairs.append(Pair(path, annotations[stem]))
            else:
                pairing.images_without_annotation.append(path)
    pairing.annotations_without_image = [p for stem, p in annotations.items() if stem not in images]
    pairing.folders = [path for paths in entries.values() for path in paths if path.is_dir()]
    return pairing


def _named_image_first(paths: list[Path], annotation: Path) -> list[Path]:
    """*paths*, images sharing the stem of *annotation*, with the one its <filename> names first: its boxes are of
    that image, and validation and preprocess keep the first of a stem (dup.jpg and dup.png with a dup.xml drawn on
    dup.png kept dup.jpg with dup.png's boxes)."""
    try:
        named = PurePosixPath(parse_voc(annotation).filename.replace("\\", "/")).name
    except VocError:  # validation says why the XML cannot be read; which image comes first does not matter
        return paths
    return sorted(paths, key=lambda path: path.name != named)  # stable: the others keep their order


def _read_problem(pair) -> tuple[dict | None, str | None, tuple[int, int] | None]:
    """(Why *pair* cannot be trained or evaluated on, or None: its XML parses and its image decodes in full (a
    truncated file passes a header read, then stops a training run in its first epoch); its image's sha256; its
    displayed (width, height))."""
    try:
        parse_voc(pair.annotation)
        image, sha256, error = load_rgb_hashed(pair.image)
        if error is not None:
            raise error
    except (VocError, ImageError) as error:  # the file once: str(error) starts with it too
        problem = getattr(error, "problem", str(error))
        return {"file": str(getattr(error, "file", pair.image)), "problem": problem}, None, None
    except OSError as error:
        return {"file": str(pair.image), "problem": f"unreadable ({error})"}, None, None
    return None, sha256, image.size


def scan_pairs(pairs) -> tuple[list, list[dict]]:
    """Pairs whose annotation parses and whose image decodes, with the image's sha256 (pairs_sha256) and displayed
    size (recipe.too_thin_to_train) from that read; the rest as [{file, problem}]. Decoded on a few threads
    (Pillow's decoders release the GIL), each image dropped once read."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from ..parallel import ordered_map

    pairs = list(pairs)
    workers = max(1, min(D.VALIDATE_WORKERS_MAX, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        read = list(ordered_map(pool, _read_problem, pairs, ahead=4 * workers))
    usable = [replace(pair, image_sha256=sha256, image_size=size)
              for pair, (problem, sha256, size) in zip(pairs, read) if problem is None]
    return usable, [problem for problem, _, _ in read if problem is not None]


def pairs_sha256(*sets) -> tuple[str, dict]:
    """(sets_sha256 of sets of pairs, each pair's image and annotation; every file's sha256 by path, for the run
    record): the images' hashes taken from scan_pairs' read, so a training set is not read again to hash it."""
    files = {pair.image: pair.image_sha256 or file_sha256(pair.image) for pairs in sets for pair in pairs}
    files.update({pair.annotation: file_sha256(pair.annotation) for pairs in sets for pair in pairs})
    return sets_sha256(*([p for pair in pairs for p in (pair.image, pair.annotation)] for pairs in sets),
                       known=files), files


def object_problems(pairs, label_map=None) -> list[dict]:
    """[{file, problem}] for every object of *pairs*' annotations that training or evaluation drops (unknown
    class, box outside the image or of no area) or clips, read as the dataset reads them (utils.data.voc
    clean_objects, object names through *label_map*): so that a run can say what it did not learn from."""
    from ..classes import CLASSES, NO_LABEL_MAP
    from .images import image_size
    from .voc import clean_objects, parse_voc_for_image

    problems = []
    for pair in pairs:
        try:
            width, height = image_size(pair.image)
            annotation, _ = parse_voc_for_image(pair.annotation, pair.image, (width, height),
                                                label_map or NO_LABEL_MAP)
        except (VocError, ImageError, OSError):
            continue  # scan_pairs lists such pairs as skipped
        problems += [{"file": str(pair.annotation), "problem": text}
                     for text in clean_objects(annotation, width, height, known_classes=CLASSES)[1]]
    return problems


def object_problems_line(problems: list[dict]) -> str | None:
    """One line for object_problems' list (None when empty): how many, in how many files, the first."""
    if not problems:
        return None
    files = len({item["file"] for item in problems})
    return (f"{len(problems)} object(s) in {files} annotation(s) dropped or clipped (first: {problems[0]['file']}: "
            f"{problems[0]['problem']}); all in the run record")


@contextlib.contextmanager
def open_pairs(images, annotations):
    """Yield (usable pairs, skipped [{file, problem}]) for a folder or .tar of each kind (the same path allowed)."""
    with contextlib.ExitStack() as stack:
        images_dir = stack.enter_context(open_folder(images))
        annotations_dir = (images_dir if Path(annotations) == Path(images)
                           else stack.enter_context(open_folder(annotations)))
        pairing = pair_folders(images_dir, annotations_dir)
        usable, skipped = scan_pairs(pairing.pairs)
        skipped += [{"file": str(p), "problem": "image without annotation"}
                    for p in pairing.images_without_annotation]
        skipped += [{"file": str(p), "problem": "annotation without image"}
                    for p in pairing.annotations_without_image]
        # named by the folder or archive given (a .tar is unpacked to a temporary folder)
        skipped += [{"file": f"{images if folder.parent == images_dir else annotations}: {folder.name}/",
                     "problem": SUBFOLDER_NOT_READ} for folder in pairing.folders]
        skipped += [{"file": item["file"], "problem": item["reason"]} for item in pairing.left_out]
        yield usable, skipped


def read_csv_rows(csv_path, required=("image", "annotation")) -> list[dict]:
    """The rows of a UTF-8 CSV with a header; InputError naming the file when a *required* column is missing."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:  # -sig: a spreadsheet's byte-order mark
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            missing = [name for name in required if name not in columns]
            if missing:
                raise InputError(f"{csv_path}: no {missing[0]!r} column "
                                 f"(expected {', '.join(required)}; found {', '.join(columns) or 'none'})")
            return list(reader)
    except (UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"{csv_path}: not a readable UTF-8 CSV ({error})") from None


def read_pairs_csv(csv_path, images_dir=None, annotations_dir=None, split: str | None = None) -> list[Pair]:
    """Read pairs from a manifest (image, annotation[, split]) CSV.

    Relative entries are resolved against *images_dir*/*annotations_dir* by file name
    when given (jobs get files staged flat), else against the CSV's folder.
    """
    csv_path = Path(csv_path)
    pairs = []
    for row in read_csv_rows(csv_path):
        if split is not None and row.get("split") != split:
            continue
        image, annotation = Path(row["image"]), Path(row["annotation"])
        image = (Path(images_dir) / image.name if images_dir
                 else (image if image.is_absolute() else csv_path.parent / image))
        annotation = (Path(annotations_dir) / annotation.name if annotations_dir
                      else (annotation if annotation.is_absolute() else csv_path.parent / annotation))
        pairs.append(Pair(image, annotation))
    return pairs


def write_pairs_csv(path, rows, fields=("image", "annotation")) -> Path:
    """Write dict rows to a CSV atomically, a row at a time as they come: the text rendered whole first held
    about 2.7 times the file (~30-60 MB at 100k rows of split.csv or clean_manifest.csv)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (str(v) if isinstance(v, Path) else v) for k, v in row.items()})
    return Path(path)
