"""Writing files: atomic_path and atomic_files (a set renamed in together or not at all, a signal waiting for its
renames), and the writers that stream their text instead of holding it (write_json, write_pairs_csv)."""

from __future__ import annotations

import pytest

from utils.atomic import atomic_path, write_json
from utils.data.pairs import read_pairs_csv, write_pairs_csv


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = write_json(tmp_path / "out.json", {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text().strip().startswith("{") and list(tmp_path.iterdir()) == [target]


def test_a_file_set_is_renamed_in_together_or_not_at_all_and_a_signal_waits_for_its_renames(tmp_path,
                                                                                              monkeypatch):
    import os
    import signal

    from utils.atomic import atomic_files

    targets = [tmp_path / "a.csv", tmp_path / "b.json", tmp_path / "c.png"]
    for target in targets:
        target.write_text("old")
    with pytest.raises(RuntimeError):  # an error (or a second Ctrl-C) while the set is made: none goes in
        with atomic_files() as files:
            for target in targets:
                files.path(target).write_text("new")
            raise RuntimeError("stopped")
    assert [t.read_text() for t in targets] == ["old"] * 3 and sorted(tmp_path.iterdir()) == targets
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises KeyboardInterrupt (the autouse
    replace, renamed = os.replace, []  # fixture puts the handler back)

    def replace_after_ctrl_c(source, target):
        if not renamed:
            os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C after the first rename began
        replace(source, target)
        renamed.append(target)

    monkeypatch.setattr(os, "replace", replace_after_ctrl_c)
    with pytest.raises(KeyboardInterrupt):  # delivered once the last file is in
        with atomic_files() as files:
            for target in targets:
                files.path(target).write_text("new")
            files.drop(targets[2])  # left out: stays as it was
    assert len(renamed) == 2 and [t.read_text() for t in targets] == ["new", "new", "old"]
    assert sorted(tmp_path.iterdir()) == targets


def test_write_json_streams_the_text_instead_of_holding_it(tmp_path):
    # json.dumps with an indent joins a list of every piece of the text: ~6.6 times the file, held at once.
    import json
    import tracemalloc

    records = [{"file": f"photos/{k}.jpg", "detections": [{"box": [1.25, 2.5, 3.75, 4.0], "score": 0.91}] * 3}
               for k in range(5000)]
    tracemalloc.start()
    write_json(tmp_path / "p.json", {"images": records})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < (tmp_path / "p.json").stat().st_size / 4
    assert json.loads((tmp_path / "p.json").read_text()) == {"images": records}


def test_write_pairs_csv_streams_its_rows_instead_of_holding_the_text(tmp_path):
    # split.csv and clean_manifest.csv were rendered whole in a StringIO and copied out of it (getvalue) before
    # the write: about 2.7 times the file held at once, ~30-60 MB at 100k rows.
    import tracemalloc

    def rows(n):  # made as they are written: only the writer's own memory is measured (text: Path has a cache)
        return ({"image": f"/data/set/images/photo_{k:06d}.jpg", "annotation": f"/data/set/annotations/"
                 f"photo_{k:06d}.xml", "split": "train"} for k in range(n))

    peaks, sizes = {}, {}
    for n in (2000, 8000):
        path = tmp_path / f"split_{n}.csv"
        tracemalloc.start()
        write_pairs_csv(path, rows(n), ("image", "annotation", "split"))
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        sizes[n] = path.stat().st_size
        assert read_pairs_csv(path)[-1].image.name == f"photo_{n - 1:06d}.jpg"
    per_row = (peaks[8000] - peaks[2000]) / 6000
    assert per_row < 5, f"{per_row:.0f} bytes a row; rows are {sizes[8000] / 8000:.0f} bytes"  # the old code: 212


def test_a_killed_writers_temporary_file_goes_at_the_next_write_and_a_live_writers_stays(tmp_path):
    """A SIGKILL (or the out-of-memory killer) mid-write left the temporary file for good: predict_video's
    annotated video and CSV of a long video (gigabytes), another pair at each kill. The next write of the target
    removes those no live process holds."""
    import subprocess
    import sys

    from utils.atomic import atomic_files, write_text

    target = tmp_path / "a.mp4"
    killed = ("import os, sys\nfrom utils.atomic import atomic_files\nwith atomic_files() as files:\n"
              "    files.path(sys.argv[1]).write_bytes(b'frames')\n    os._exit(9)\n")
    assert subprocess.run([sys.executable, "-c", killed, str(target)]).returncode == 9
    (left,) = [path for path in tmp_path.iterdir() if path.name.startswith(".a.")]
    other = tmp_path / ".ab.12345678.tmp.mp4"  # another target's name, not a.mp4's
    other.write_bytes(b"")
    with atomic_files() as files:  # a live writer of the same target (this process) keeps its own
        mine = files.path(target)
        mine.write_bytes(b"live")
        assert not left.exists()
        write = "import sys\nfrom utils.atomic import write_text\nwrite_text(sys.argv[1], 'other')\n"
        subprocess.run([sys.executable, "-c", write, str(target)], check=True)
        assert mine.read_bytes() == b"live"
    assert target.read_bytes() == b"live" and other.exists()
    write_text(target, "again")
    assert sorted(path.name for path in tmp_path.iterdir()) == [other.name, "a.mp4"]


def test_a_folder_is_listed_for_leftovers_once_per_process_not_at_every_write(tmp_path, monkeypatch):
    """Listed at every write, a folder of 20,000 annotated images cost each write 18 ms (predict on 100k photos:
    hours); a killed writer's leftover is still removed, at the first write into the folder."""
    import os
    from pathlib import Path

    from utils import atomic
    from utils.atomic import write_text

    left = tmp_path / ".b.abcd1234.tmp.txt"  # a killed writer's temporary file of b.txt
    left.write_text("half")
    listings, scandir = [], os.scandir
    monkeypatch.setattr(atomic.os, "scandir", lambda path=".": listings.append(Path(path)) or scandir(path))
    for index in range(30):
        write_text(tmp_path / f"{index}.txt", "x")
    write_text(tmp_path / "b.txt", "whole")
    assert listings.count(tmp_path) == 1 and not left.exists() and (tmp_path / "b.txt").read_text() == "whole"


def test_without_flock_writes_go_on_and_no_temporary_file_is_removed(tmp_path, monkeypatch):
    """A file system without flock (Lustre mounted without it answers ENOSYS): the writes must not fail, and as
    no writer can be told alive, nothing is swept."""
    import errno
    import fcntl

    from utils.atomic import write_text

    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    other = tmp_path / ".c.abcd1234.tmp.txt"
    other.write_text("maybe live")
    write_text(tmp_path / "c.txt", "whole")
    assert (tmp_path / "c.txt").read_text() == "whole" and other.exists()


def test_on_nfs_a_killed_writers_leftover_goes_and_this_processs_own_stays(tmp_path, monkeypatch):
    """NFS makes flock fcntl's lock (fcntl.lockf here, as the kernel does): an exclusive lock needs a descriptor open
    for writing, so the sweep's exclusive lock through a read-only one failed (EBADF) and nothing was ever removed;
    and a process's own lock does not refuse it, so its own live temporary file (a relative target: mkstemp names
    it absolute) must be told apart by name."""
    import fcntl
    import subprocess
    import sys

    from utils.atomic import atomic_files

    monkeypatch.setattr(fcntl, "flock", fcntl.lockf)
    monkeypatch.chdir(tmp_path)
    left = tmp_path / ".a.abcd1234.tmp.mp4"  # a killed writer's: no process holds it
    left.write_bytes(b"half")
    with atomic_files() as files:
        mine = files.path("a.mp4")
        assert mine.exists() and not left.exists()
        write = ("import fcntl, sys\nfcntl.flock = fcntl.lockf\nfrom utils.atomic import write_text\n"
                 "write_text(sys.argv[1], 'other')\n")  # a live writer of the target in another process keeps it
        subprocess.run([sys.executable, "-c", write, str(tmp_path / "a.mp4")], check=True)
        assert mine.exists()
        mine.write_bytes(b"live")
    assert (tmp_path / "a.mp4").read_bytes() == b"live" and [p.name for p in tmp_path.iterdir()] == ["a.mp4"]


def test_a_leftover_is_found_whatever_its_name_holds_and_after_a_chdir(tmp_path, monkeypatch):
    """A line break in the name (a folder or photo name from the user's data) was not matched, and the folders
    were remembered by their relative names: after a chdir, "." meant the folder listed before."""
    from utils.atomic import write_text

    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    newline = second / ".a\nb.abcd1234.tmp.txt"
    relative = second / ".c.abcd1234.tmp.txt"
    for left in (newline, relative):
        left.write_text("half")
    write_text(second / "a\nb.txt", "whole")
    monkeypatch.chdir(first)
    write_text("x.txt", "x")
    monkeypatch.chdir(second)
    write_text("c.txt", "whole")
    assert sorted(path.name for path in second.iterdir()) == ["a\nb.txt", "c.txt"]


def test_json_outputs_are_strict_json_an_undefined_number_written_as_null(tmp_path):
    """Python's json wrote NaN and Infinity, which JSON.parse, jq and every strict reader refuse: one undefined figure
    (a NaN loss, a share of no faces) made a job's whole evaluation.json or compliance.json unreadable there."""
    import json
    import math

    from utils.atomic import dump_json, json_text

    nan, inf = float("nan"), float("inf")
    data = {"percent": nan, "low": inf, "rows": [1.5, -inf, {"x": (nan, 2)}], "name": "NaN", "count": 3}
    expected = {"percent": None, "low": None, "rows": [1.5, None, {"x": [None, 2]}], "name": "NaN", "count": 3}

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    write_json(tmp_path / "a.json", data)
    assert json.loads((tmp_path / "a.json").read_text(encoding="utf-8"), parse_constant=refuse) == expected
    assert json.loads(json_text(data), parse_constant=refuse) == expected
    assert json_text({"a": [1.25]}) == json.dumps({"a": [1.25]}, indent=2) + "\n"  # finite figures as they were
    dump_json({"a": 0.5}, tmp_path / "b.json")
    assert (tmp_path / "b.json").read_text(encoding="utf-8") == '{\n  "a": 0.5\n}\n'
    assert math.isnan(data["percent"])  # the caller's data is left as it was
