"""A predict run's progress file: the records of the images done so far, so that a run stopped part way (Ctrl-C,
SIGTERM, a kill, a lost machine) and started again reads only the images it had not done.

The file (``.<predictions file>.progress.jsonl`` in the output folder) holds a header line, the *key* of the run
(the model files' sha256, every setting that changes a record, and the name, size and modification time of every
input file), then one JSON line per image done, appended and flushed as each is finished. A rerun whose key is the
same takes the records whose annotated and explanation images are still there and reads the other images; one
whose key differs (another model, setting or input) starts afresh. A last line cut short by the kill is dropped.
The file goes once the outputs are written. Detections do not depend on an image's batch mates, so the outputs
of a resumed run are those of a run never stopped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..atomic import write_text

FORMAT = 1
FSYNC_EVERY = 64  # records: flushed each one (a killed process loses none), synced to disk now and then


def progress_path(output_dir: Path, predictions_name: str) -> Path:
    return Path(output_dir) / f".{predictions_name}.progress.jsonl"


def inputs_fingerprint(items, read) -> list:
    """What the run reads: each item's name and every file read (an archive, not its members) by path, size and
    modification time (a changed, added or removed file changes it; reading them all again would cost a run)."""
    files = []
    for path in read:
        try:
            stat = os.stat(path)
        except OSError:
            files.append([str(path), None, None])
        else:
            files.append([str(path), stat.st_size, stat.st_mtime_ns])
    return [[item.name for item in items], files]


class PredictionProgress:
    """Open with the run's *key*; ``done`` maps image names to the records a stopped run left (empty when none or
    when its key differs); ``add`` appends a record; ``finish`` removes the file."""

    def __init__(self, path: Path, key: dict):
        self.path = Path(path)
        self.key = {"format": FORMAT, **key}
        self.done: dict[str, dict] = {}
        self.stale = False  # a progress file of another model, setting or input set was found and dropped
        kept = self._read()
        header = json.dumps({"predict_progress": self.key}, sort_keys=True)
        # the header and the good records, rewritten whole: a cut last line is not appended to
        write_text(self.path, "".join(line + "\n" for line in [header, *kept]))
        self._handle = open(self.path, "a", encoding="utf-8")
        self._unsynced = 0

    def _read(self) -> list[str]:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return []
        try:
            header = json.loads(lines[0])["predict_progress"] if lines else None
        except (ValueError, KeyError, TypeError):
            header = None
        if header != json.loads(json.dumps(self.key)):  # compared as read back: tuples are lists there
            self.stale = bool(lines)
            return []
        kept = []
        for line in lines[1:]:
            try:
                record = json.loads(line)
                name = record["file"]
            except (ValueError, KeyError, TypeError):
                break  # the line a kill cut short: it and anything after it are read again
            self.done[name] = record
            kept.append(line)
        return kept

    def forget(self, name: str) -> None:
        """Read *name* again (its annotated image is gone): its record stays in the file, the new one follows."""
        self.done.pop(name, None)

    def add(self, record: dict) -> None:
        self._handle.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._handle.flush()
        self._unsynced += 1
        if self._unsynced >= FSYNC_EVERY:
            os.fsync(self._handle.fileno())
            self._unsynced = 0

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.flush()
            self._handle.close()

    def finish(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
