"""The one base class of every "bad input" error in the project.

A job that meets bad input (an unreadable file, a malformed annotation, a model
file of another kind, a flag out of range) raises a subclass of InputError whose
message names the file or flag and the problem in one line. The shared job
runner (utils.cli.run_job) turns it into exit code 2 and that one line, never a
traceback; anything else is a bug and exits 1.
"""


import math
import re


class InputError(ValueError):
    """Bad input or arguments, described in one line that names the file (or flag) and the problem."""


# scheme://user:password@host: the password of a camera's or stream's URL (rtsp://admin:secret@10.0.0.5/live)
# (up to the authority's last @: a password often holds an unencoded @, which ffmpeg accepts)
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@\"']*):[^\s/\"']*@")


def without_password(text: str) -> str:
    """*text* with the password of any URL in it replaced by ***, for every line, file and message that shows
    it: the args line, logs and run records are read and kept by others than the camera's owner."""
    return _URL_PASSWORD.sub(r"\g<head>:***@", text)


def is_finite_number(value) -> bool:
    """Whether a value read from JSON is a number (not a bool) that is finite as a float: NaN, infinities and
    integers too large for a float (json reads up to 4,300 digits; math.isfinite raises OverflowError) are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def require_file(path, what: str, error: type[InputError] = InputError) -> None:
    """*error* "<path>: <what> not found" unless *path* is a file, "<path>: a folder, not a <what>" (or "a special
    file": a FIFO, a device) where something else is there: the check of a file a job loads, made before the job
    imports the library that reads it (bin/serve.py refuses a missing model before torch's seconds)."""
    from pathlib import Path

    given = Path(path)
    if given.is_file():
        return
    if given.exists():  # "not found" would send the user looking for what is there
        raise error(f"{path}: a {'folder' if given.is_dir() else 'special file'}, not a {what}")
    raise error(f"{path}: {what} not found")


def not_readable(path, what: str, problem: str, error: type[InputError] = InputError) -> InputError:
    """*error* "<path>: not a readable <what> (<problem>)": a file a job loads that it cannot read, in the same words
    whether the check before the library's import (utils.stop.require_job_output) or the library found it."""
    return error(f"{path}: not a readable {what} ({problem})")


def set_paths(given) -> list:
    """A set flag's value (one path, or a list of several .tar shards) as a list of Paths."""
    from pathlib import Path

    return [Path(p) for p in given] if isinstance(given, (list, tuple)) else [Path(given)]


def require_set(path) -> str:
    """How a set flag's *path* is read: "folder", "tar" (one archive) or "shards" (a list of several .tar shards of
    one set); a missing path, or one of another kind, raises the one line naming it. utils.data.pairs.open_folder
    reads a set so; a job makes this check (a stat, a .tar's first header) before it imports torch."""
    import tarfile

    paths = set_paths(path)
    if len(paths) > 1:
        missing = [p for p in paths if not p.exists()]  # a mistyped shard name, said as a missing set is
        if missing:
            raise FileNotFoundError(f"{missing[0]}: does not exist (expected a .tar shard)")
        not_tar = [p for p in paths if not (p.is_file() and tarfile.is_tarfile(p))]
        if not_tar:
            raise InputError(f"{not_tar[0]}: several inputs must all be .tar shards")
        return "shards"
    if paths[0].is_dir():
        return "folder"
    if paths[0].is_file() and tarfile.is_tarfile(paths[0]):
        return "tar"
    if not paths[0].exists():
        raise FileNotFoundError(f"{paths[0]}: does not exist (expected a folder or a .tar archive)")
    raise NotADirectoryError(f"{paths[0]}: neither a folder nor a .tar archive")


def read_json(path, what: str, error: type[InputError] = InputError):
    """The JSON document in *path*; a missing, undecodable or malformed file raises *error*
    with one line naming the file and *what* it should have been (e.g. "HPO result")."""
    import json
    from pathlib import Path

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except ValueError as problem:  # JSONDecodeError, UnicodeDecodeError, and an integer over Python's 4300 digits
        raise error(f"{path}: {what} is not valid JSON ({problem})") from None
    except RecursionError:  # json's decoder recurses once per [ or {: a file can nest deeper than Python's stack
        raise error(f"{path}: {what} is nested too deeply to read") from None


def library_problem(error: BaseException, limit: int = 200) -> str:
    """"Type: problem" of a library's exception, for a one-line message: its first line up to the end of
    its first sentence, at most *limit* characters. torch.load's errors go on after the problem with advice
    ("This is an internal miniz error. If you are seeing this error, there is a high likelihood that your
    checkpoint file is corrupted...") that a fixed cut left ending mid-sentence."""
    line = (str(error).strip().splitlines() or [""])[0]
    sentence = re.split(r"(?<=[a-z0-9)]\.)\s+(?=[A-Z])", line, maxsplit=1)[0].rstrip(".")
    text = sentence if len(sentence) <= limit else sentence[:limit - 3] + "..."
    return f"{type(error).__name__}: {text}"


def shown(value, limit: int | None = None) -> str:
    """*value*'s repr for an error message, bounded: at most *limit* characters (default
    defaults.MESSAGE_VALUE_CHARS), built without walking more than a few items and levels,
    because a value read from a user can be huge (a YAML alias bomb expands to billions of items)."""
    import reprlib

    from .defaults import MESSAGE_VALUE_CHARS

    limit = limit or MESSAGE_VALUE_CHARS
    class BoundedRepr(reprlib.Repr):
        def repr_int(self, x, level):  # an integer over Python's 4300 digits has no repr: say its size
            try:
                return super().repr_int(x, level)
            except ValueError:
                return f"<an integer of {len(hex(x)) - 2} hex digits>"

    bounded = BoundedRepr()  # attributes, not keywords: Python 3.11's Repr takes none
    bounded.maxlevel = 3
    bounded.maxtuple = bounded.maxlist = bounded.maxarray = bounded.maxdict = 4
    bounded.maxset = bounded.maxfrozenset = bounded.maxdeque = 4
    bounded.maxstring = bounded.maxlong = bounded.maxother = limit
    text = bounded.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
