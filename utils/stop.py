"""SIGTERM as a request to stop at the next safe point, for the jobs that checkpoint (train, hpo).

A pool sends SIGTERM before it kills: HTCondor when it evicts a job, pegasus-kickstart
at the job's ``checkpoint.time``. The default action would kill the process mid-step.
Instead the handler only records the request; the training loop checks it after every
step (and before every epoch) and raises :class:`StopRequested`, abandoning the partial
epoch: the checkpoint on disk (written atomically after every finished epoch) is what a
retry resumes from. ``utils.cli.run_job`` turns the exception into one line and exit
code 143 (128 + SIGTERM, what a shell reports for a SIGTERM'd process), so DAGMan or
the local executor retries the job.
"""

from __future__ import annotations

import signal
import threading

EXIT_STOPPED = 128 + signal.SIGTERM

_requested = threading.Event()


class StopRequested(Exception):
    """SIGTERM arrived: the job stopped at a safe point; its checkpoint is what a retry resumes from."""


def _on_sigterm(signum, frame) -> None:
    _requested.set()


def stop_on_sigterm() -> None:
    """From now on, SIGTERM requests a stop instead of killing the process (main thread only)."""
    _requested.clear()
    signal.signal(signal.SIGTERM, _on_sigterm)


def stop_requested() -> bool:
    return _requested.is_set()


def check_stop(what: str) -> None:
    """Raise StopRequested, saying *what* was abandoned, once SIGTERM has arrived."""
    if _requested.is_set():
        raise StopRequested(f"SIGTERM received; {what}")
