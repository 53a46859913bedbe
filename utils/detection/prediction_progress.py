"""A predict run's progress file: the records of the images done so far, so that a run stopped part way (Ctrl-C,
SIGTERM, a kill, a lost machine) and started again reads only the images it had not done.

The file (``.<predictions file>.progress.jsonl`` in the output folder) holds a header line, the *key* of the run
(the model files' sha256, the package versions, the code's sources and device, every setting that changes a
record, the batch size, and the name, size and modification time of every input file), then one JSON line per
input in input order, an image's record or a skipped file's reason (with the sha256 its read took, for the run
record), appended and flushed as each is finished.
The drawings wait in a folder beside it (``.<predictions file>.progress.annotated``) until the run's outputs are
written.

A rerun whose key is the same keeps the records of the whole batches done, whose drawings are all there, and reads
the inputs from the first batch that is not: the batches it runs are those of a run never stopped, so are its
detections (on a CPU a convolution's last bits depend on the batch size, and near ties can change which boxes
are kept). A key that differs (another model, setting or input) or a file that cannot be read starts afresh;
a last line cut short by a kill is dropped. The file and the folder go once the outputs are written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from ..atomic import write_text
from ..progress_file import RecordWriter, read_records
from ..provenance import file_sha256

FORMAT = 2
RECORD_KEYS = ("file", "folder", "width", "height", "annotated", "detections", "soft_counts", "compliance")


def progress_path(output_dir: Path, predictions_name: str) -> Path:
    return Path(output_dir) / f".{predictions_name}.progress.jsonl"


def inputs_fingerprint(items, read, drawn, by_content: bool = False) -> str:
    """The sha256 of what the run reads and draws: each item's name, every file read (an archive, not its members)
    by path, size and modification time (a changed, added or removed file changes it; hashing them all would
    cost a read of the collection) and the names of the images drawn; a digest, not the lists, keeps the header
    of a 100k-image run short. *by_content*: each file by its sha256 in place of its modification time, for a
    progress that travels to another machine (prediction_checkpoint.py), where the file is a new copy."""
    files = []
    for path in read:
        try:
            stat = os.stat(path)
            files.append([str(path), stat.st_size, file_sha256(path) if by_content else stat.st_mtime_ns])
        except OSError:
            files.append([str(path), None, None])
    text = json.dumps([[item.name for item in items], files, sorted(drawn)])
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def drawn_files(record: dict) -> list[str]:
    """The annotated and explanation images of an image's record."""
    if not record.get("annotated"):
        return []
    return [record["annotated"], *(explained["file"] for explained in record.get("explanations", []))]


def _is_record(entry, name: str) -> bool:
    """Whether *entry*, read back, is the record of the input *name*: an image's or a skipped file's."""
    if not isinstance(entry, dict) or entry.get("file") != name:
        return False
    if "skipped" in entry:
        return isinstance(entry["skipped"], str)
    return all(key in entry for key in RECORD_KEYS) and all(isinstance(file, str) for file in drawn_files(entry))


class PredictionProgress:
    """Opened with the run's *key*, its input *names* in order and *batch_size*: ``done`` holds the records kept
    (a prefix of whole batches, in input order), ``drawings`` the folder their drawings are in; ``add`` appends
    a record; ``finish`` removes the file and the folder."""

    def __init__(self, path: Path, key: dict, names: list[str], batch_size: int):
        self.path = Path(path)
        self.drawings = self.path.with_suffix(".annotated")
        self.key = json.loads(json.dumps({"format": FORMAT, "batch_size": batch_size, **key}))  # as read back
        self.done: list[dict] = []
        self.stale = False  # a progress file of another run (or unreadable) was found and dropped
        end = self._read(names, batch_size)
        if end is None:  # none, another key's, unreadable: a new file and an empty drawings folder
            shutil.rmtree(self.drawings, ignore_errors=True)
            write_text(self.path, json.dumps({"predict_progress": self.key}, sort_keys=True) + "\n")
        else:
            with open(self.path, "r+b") as handle:  # the records after the batches kept are read again
                handle.truncate(end)
        kept = {file for record in self.done for file in drawn_files(record)}
        if self.drawings.is_dir():  # drawings of the inputs read again, a write a kill cut short
            for file in self.drawings.iterdir():
                if file.name not in kept:
                    file.unlink() if not file.is_dir() or file.is_symlink() else shutil.rmtree(file)
        self._writer = RecordWriter(self.path)

    def _read(self, names: list[str], batch_size: int) -> int | None:
        """Read the records of the whole batches done into ``done``; the byte offset after them, or None when the
        file is absent or of another run."""
        records, ends, self.stale = read_records(
            self.path, "predict_progress", self.key,
            lambda entry, records: len(records) < len(names) and _is_record(entry, names[len(records)]))
        if records is None:
            return None
        whole = len(records) if len(records) == len(names) else len(records) - len(records) % batch_size
        for start in range(0, whole, batch_size):  # a batch with a drawing gone is read again, and all after it
            batch = records[start:start + batch_size]
            if not all((self.drawings / file).is_file() for record in batch for file in drawn_files(record)):
                whole = start
                break
        self.done = records[:whole]
        return ends[whole]

    def add(self, record: dict) -> None:
        self._writer.append(record)

    def stopped_at(self, done: int, images: int) -> str:
        """What a stop leaves, for its one line."""
        return f"{done} of {images} images done, kept in {self.path} for the rerun to resume from"

    def close(self) -> None:
        self._writer.close()

    def finish(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
        shutil.rmtree(self.drawings, ignore_errors=True)
