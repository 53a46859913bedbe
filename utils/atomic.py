"""Atomic writes: a reader sees the old file or the new one, never half of one.

Every output is written to a temporary file in the target's folder (same file
system, so os.replace is atomic) and renamed over the target once complete.
Files that belong together (a job's outputs) are written as one set
(atomic_files): all renamed at the end, or none.
The file gets the mode a plain open() would give it (0666 less the umask), not
mkstemp's 0600: the next job of a workflow may run as another user (Apptainer on
shared storage, a container started with --user) and must be able to read it.
A temporary file is flock'ed by its writer while in use; a killed writer's (SIGKILL, out of memory) is unlocked,
and the next write of its target removes it (_remove_leftovers). On NFS flock is fcntl's lock, the process's, and
goes when the writer closes any descriptor of the file (a library's save): two processes writing one target at
once may then remove the other's file, whose rename fails naming the target (one of the two writes is lost anyway).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
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


def _temporary_beside(target: Path) -> Path:
    """A new empty file next to *target* (the same file system, so os.replace is atomic), named after it.

    The temporary name keeps the target's suffix so that libraries choosing a
    format from the extension (matplotlib, PIL, torch, OpenCV) still do the right thing.
    """
    if target.is_dir():  # else the error named the temporary file, a name the user never gave
        raise IsADirectoryError(errno.EISDIR, "a folder, not a file to write", str(target))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a file where a folder of the path should be
        blocking = next((folder for folder in reversed(target.parents) if folder.exists() and not folder.is_dir()),
                        target.parent)
        raise NotADirectoryError(errno.ENOTDIR, f"a file, not a folder to write {target.name} in",
                                 str(blocking)) from None
    while True:
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent)
        except PermissionError as error:  # a folder the job may not write in: named, not the temporary file's name
            raise PermissionError(error.errno, f"cannot write {target.name} here ({error.strerror})",
                                  str(target.parent)) from None
        with contextlib.suppress(OSError):  # a file system without flock (Lustre without -o flock): no lock, and
            fcntl.flock(fd, fcntl.LOCK_EX)  # no sweep either, whose own flock fails alike; a new file: no wait
        with contextlib.suppress(FileNotFoundError):
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:  # not removed by another's sweep before the lock
                break
        os.close(fd)
    _held[os.path.abspath(tmp)] = fd
    follow_umask(tmp)
    _remove_leftovers(target)
    return Path(tmp)


_held: dict[str, int] = {}  # this process's temporary files (absolute paths) -> the descriptor holding each one's lock


def _release(tmp: Path) -> None:
    """*tmp* was renamed or removed: its lock goes."""
    fd = _held.pop(os.path.abspath(tmp), None)
    if fd is not None:
        os.close(fd)


def _remove_leftovers(target: Path) -> None:
    """Remove the temporary files of *target* that no process holds: those of a killed writer (SIGKILL, out of
    memory, a lost machine), which nothing else removes; a long video's left-over annotated video was gigabytes,
    and each kill left another. A folder is listed once per process, at its first write (_leftovers_in): listed at
    every write, a folder of 20,000 annotated images cost each write 18 ms, and 100k images hours."""
    for name in _leftovers_in(target.parent).pop(target.name, ()):
        path = target.parent / name
        if os.path.abspath(path) in _held:  # this process's own: on NFS flock is fcntl's lock, the process's, and
            continue                        # its own lock would not refuse it
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:  # shared: NFS refuses an exclusive lock through a read-only descriptor (EBADF), and swept nothing
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # refused: its writer, whose lock is exclusive, is alive
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        except OSError:
            pass
        finally:
            os.close(fd)


# mkstemp's name for a temporary file of "<stem><suffix>": "." + stem + "." + 8 random characters + ".tmp" + suffix
# (DOTALL: a name may hold a line break)
_TEMPORARY_NAME = re.compile(r"\.(?P<stem>.+)\.[a-z0-9_]{8}\.tmp(?P<suffix>(\.[^.]*)?)", re.DOTALL)
_listed: dict[str, dict[str, list[str]]] = {}  # folder -> {target's name: its temporary files when first listed}


def _leftovers_in(folder: Path) -> dict[str, list[str]]:
    """{target's name: the names of its temporary files} in *folder*, as listed at this process's first write there
    (a writer killed later leaves its file to the next process that writes the target)."""
    key = os.path.abspath(folder)  # a relative name means another folder after a chdir
    if key not in _listed:
        found: dict[str, list[str]] = {}
        with contextlib.suppress(OSError), os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith(".") and (match := _TEMPORARY_NAME.fullmatch(entry.name)):
                    found.setdefault(match["stem"] + match["suffix"], []).append(entry.name)
        _listed[key] = found
    return _listed[key]


# What a failed write through an open file raises with no file name: a full disk or quota, a file too large, a
# read-only file system, an I/O error.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike):
    """Yield a temporary path next to *target*; rename it onto *target* on success."""
    target = Path(target)
    tmp = _temporary_beside(target)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _raise_naming_the_target(error, tmp, target)
        raise
    finally:
        _release(tmp)


def _raise_naming_the_target(error: BaseException, tmp: Path, target: Path) -> None:
    """A write through an open file names no file (a full disk: '[Errno 28] No space left on device'), and one
    through the temporary path names a file the user never gave: raised again naming the target. Other errors in
    the block (reading an input, starting a process) are not about the target: left as they are."""
    if isinstance(error, OSError) and (error.filename == str(tmp) or (
            error.filename is None and error.errno in WRITE_ERRNOS)):
        raise OSError(error.errno, f"cannot write {target.name} ({error.strerror}); the file there, if any, "
                                   "is as it was", str(target)) from error


def write_bytes(target, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        Path(tmp).write_bytes(data)
    return Path(target)


def write_text(target, text: str) -> Path:
    with atomic_path(target) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(target)


def finite(obj):
    """*obj* with every NaN and infinity (as deep as they sit in dicts, lists and tuples) as None, what the outputs
    write for a figure that is undefined: JSON has no such numbers. Python's json writes them as NaN and Infinity,
    which JSON.parse (the service's page), jq and every strict reader refuse: the whole file lost over one figure."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(value) for value in obj]
    return obj


def json_text(obj, indent: int = 2) -> str:
    """The text of the JSON files the jobs write: strict JSON, a NaN or infinity written as null (finite)."""
    try:
        return json.dumps(obj, indent=indent, sort_keys=False, default=str, allow_nan=False) + "\n"
    except ValueError:  # a NaN or infinity somewhere: the walk that replaces them costs only then
        return json.dumps(finite(obj), indent=indent, sort_keys=False, default=str, allow_nan=False) + "\n"


def dump_json(obj, path, indent: int = 2) -> None:
    """json_text's text written to *path* as it is encoded: json.dumps with an indent joins a list of every piece
    of the text, which held ~3.5 times the records in memory for a predictions file of 100k images."""
    with open(path, "w", encoding="utf-8") as handle:
        try:
            json.dump(obj, handle, indent=indent, sort_keys=False, default=str, allow_nan=False)
        except ValueError:  # a NaN or infinity somewhere (json_text): written again from the start, as null
            handle.seek(0)
            handle.truncate()
            json.dump(finite(obj), handle, indent=indent, sort_keys=False, default=str, allow_nan=False)
        handle.write("\n")


def write_json(target, obj, indent: int = 2) -> Path:
    with atomic_path(target) as tmp:
        dump_json(obj, tmp, indent)
    return Path(target)


class FileSet:
    """Files that belong together (a job's outputs): each is written at a temporary path beside its target
    (:meth:`path`), and atomic_files renames them all onto their targets at the end, or removes them all."""

    def __init__(self):
        self._temporaries: dict[Path, Path] = {}  # target -> its temporary file, in the order asked for

    def path(self, target) -> Path:
        """The temporary path to write *target* at, written as it is (not through atomic_path: a temporary name
        of a temporary name could pass the file system's limit, TEMP_NAME_EXTRA)."""
        target = Path(target)
        self.drop(target)
        self._temporaries[target] = _temporary_beside(target)
        return self._temporaries[target]

    @contextlib.contextmanager
    def writing(self, target):
        """:meth:`path` for a block that writes it: a failed write (a full disk) names *target*, as atomic_path's."""
        tmp = self.path(target)
        with self.naming(target):
            yield tmp

    @contextlib.contextmanager
    def naming(self, target):
        """A block that writes the file :meth:`path` gave for *target* (a file written a piece at a time between
        other work, whose own errors must not be taken for its): a failed write names *target*."""
        target = Path(target)
        try:
            yield
        except BaseException as error:
            _raise_naming_the_target(error, self._temporaries.get(target), target)
            raise

    def drop(self, target) -> None:
        """Leave *target* out of the set: its temporary file goes, and the file at *target* stays as it was."""
        tmp = self._temporaries.pop(Path(target), None)
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            _release(tmp)

    def _discard(self) -> None:
        for target in list(self._temporaries):
            self.drop(target)

    def _commit(self) -> None:
        from .stop import deferred_signals

        with deferred_signals():  # a stop request, or a second Ctrl-C, waits until the last file is in place
            try:
                for target, tmp in list(self._temporaries.items()):
                    os.replace(tmp, target)
                    del self._temporaries[target]
                    _release(tmp)
            finally:
                self._discard()  # after a rename that failed: the temporaries not renamed


@contextlib.contextmanager
def atomic_files():
    """Yield a FileSet. When the block ends, each of its files is renamed onto its target, with SIGINT and
    SIGTERM held off until the last one is (utils.stop.deferred_signals); when it raises (a second Ctrl-C
    while the files are made), they are all removed. So a job stopped at any signal leaves the last run's set
    or its own complete set, never some of each (short of a SIGKILL in the instant of the renames, or a
    rename that fails: a target turned into a folder)."""
    files = FileSet()
    try:
        yield files
    except BaseException:
        files._discard()
        raise
    files._commit()


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
