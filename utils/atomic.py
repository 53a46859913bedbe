"""Atomic writes: a reader sees the old file or the new one, never half of one.

Every output is written to a temporary file in the target's folder (same file
system, so os.replace is atomic) and renamed over the target once complete.
The file gets the mode a plain open() would give it (0666 less the umask), not
mkstemp's 0600: the next job of a workflow may run as another user (Apptainer on
shared storage, a container started with --user) and must be able to read it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process umask, read from /proc where Linux has it (changing it, even briefly, is not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike, folder: bool = False) -> None:
    """Give *path* the mode open() or mkdir() would have given it (mkstemp and mkdtemp make it private)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


# What atomic_path's temporary name adds to a file name: "." + stem + "." + mkstemp's 8 random characters + ".tmp"
# + suffix; a job whose output names are near the file system's limit checks them with it before it works.
TEMP_NAME_EXTRA = len(".") + len(".") + 8 + len(".tmp")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike):
    """Yield a temporary path next to *target*; rename it onto *target* on success.

    The temporary name keeps the target's suffix so that libraries choosing a
    format from the extension (matplotlib, PIL, torch) still do the right thing.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    follow_umask(tmp)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(target, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        Path(tmp).write_bytes(data)
    return Path(target)


def write_text(target, text: str) -> Path:
    with atomic_path(target) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(target)


def write_json(target, obj, indent: int = 2) -> Path:
    return write_text(target, json.dumps(obj, indent=indent, sort_keys=False, default=str) + "\n")


def replace_folder(staged, target) -> Path:
    """Put the complete folder *staged* (in *target*'s folder, so on the same file system) at *target*, replacing
    the folder there: the old one is renamed aside, the new one renamed in, then the old one removed.

    A reader sees the old folder or the new one (for a moment between the two renames, none), never a mix of
    both; a job killed in that moment leaves no folder at *target* and the old one in a hidden
    ``.<name>.old.*`` folder beside it.
    """
    staged, target = Path(staged), Path(target)
    aside = None
    if target.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, aside / target.name)
    try:
        os.replace(staged, target)
    except BaseException:
        if aside is not None:
            os.replace(aside / target.name, target)
            aside.rmdir()
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return target
