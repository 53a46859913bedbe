"""SIGTERM as a request to stop at the next safe point: train and hpo (a training step, then their checkpoint),
preprocess and augment (an image, the partial set removed), predict (an image, its progress file kept for the
rerun) and predict_video (a frame, the outputs written for the frames done).

A pool sends SIGTERM before it kills: HTCondor when it evicts a job, pegasus-kickstart
at the job's ``checkpoint.time``. The default action would kill the process mid-step.
Instead the handler only records the request; the training loop checks it after every
step (and before every epoch) and raises :class:`StopRequested`, abandoning the partial
epoch: the checkpoint on disk (written atomically after every finished epoch) is what a
retry resumes from. ``utils.cli.run_job`` turns the exception into one line and exit
code 143 (128 + SIGTERM, what a shell reports for a SIGTERM'd process), so DAGMan or
the local executor retries the job.

Before that exit, every output the job declared (:func:`declare_outputs`) that is not
there yet gets a small *stand-in*: a JSON note that the try stopped before writing it.
On a pool the job's outputs are in HTCondor's ``transfer_output_files`` (condorio), and
a listed file missing at exit puts the job on hold (in production mode it is removed
after 30 minutes, and only then retried); with every file present the exit is a plain
failure that DAGMan retries at once. No later job reads a stand-in (a failed job has no
children running), the retry overwrites it, and ``is_stand_in`` lets a loader refuse
one with a clear message. A declared checkpoint that is missing becomes an empty file,
which train and hpo read as "no checkpoint yet".
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from pathlib import Path

from .errors import InputError, library_problem, not_readable, require_file

EXIT_STOPPED = 128 + signal.SIGTERM

_requested = threading.Event()
_declared: dict[Path, bool] = {}  # output -> is a checkpoint (stand-in: an empty file)
STAND_IN_KEY = "stand_in_for"


class StopRequested(Exception):
    """SIGTERM arrived: the job stopped at a safe point; its checkpoint is what a retry resumes from."""


def _on_sigterm(signum, frame) -> None:
    _requested.set()


def stop_on_sigterm() -> None:
    """From now on, SIGTERM requests a stop instead of killing the process (main thread only). A job calls it
    first: the outputs declared afterwards are this job's alone (jobs run in one process, as the tests run them,
    must not get stand-ins for another job's files, e.g. a checkpoint.pt in the working folder). utils.cli.run_job
    puts the handler found before back when a job that another program runs in-process ends (handlers_as_found)."""
    _requested.clear()
    _declared.clear()
    signal.signal(signal.SIGTERM, _on_sigterm)


@contextlib.contextmanager
def handlers_as_found(signums=(signal.SIGINT, signal.SIGTERM)):
    """After the block, the handlers of *signums* as they were before it: a job sets its own (stop_on_sigterm,
    predict_video's Ctrl-C), which left a process that runs jobs in-process (an embedding program, tests) unable to
    be ended by SIGTERM once the job was done. A handler set outside Python (None) cannot be put back; outside the
    main thread no job could change one, so none is set there."""
    held = {signum: handler for signum in signums if (handler := signal.getsignal(signum)) is not None}
    try:
        yield
    finally:
        for signum, handler in held.items():
            if signal.getsignal(signum) is not handler:
                signal.signal(signum, handler)


def stop_requested() -> bool:
    return _requested.is_set()


@contextlib.contextmanager
def deferred_signals(signums=(signal.SIGINT, signal.SIGTERM)):
    """SIGINT and SIGTERM that arrive in the block reach their handlers when it ends, so that neither a stop
    request nor a second Ctrl-C's KeyboardInterrupt falls between steps that must all happen: the renames of a
    set of outputs (utils.atomic.atomic_files). Python runs signal handlers in the main thread only (blocking the
    signal there would not do: another thread may take it), so in another thread the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    # None: a handler set outside Python, which signal.signal could not put back
    held = {signum: handler for signum in signums if (handler := signal.getsignal(signum)) is not None}
    for signum in held:
        signal.signal(signum, lambda number, frame: arrived.append(number))
    try:
        yield
    finally:
        for signum, handler in held.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(arrived):
            signal.raise_signal(signum)  # to the handler held off: it runs now, in this thread


def check_stop(what: str) -> None:
    """Raise StopRequested, saying *what* was abandoned, once SIGTERM has arrived."""
    if _requested.is_set():
        raise StopRequested(f"SIGTERM received; {what}")


def declare_outputs(*paths, checkpoints=()) -> None:
    """The files this job promises; on a stopped exit the missing ones get stand-ins (see above)."""
    _declared.update({Path(p): False for p in paths if p is not None})
    _declared.update({Path(p): True for p in checkpoints if p is not None})


def write_stand_ins(job: str, reason: str) -> list[Path]:
    """Write a stand-in for every declared output that does not exist; returns them."""
    from .atomic import write_bytes

    written = []
    for path, is_checkpoint in _declared.items():
        if path.exists():
            continue
        note = {STAND_IN_KEY: path.name, "job": job, "reason": reason,
                "note": f"{job} stopped before writing {path.name}; the retry of the job writes the real file"}
        write_bytes(path, b"" if is_checkpoint else (json.dumps(note) + "\n").encode())
        written.append(path)
    return written


STAND_IN_HEAD = b'{"' + STAND_IN_KEY.encode()  # how the JSON of every stand-in begins


def is_stand_in(path) -> bool:
    """True for a file written by :func:`write_stand_ins` in place of a real output."""
    try:
        with open(path, "rb") as handle:
            return handle.read(len(STAND_IN_HEAD)) == STAND_IN_HEAD
    except OSError:
        return False


def require_job_output(path, what: str, error: type[InputError] = InputError) -> None:
    """*error* naming *path* unless it is a file a job finished writing: missing or not a file
    (errors.require_file), unreadable (the OSError opening or reading it gives), or a stand-in a stopped try left
    in its place. The loader's checks that need no torch (model_file.torch_load makes them first), so that a job
    makes them before it imports torch, in the loader's words."""
    require_file(path, what, error)
    try:
        with open(path, "rb") as handle:  # one open for both checks
            head = handle.read(len(STAND_IN_HEAD))
    except OSError as problem:  # no read permission: the error torch.load's own open(path, "rb") would raise
        raise not_readable(path, what, library_problem(problem), error) from None
    if head == STAND_IN_HEAD:
        raise error(f"{path}: a stand-in, not a {what}: the job that writes it was stopped (SIGTERM) before it "
                    "finished; rerun that job")
