"""The inference worker of the service: one thread that runs the model on batches of images from any requests.

Requests submit their decoded images one by one (``submit_image``) and wait on a future each.
The worker takes the oldest waiting image and adds up to ``batch_size - 1`` more that can share
its forward pass, then runs them together:

- only images of the same height and width and the same TTA flag share a batch: torchvision pads
  a batch to its largest image, and padding changes the features near the border of a smaller
  one, so images of other sizes would get (slightly) other answers than alone;
- their pixels together stay under ``batch_max_pixels`` (the model's float input costs 12 bytes a
  pixel, twice while normalised), so one large image runs alone;
- it waits at most ``wait_s`` for more, and only while a request has announced images that are
  still being decoded (``expect``): a lone request never pays the wait.

Work that must run alone on the model's thread (explanations: a backward pass per box) is
submitted with ``submit_call`` and keeps its place in the order.

Only that thread should run torch's parallel ops for the life of the server. torch's CPU ops run
on OpenMP (libgomp), which gives every thread that ever enters a parallel region a team of its
own for as long as that thread lives, and lets idle team threads spin between regions only while
the process has no more OpenMP threads than cores; past that they sleep and are woken for every
op. On 2 cores a model loaded on the main thread (a team that lives as long as the server) was
enough to slow the inference thread's model from 13-15 to 9-10 images/s. So the model is loaded
on a passing thread (``on_a_passing_thread``), whose team ends with it, and the decoding threads
only wrap numpy arrays.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Timing:
    """When an image (or call) was queued, started and finished on the worker (time.perf_counter)."""

    queued: float
    started: float = 0.0
    finished: float = 0.0
    batch_images: int = 1


@dataclass
class _Job:
    key: tuple | None  # (height, width, tta) of an image; None: a call that runs alone
    payload: Any
    pixels: int
    future: Future = field(default_factory=Future)
    timing: Timing = field(default_factory=lambda: Timing(time.perf_counter()))


@dataclass
class Withdrawal:
    """One request's say in its jobs: set when it stops waiting for them (its client left, the server's stop
    timeout). A call already on the model asks ``stop`` between its passes (an explanation's forward and backward
    passes, twice under TTA) and ends early; ``dropped`` counts the jobs withdrawn before they began."""

    stop: threading.Event = field(default_factory=threading.Event)
    dropped: int = 0


def on_a_passing_thread(function: Callable, *args):
    """function(*args) on a thread that ends when it returns; its result, or its exception raised here.
    For torch work (loading a model) that must leave no OpenMP team behind on the calling thread."""
    found: dict = {}

    def run():
        try:
            found["result"] = function(*args)
        except BaseException as error:  # handed to the caller, in its thread
            found["error"] = error

    thread = threading.Thread(target=run, name="passing")
    thread.start()
    thread.join()
    if "error" in found:
        raise found["error"]
    return found["result"]


class BatchWorker:
    """run_batch(list of uint8 CxHxW tensors, tta) -> one answer per tensor, called on the worker thread."""

    def __init__(self, run_batch: Callable[[list, bool], list], batch_size: int, batch_max_pixels: int,
                 wait_s: float, on_batch: Callable[[int], None] | None = None):
        self._run_batch, self._on_batch = run_batch, on_batch
        self.batch_size, self.batch_max_pixels, self.wait_s = batch_size, batch_max_pixels, wait_s
        self._jobs: deque[_Job] = deque()
        self._expected = 0  # images announced by admitted requests and not submitted yet
        self._condition = threading.Condition()
        self._closing = False
        self._abandoned = False  # close()'s timeout passed: no job starts any more
        self._busy = False  # a job is on the model now
        self._thread = threading.Thread(target=self._loop, name="inference", daemon=True)
        self._thread.start()

    # -- the requests' side
    def depth(self) -> int:
        """Images (and calls) waiting for the model."""
        with self._condition:
            return len(self._jobs)

    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closing

    def busy_after_close(self) -> bool:
        """close() returned with a job still on the model (its timeout passed): the thread is still running it."""
        with self._condition:
            return self._abandoned and self._busy and self._thread.is_alive()

    def expect(self, count: int) -> None:
        """*count* images are being decoded and will be submitted (or withdrawn with expect(-n))."""
        with self._condition:
            self._expected = max(0, self._expected + count)
            self._condition.notify_all()

    def submit_image(self, tensor, tta: bool) -> tuple[Future, Timing]:
        height, width = tensor.shape[-2:]
        return self._submit(_Job((int(height), int(width), bool(tta)), tensor, int(height) * int(width)), expected=1)

    def submit_call(self, function: Callable, *args) -> tuple[Future, Timing]:
        return self._submit(_Job(None, (function, args), 0), expected=0)

    def _submit(self, job: _Job, expected: int) -> tuple[Future, Timing]:
        with self._condition:
            if self._closing or not self._thread.is_alive():
                raise RuntimeError("the inference worker has stopped")
            self._jobs.append(job)
            self._expected = max(0, self._expected - expected)
            self._condition.notify_all()
        return job.future, job.timing

    def close(self, timeout: float | None = None) -> None:
        """Finish what is queued, then stop the thread. When *timeout* passes first, no further job starts (those
        still queued are answered with an error) and the thread ends after the job on the model, if any: only
        then is one reported abandoned (busy_after_close), not when the thread was merely on its way out."""
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        self._thread.join(timeout)
        with self._condition:
            self._abandoned = True
            busy = self._busy
            self._drop_all()  # answered now, not after the job on the model
            self._condition.notify_all()
        if not busy:  # between jobs: it sees _abandoned at once and returns
            self._thread.join()

    # -- the worker's side
    def _loop(self) -> None:
        while True:
            with self._condition:
                while not self._jobs and not self._closing:
                    self._condition.wait()
                if not self._jobs:
                    return
                if self._abandoned:
                    self._drop_all()
                    return
                first = self._jobs.popleft()
                batch = [first] if first.key is None else self._gather(first)  # may wait: releases the condition
                if self._abandoned:  # close()'s timeout passed meanwhile: this batch does not start either
                    self._jobs.extendleft(reversed(batch))
                    self._drop_all()
                    return
                self._busy = True
            # A request that stopped waiting (cancelled: the server's stop timeout, a client gone) has cancelled
            # its future: its job is dropped here, and the others' futures are marked running, which no cancel
            # can undo, so that setting their results below cannot fail (an InvalidStateError there would end
            # this thread, and every later request would wait for ever).
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
            try:
                if batch:
                    self._run(batch)
            finally:
                with self._condition:
                    self._busy = False

    def _drop_all(self) -> None:
        """Every queued job answered with an error; called holding the condition."""
        for job in self._jobs:
            _settle(job.future, error=RuntimeError("the server stopped before this image was run"))
        self._jobs.clear()

    def _gather(self, first: _Job) -> list[_Job]:
        """*first* and the waiting images that may share its pass; called holding the condition."""
        batch, pixels = [first], first.pixels
        deadline = time.perf_counter() + self.wait_s
        while len(batch) < self.batch_size:
            for job in list(self._jobs):
                if len(batch) >= self.batch_size:
                    break
                if job.key == first.key and pixels + job.pixels <= self.batch_max_pixels:
                    self._jobs.remove(job)
                    batch.append(job)
                    pixels += job.pixels
            remaining = deadline - time.perf_counter()
            if len(batch) >= self.batch_size or self._expected == 0 or remaining <= 0 or self._closing:
                break
            self._condition.wait(remaining)
        return batch

    def _run(self, batch: list[_Job]) -> None:
        started = time.perf_counter()
        for job in batch:
            job.timing.started, job.timing.batch_images = started, len(batch)
        try:
            if batch[0].key is None:
                function, args = batch[0].payload
                answers = [function(*args)]
            else:
                answers = self._run_batch([job.payload for job in batch], batch[0].key[2])
                if self._on_batch is not None:
                    self._on_batch(len(batch))
        except Exception as error:  # every waiting request must hear of it, and the thread lives on
            finished = time.perf_counter()
            for job in batch:
                job.timing.finished = finished
                _settle(job.future, error=error)
            return
        finished = time.perf_counter()
        for job, answer in zip(batch, answers):
            job.timing.finished = finished
            _settle(job.future, answer)


def stage_seconds(timings: list[Timing]) -> dict[str, float]:
    """{"queue": s, "inference": s} of one request's jobs: from the first queued to the first started, and from
    then to the last finished. Jobs that never finished (never begun: the client left or the server stopped; or
    left running) are not counted: their zero times gave a queue time of minus the clock's reading."""
    done = [t for t in timings if t.finished]
    if not done:
        return {}
    started = min(t.started for t in done)
    return {"queue": started - min(t.queued for t in done), "inference": max(t.finished for t in done) - started}


async def results_of(futures: list[Future], withdrawal: Withdrawal | None = None) -> list:
    """The worker's answers to one request's jobs, in order. When one of them fails, or the request stops waiting
    (cancelled: its client left, the server's stop timeout), its other jobs still queued are withdrawn (the worker
    drops a cancelled job), so that the model does no work whose answer nobody reads; a call already on the model
    is told so through *withdrawal*, and stops at its next pass."""
    try:
        return list(await asyncio.gather(*(asyncio.wrap_future(future) for future in futures)))
    except BaseException:
        for future in futures:
            future.cancel()  # a job already on the model cannot be: a batch finishes, its answer dropped
        if withdrawal is not None:  # (asyncio may have cancelled some already: counted by their state)
            withdrawal.dropped += sum(future.cancelled() for future in futures)
            withdrawal.stop.set()
        raise


def _settle(future: Future, result: Any = None, error: BaseException | None = None) -> None:
    """The job's answer, which nothing may stop from reaching the others: never raises into the worker's loop."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:  # settled or cancelled already (set_running_or_notify_cancel makes this rare)
        pass
