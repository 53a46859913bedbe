"""A job's progress as a file of JSON lines, which a rerun of the stopped job reads back and goes on from: a header
line naming the run (``{header: key}``), then one record a line, each flushed as it is written. predict's images
(utils/detection/prediction_progress.py) and predict_video's frames (video_progress.py) keep theirs so.

A line a kill cut short, or one that is not a record of the run, ends the records read; a file of another run
(another key), or one that cannot be read, is *stale*: its job starts afresh and says so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FSYNC_EVERY = 64  # records: flushed each one (a killed process loses none), synced to disk now and then


def read_records(path: Path, header: str, key: dict, accept) -> tuple[list[dict] | None, list[int], bool]:
    """(records, ends, stale) of the progress file *path* of the run *key*: the records read while
    ``accept(entry, records so far)`` holds, and the byte offsets after the header and after each of them. records is
    None when the file is absent, unreadable or of another run; stale says whether such a file held anything."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return None, [], False
    except OSError:
        return None, [], True
    records, ends = [], []
    with handle:
        try:
            found = json.loads(handle.readline().decode("utf-8"))[header]
        except (ValueError, KeyError, TypeError, RecursionError):  # not UTF-8, not JSON, too deep, no header
            found = None
        if found != key:
            return None, [], handle.tell() > 0
        ends.append(handle.tell())
        for line in handle:
            if not line.endswith(b"\n"):
                break  # a line a kill cut short
            try:
                entry = json.loads(line.decode("utf-8"))
            except (ValueError, RecursionError):
                break
            if not accept(entry, records):
                break
            records.append(entry)
            ends.append(handle.tell())
    return records, ends, False


class RecordWriter:
    """Appends records to the progress file *path*: each flushed, synced every FSYNC_EVERY."""

    def __init__(self, path: Path):
        self._handle = open(path, "a", encoding="utf-8")
        self._unsynced = 0

    def append(self, record: dict) -> None:
        self._handle.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._handle.flush()
        self._unsynced += 1
        if self._unsynced >= FSYNC_EVERY:
            os.fsync(self._handle.fileno())
            self._unsynced = 0

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()
