"""A predict job's progress as one file (bin/predict.py --checkpoint): the progress file and its folder of drawings
(prediction_progress.py) packed in a .tar, which a pool carries from a stopped try to the next.

On a pool a job's progress file is in its try's sandbox, which the retry does not get back: a predict job over a
shard of 1000 photos (--images-per-job), evicted or stopped at its time limit near the end, read them all again.
Pegasus hands a job's checkpoint files (Job.add_checkpoint) from one try to the next, one file each, so the
workflow declares this one for every predict job, as it declares train's checkpoint.

The job restores it before it starts when its output folder holds no progress file (a new sandbox); where one is
there (a rerun in the same folder, the local executor's), that one is at least as new as the .tar packed from it
and is used as it is. It saves it every SAVE_EVERY images and when it stops (SIGTERM, Ctrl-C, an error), each time
atomically (a kill while it is written leaves the last one), and empties it once its outputs are written: nothing
is left to resume. What it holds is checked as the progress file always is (its key: the model, settings and
inputs; whole batches whose drawings are all there), so a .tar of another run resumes nothing. A file that is not
such a .tar (a stand-in, a damaged file) is said in one line, and the run starts afresh.
"""

from __future__ import annotations

import contextlib
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from ..atomic import atomic_path, write_bytes

SAVE_EVERY = 100  # images: what a kill with no time to save (SIGKILL) loses at most, against a pack per save


class PredictionCheckpoint:
    """The checkpoint .tar *path* of the progress file *progress* (and its drawings folder beside it)."""

    def __init__(self, path, progress: Path):
        self.path = Path(path)
        self.progress = Path(progress)
        self.drawings = self.progress.with_suffix(".annotated")  # as PredictionProgress names it
        self._since_save = 0

    def restore(self) -> str | None:
        """Unpack the checkpoint into the output folder when no progress file is there; returns what was done,
        for a line, or None when there was nothing to do (no checkpoint, an empty one, a progress file there)."""
        if self.progress.exists() or not self.path.is_file() or self.path.stat().st_size == 0:
            return None
        try:
            with tarfile.open(self.path, "r:") as archive:
                members = archive.getmembers()
                if problem := self._problem(members):
                    return f"{self.path.name}: {problem}; starting afresh"
                shutil.rmtree(self.drawings, ignore_errors=True)
                self.drawings.mkdir(parents=True)
                # the drawings first, the progress file last: a kill in between leaves no progress file, and the
                # next try restores again
                for member in sorted(members, key=lambda member: member.name == self.progress.name):
                    if member.isfile():
                        with archive.extractfile(member) as source, atomic_path(
                                self.progress.parent / member.name) as tmp, open(tmp, "wb") as target:
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
        """Pack the progress file and the drawings done into the checkpoint, atomically; the checkpoint is left as
        it is when there is no progress file (a try that stopped before it began: the last one is still good)."""
        self._since_save = 0
        if not self.progress.is_file():
            return
        with atomic_path(self.path) as tmp, tarfile.open(tmp, "w") as archive:
            archive.add(self.progress, arcname=self.progress.name)
            if self.drawings.is_dir():
                archive.add(self.drawings, arcname=self.drawings.name, recursive=False)
                for file in sorted(self.drawings.iterdir()):
                    if file.name.startswith(".") or not file.is_file():  # a drawing being written (utils.atomic)
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        archive.add(file, arcname=f"{self.drawings.name}/{file.name}")

    def advance(self, images: int) -> None:
        """Count *images* done; save every SAVE_EVERY."""
        self._since_save += images
        if self._since_save >= SAVE_EVERY:
            self.save()

    def clear(self) -> None:
        """The outputs are written: an empty checkpoint, what the workflow starts a job with (a checkpoint a pool
        transfers must exist when the job exits)."""
        write_bytes(self.path, b"")
