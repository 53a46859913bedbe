"""A predict job's progress as one file (bin/predict.py --checkpoint): the progress file and its folder of drawings
(prediction_progress.py) packed in a .tar, which a pool carries from a stopped try to the next.

On a pool a job's progress file is in its try's sandbox, which the retry does not get back: a predict job over a
shard of 1000 photos (--images-per-job), evicted or stopped at its time limit near the end, read them all again.
Pegasus hands a job's checkpoint files (Job.add_checkpoint) from one try to the next, one file each, so the
workflow declares this one for every predict job, as it declares train's checkpoint.

The job restores it before it starts when its output folder holds no progress file (a new sandbox); where one is
there (a rerun in the same folder, the local executor's), that one is at least as new as the .tar packed from it
and is used as it is. It saves it every SAVE_EVERY images and when it stops (SIGTERM, Ctrl-C, an error), appending
what is new (a kill while it appends leaves the last save whole: save()), and empties it once its outputs are
written: nothing is left to resume. What it holds is checked as the progress file always is (its key: the model,
settings and inputs; whole batches whose drawings are all there), so a .tar of another run resumes nothing. A file
that is not such a .tar (a stand-in, a damaged file) is said in one line, and the run starts afresh.
"""

from __future__ import annotations

import contextlib
import shutil
import tarfile
import time
from pathlib import Path, PurePosixPath

from .. import defaults as D
from ..atomic import atomic_path, write_bytes

SAVE_EVERY = D.PREDICT_CHECKPOINT_EVERY


class PredictionCheckpoint:
    """The checkpoint .tar *path* of the progress file *progress* (and its drawings folder beside it)."""

    def __init__(self, path, progress: Path):
        self.path = Path(path)
        self.progress = Path(progress)
        self.drawings = self.progress.with_suffix(".annotated")  # as PredictionProgress names it
        self._since_save = 0
        self._end: int | None = None  # where the members of this run's last save end (None: none saved yet)
        self._packed: set[str] = set()  # the drawings in it
        self._progress_packed = 0  # the bytes of the progress file in it

    def restore(self) -> str | None:
        """Unpack the checkpoint into the output folder when no progress file is there; returns what was done,
        for a line, or None when there was nothing to do (no checkpoint, an empty one, a progress file there)."""
        if self.progress.exists() or not self.path.is_file() or self.path.stat().st_size == 0:
            return None
        try:
            with tarfile.open(self.path, "r:") as archive:
                members = _whole_members(archive, self.path.stat().st_size)
                if problem := self._problem(members):
                    return f"{self.path.name}: {problem}; starting afresh"
                shutil.rmtree(self.drawings, ignore_errors=True)
                self.drawings.mkdir(parents=True)
                # the drawings first, the progress file (its pieces, one a save, joined) last: a kill in between
                # leaves no progress file, and the next try restores again
                for member in members:
                    if member.isfile() and member.name != self.progress.name:
                        with archive.extractfile(member) as source, atomic_path(
                                self.progress.parent / member.name) as tmp, open(tmp, "wb") as target:
                            shutil.copyfileobj(source, target)
                with atomic_path(self.progress) as tmp, open(tmp, "wb") as target:
                    for member in members:
                        if member.name == self.progress.name:
                            with archive.extractfile(member) as source:
                                shutil.copyfileobj(source, target)
        except (tarfile.TarError, OSError) as error:  # a stand-in, a damaged file: no checkpoint
            shutil.rmtree(self.drawings, ignore_errors=True)
            self.progress.unlink(missing_ok=True)
            return f"{self.path.name}: not a checkpoint of a predict run ({error}); starting afresh"
        return f"{self.path.name}: the progress of an earlier try restored"

    def _problem(self, members) -> str | None:
        """Why *members* are not a checkpoint's: the progress file, and plain files in the drawings folder."""
        if self.progress.name not in {member.name for member in members}:
            return f"holds no {self.progress.name}"
        for member in members:
            parts = PurePosixPath(member.name).parts
            if member.name == self.drawings.name and member.isdir():
                continue
            if member.name == self.progress.name and member.isfile():
                continue
            if (len(parts) == 2 and parts[0] == self.drawings.name and member.isfile()
                    and not parts[1].startswith(".") and parts[1] not in (".", "..")):
                continue
            return f"holds {member.name!r}, not a file of a predict run's progress"
        return None

    def save(self) -> None:
        """Pack the progress file and the drawings done into the checkpoint; the checkpoint is left as it is when
        there is no progress file (a try that stopped before it began: the last one is still good). The first save
        of a run writes it whole, atomically; each later one appends what is new since (the drawings, the progress
        file's new lines) after the last save's end, so a shard's saves cost its drawings once, not once a save (a
        1000-image shard's 10 saves packed ~5.5 times its drawings), and a kill while it appends leaves the last
        save whole (restore stops at a member cut short)."""
        self._since_save = 0
        if not self.progress.is_file():
            return
        size = self.progress.stat().st_size
        if self._end is None or size < self._progress_packed:  # the first save, or a progress file begun anew
            self._packed, self._progress_packed = set(), 0
            with atomic_path(self.path) as tmp, tarfile.open(tmp, "w") as archive:
                if self.drawings.is_dir():
                    archive.add(self.drawings, arcname=self.drawings.name, recursive=False)
                end = self._append(archive, size)
        else:
            with open(self.path, "r+b") as handle:
                handle.seek(self._end)
                with tarfile.open(fileobj=handle, mode="w") as archive:
                    end = self._append(archive, size)
        self._end = end

    def _append(self, archive, size: int) -> int:
        """Add the drawings not packed yet, then the progress file's bytes after those packed (up to *size*);
        returns where the archive's members end (the next save appends there)."""
        new = []
        if self.drawings.is_dir():
            for file in sorted(self.drawings.iterdir()):
                if file.name.startswith(".") or file.name in self._packed or not file.is_file():
                    continue  # a drawing being written (utils.atomic), one packed already
                with contextlib.suppress(FileNotFoundError):
                    archive.add(file, arcname=f"{self.drawings.name}/{file.name}")
                    new.append(file.name)
        with open(self.progress, "rb") as source:
            source.seek(self._progress_packed)
            piece = tarfile.TarInfo(self.progress.name)
            piece.size, piece.mtime = size - self._progress_packed, int(time.time())
            archive.addfile(piece, source)
        self._packed.update(new)
        self._progress_packed = size
        return archive.offset

    def advance(self, images: int) -> None:
        """Count *images* done; save every SAVE_EVERY."""
        self._since_save += images
        if self._since_save >= SAVE_EVERY:
            self.save()

    def clear(self) -> None:
        """The outputs are written: an empty checkpoint, what the workflow starts a job with (a checkpoint a pool
        transfers must exist when the job exits)."""
        write_bytes(self.path, b"")


def _whole_members(archive: tarfile.TarFile, size: int) -> list[tarfile.TarInfo]:
    """The members of *archive* (a file of *size* bytes) up to the first one cut short or unreadable: the end of a
    save that a kill stopped while it appended (PredictionCheckpoint.save); the last whole save is before it."""
    members = []
    while True:
        try:
            member = archive.next()
        except tarfile.ReadError:
            if not members:
                raise
            return members
        if member is None or member.offset_data + member.size > size:
            return members
        members.append(member)
