"""A predict_video run's progress: the detections of the frames it processed, so that a run over a video file
stopped part way (SIGTERM, Ctrl-C, a kill, a lost machine) and started again reads the frames again (a decode,
~10 ms a frame) but runs the model only on the frames not done: a long video's hours of detection are kept.

The file (``.<frames csv>.progress.jsonl`` in the output folder, or bin/predict_video.py --checkpoint FILE, which
a pool hands from a stopped try to the retry) holds a header line, the run's *key* (the model files' sha256, the
packages, the code, the device, every setting that changes which frames run or their detections, and the video
file: by size and modification time, or by sha256 for a checkpoint, whose next try reads a new copy), then a line
per processed frame, appended and flushed as each is done: its number, its score sums per class down to the
detection floor and the detections kept. A rerun with the same key takes each frame's detections from it, in
order; everything else (times, rows, drawings, the annotated video, the figures) is made again as a run never
stopped makes it, so its outputs are the same. A last line a kill cut short is dropped; a file of another key,
or one that cannot be read, starts afresh (one line). Cameras and live streams do not resume: their frames do
not come again. Once the outputs are written for the whole run the file is removed (a checkpoint: emptied).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..atomic import write_bytes, write_text
from ..classes import CLASSES, NAME_OF
from ..progress_file import RecordWriter, read_records

FORMAT = 1


def progress_path(output_dir, frames_csv: str) -> Path:
    return Path(output_dir) / f".{frames_csv}.progress.jsonl"


def _is_record(entry, after: int) -> bool:
    """Whether *entry*, read back, is a processed frame's record that comes after frame *after*."""
    if not isinstance(entry, dict) or not isinstance(entry.get("frame"), int) or entry["frame"] <= after:
        return False
    boxes, labels, scores, soft = (entry.get(key) for key in ("boxes", "labels", "scores", "soft"))
    if not all(isinstance(value, list) for value in (boxes, labels, scores, soft)):
        return False
    return (len(boxes) == len(labels) == len(scores) and len(soft) == len(CLASSES)
            and all(isinstance(box, list) and len(box) == 4 for box in boxes)
            and all(isinstance(label, int) and label in NAME_OF for label in labels)
            and all(isinstance(value, (int, float)) for value in [*scores, *soft, *(v for b in boxes for v in b)]))


class VideoProgress:
    """Opened with the run's *key*: ``detections(frame)`` gives a frame's detections from the earlier run (in
    order, then None), ``add`` appends a frame's, ``finish`` removes the file (*checkpoint*: empties it)."""

    def __init__(self, path, key: dict, checkpoint: bool = False):
        self.path = Path(path)
        self.checkpoint = checkpoint
        self.key = json.loads(json.dumps({"format": FORMAT, **key}))  # as read back
        self.done: list[dict] = []
        self._ends: list[int] = []  # byte offsets: after the header, then after each record of ``done``
        self._used = 0  # records of ``done`` given out
        self.stale = False  # a progress file of another run (or unreadable) was found and dropped
        if self._read():
            with open(self.path, "r+b") as handle:  # a line a kill cut short goes
                handle.truncate(self._ends[len(self.done)])
        else:
            write_text(self.path, json.dumps({"video_progress": self.key}, sort_keys=True) + "\n")
        self._writer = RecordWriter(self.path)

    def _read(self) -> bool:
        """Read the records into ``done``; False when the file is absent, empty or of another run."""
        records, self._ends, self.stale = read_records(
            self.path, "video_progress", self.key,
            lambda entry, records: _is_record(entry, records[-1]["frame"] if records else -1))
        self.done = records or []
        return records is not None

    def detections(self, frame: int) -> tuple[dict, list] | None:
        """(the detections kept, the score sums per class) of processed frame *frame* as the earlier run found
        them; None when it did not (the frames from here on run the model)."""
        if self._used < len(self.done) and self.done[self._used]["frame"] == frame:
            record = self.done[self._used]
            self._used += 1
            # float64 holds the values written exactly, whether the model gave float32 or fused boxes in float64:
            # the drawing (tolist) sees the same numbers as the run that found them
            return {"boxes": torch.tensor(record["boxes"], dtype=torch.float64).reshape(-1, 4),
                    "labels": torch.tensor(record["labels"], dtype=torch.int64),
                    "scores": torch.tensor(record["scores"], dtype=torch.float64)}, record["soft"]
        return None

    def add(self, frame: int, detections: dict, soft) -> None:
        """Append processed frame *frame*'s record; records of the earlier run not given out (the video gave
        other frames this time) go first."""
        if self._used < len(self.done):
            self._writer.close()
            with open(self.path, "r+b") as handle:
                handle.truncate(self._ends[self._used])
            del self.done[self._used:], self._ends[self._used + 1:]
            self._writer = RecordWriter(self.path)
        record = {"frame": frame, "soft": list(soft), "boxes": detections["boxes"].tolist(),
                  "labels": detections["labels"].tolist(), "scores": detections["scores"].tolist()}
        self._writer.append(record)

    def close(self) -> None:
        self._writer.close()

    def finish(self) -> None:
        """The run's outputs are written for the whole run: nothing is left to resume."""
        self.close()
        if self.checkpoint:
            write_bytes(self.path, b"")  # a checkpoint a pool transfers must exist when the job exits
        else:
            self.path.unlink(missing_ok=True)


def run_key(models, device: str, source: str, stride: int, threshold: float, tta: bool, size, by_content: bool,
            box_vote_iou: float | None) -> dict:
    """The key of a predict_video run over the video file *source*: what makes its frames' detections the same.
    *by_content*: the video by its sha256 (a checkpoint's next try reads a new copy), else by size and time.
    *box_vote_iou*: the IoU boxes vote at, None without box voting (it moves the boxes)."""
    from ..provenance import code_version, file_sha256, package_versions
    from .inference import detection_floor

    stat = os.stat(source)
    return {"models": [file_sha256(model) for model in models], "device": device, "packages": package_versions(),
            "code": code_version()["sources_sha256"], "stride": stride, "score_threshold": threshold,
            "floor": detection_floor(threshold), "tta": tta, "working_size": size, "box_vote_iou": box_vote_iou,
            "video": [str(source), stat.st_size, file_sha256(source) if by_content else stat.st_mtime_ns]}
