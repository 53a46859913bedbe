"""What the service does with one request's uploads and answers, outside the app's routes: admission (the
queue of requests in flight and the budget of decoded pixels), uploads decoded from memory at the model's
working size, and the pieces of an answer (detections, annotated pictures, explanations)."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from fastapi import HTTPException, UploadFile
from PIL import Image

from .. import defaults as D
from ..classes import NAME_OF
from ..data.images import load_rgb_bytes
from ..errors import shown
from ..detection.compliance import listed_score
from ..detection.inference import decode_bound, detect, pixels_for_model, rescaled_boxes, to_model_input
from ..detection.plots import draw_detections

MAX_NAME_CHARS = 255  # an upload's name as echoed (a file system's longest name); a longer one is cut


def default_decode_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass
class AdmissionQueue:
    """Prediction and explanation requests in flight (decoding, waiting, in inference); at most `limit`, and at most
    `per_client` of them from one client address (None: no such bound). Without it one address (a script with as
    many workers as --queue-size) held every place, and every other client was answered 503 while it kept them."""

    limit: int
    per_client: int | None = None
    waiting: int = 0
    by_client: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def enter(self, where: str, client: str | None = None) -> None:
        """Admit a request of *client*, or raise: 503 when the queue is full, 429 when the client holds its share.
        *where* ("POST /api/predict") names the request in the reason."""
        retry = {"Retry-After": str(D.SERVICE_RETRY_AFTER_S)}
        with self.lock:
            if self.waiting >= self.limit:
                raise HTTPException(503, f"{where}: busy: {self.limit} requests already wait for the model; retry "
                                         "shortly", headers=retry)
            held = self.by_client.get(client, 0) if client is not None else 0
            if self.per_client is not None and client is not None and held >= self.per_client:
                raise HTTPException(429, f"{where}: too many requests from {shown(client)} waiting for the model: "
                                         f"{held} of the {self.limit} places (--queue-size); at most "
                                         f"{self.per_client} from one client; retry when one is answered",
                                    headers=retry)
            self.waiting += 1
            if client is not None:
                self.by_client[client] = held + 1

    def leave(self, client: str | None = None) -> None:
        with self.lock:
            self.waiting -= 1
            if client is not None:
                left = self.by_client.pop(client) - 1
                if left:  # an address with nothing admitted leaves no entry behind
                    self.by_client[client] = left


class PixelBudget:
    """Decoded pixels held by all requests together; a request waits until its own fit, in the order the
    requests came: a large one waits only for those ahead of it, never for a stream of smaller ones that
    would each fit before it (that wait had no end while small requests kept coming)."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0
        self._changed = asyncio.Condition()  # made in the lifespan: bound to the server's event loop
        self._line: deque[object] = deque()  # one ticket per waiting request, the oldest first

    async def acquire(self, pixels: int) -> None:
        ticket = object()
        async with self._changed:
            self._line.append(ticket)
            try:
                await self._changed.wait_for(lambda: self._line[0] is ticket and self.held + pixels <= self.limit)
                self.held += pixels
            finally:  # acquired, or cancelled while waiting (a client gone, the server stopping): the next one's turn
                self._line.remove(ticket)
                self._changed.notify_all()

    async def release(self, pixels: int) -> None:
        async with self._changed:
            self.held -= pixels
            self._changed.notify_all()


@dataclass
class Upload:
    """An upload as the multipart parser spooled it (in memory below 1 MB, else an unnamed temporary
    file): its bytes are read only on a decode thread, so a request never holds them all at once."""

    name: str
    file: Any
    width: int = 0
    height: int = 0


def detection_records(out: dict) -> list[dict]:
    return [{"box": [round(v, 1) for v in box], "label": NAME_OF[int(label)], "score": listed_score(score)}
            for box, label, score in zip(out["boxes"].tolist(), out["labels"].tolist(), out["scores"].tolist())]


def jpeg_data_url(picture) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=D.SERVICE_ANNOTATED_JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def as_picture(tensor: torch.Tensor) -> Image.Image:
    return Image.fromarray(tensor.permute(1, 2, 0).numpy())


def annotated_jpeg(tensor: torch.Tensor, out: dict, threshold: float,
                   max_side: int = D.SERVICE_ANNOTATED_MAX_SIDE) -> str:
    """The picture with its counted boxes drawn, as a JPEG data URL, shrunk to at most *max_side* pixels on its
    longer side first (boxes scaled with it). Drawn at full size, a request's pictures (up to 64 M pixels) made an
    answer of tens of MB, held outside the pixel budget for as long as its client took to read it (32 slow
    readers: a GB and more). The answer's boxes stay in the upload's own pixels."""
    keep = out["scores"] >= threshold
    picture, boxes = as_picture(tensor), out["boxes"][keep]
    scale = max_side / max(picture.size)
    if scale < 1:
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        factors = torch.tensor([size[0] / picture.width, size[1] / picture.height] * 2)
        picture, boxes = picture.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0), boxes * factors
    return jpeg_data_url(draw_detections(picture, boxes, out["labels"][keep], out["scores"][keep]))


def explanation_record(explanation, method: str) -> dict:
    return {"method": method, "evidence_in_box": round(explanation.evidence_in_box, 4),
            "overlay": jpeg_data_url(explanation.overlay)}


def parse_box(text: str) -> list[float]:
    """`x1,y1,x2,y2` in pixels, x2 > x1 and y2 > y1 (HTTPException 422 otherwise)."""
    try:
        box = [float(v) for v in text.split(",")] if len(text) <= 200 else []
    except ValueError:
        box = []
    # checked as the model's float32 compares it: 1e39 is finite as a Python float but inf there (and its IoU NaN)
    with np.errstate(over="ignore"):  # an overflow is the inf looked for, not a warning
        box32 = np.asarray(box if len(box) == 4 else [0.0] * 4, dtype=np.float64).astype(np.float32)
    if len(box) != 4 or not np.isfinite(box32).all() or box32[2] <= box32[0] or box32[3] <= box32[1]:
        raise HTTPException(422, f"box {shown(text)}: expected x1,y1,x2,y2 in pixels with x2 > x1 and y2 > y1")
    return box


def model_pixels(model, tensor: torch.Tensor) -> torch.Tensor:
    """*tensor* (uint8 CxHxW) as predict gives the same picture to *model* (inference.pixels_for_model at the size
    the model uses now: reduced as predict's decode workers reduce a photo), or *tensor* itself at or below it."""
    return pixels_for_model(model, tensor, decode_bound(model))


def model_sized_input(model, tensor: torch.Tensor, device) -> tuple[torch.Tensor, tuple[float, float] | None]:
    """The float input of *tensor* (uint8 CxHxW) as predict gives the same picture to the model (model_pixels), and
    the (x, y) factors that map its boxes back; None when it is given whole. So an upload has the detections
    predict counts on the same photo, and a large one costs the model's copies at its working size, not at full
    size (25 M pixels: ~0.6 GB less at the peak)."""
    small = model_pixels(model, tensor)
    if small is tensor:
        return to_model_input(tensor, device), None
    return to_model_input(small, device), (tensor.shape[-1] / small.shape[-1], tensor.shape[-2] / small.shape[-2])


def detect_as_predict(model, tensor: torch.Tensor, device, tta: bool, score_threshold: float,
                      given: torch.Tensor | None = None) -> dict:
    """One picture's detections (uint8 CxHxW) as /api/predict and predict find them, in its pixels: what
    explain_box matches a box against. *given*: the picture's model_pixels when the caller has them."""
    given = model_pixels(model, tensor) if given is None else given
    out = detect(model, [to_model_input(given, device)], tta=tta, score_threshold=score_threshold)[0]
    return {**out, "boxes": rescaled_boxes(out["boxes"], tuple(given.shape[-2:]), tuple(tensor.shape[-2:]))}


def explain_as_predict(model, tensor: torch.Tensor, boxes, labels, scores, device, method, max_boxes, tta,
                       should_stop=None, given: torch.Tensor | None = None) -> list:
    """explain.explain_image of detections in *tensor*'s pixels, run on the model input they were found on
    (*given*, the picture's model_pixels, made here when not given: a caller explaining several boxes of one
    picture reduces it once), the overlays cut from *tensor*."""
    from ..detection.explain import explain_image

    small = model_pixels(model, tensor) if given is None else given
    boxes = rescaled_boxes(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4), tuple(tensor.shape[-2:]),
                           tuple(small.shape[-2:]))
    return explain_image(model, small, boxes, labels, scores, device, method, max_boxes, tta,
                         should_stop=should_stop, picture=tensor)


def decode_to_tensor(file, name: str) -> torch.Tensor:
    """The upload as a uint8 CxHxW tensor (3 bytes a pixel; its file's bytes and the PIL image, 4 bytes a
    pixel, live only during this call)."""
    file.seek(0)
    return torch.from_numpy(np.array(load_rgb_bytes(file.read(), name))).permute(2, 0, 1)


def _read_failure(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


async def on_pool(pool, function, calls: list[tuple]) -> list:
    """[function(*args) for args in calls] on the thread *pool*, in parallel, results in order. At the first
    failure (or when the caller is cancelled) the calls not begun are withdrawn, and those already running are
    waited for before it returns: they hold decoded pixels, which the request counts until it is done. The
    failure raised is the first in call order among the calls that ran, not the first in time."""
    jobs = [pool.submit(function, *args) for args in calls]
    waited = [asyncio.wrap_future(job) for job in jobs]
    # each failure is raised below from its job; left unread on its asyncio future, asyncio logged it once more,
    # with a traceback ("Future exception was never retrieved"), for every upload refused as it was decoded
    for future in waited:
        future.add_done_callback(_read_failure)
    try:
        await asyncio.wait(waited, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for job in jobs:
            job.cancel()  # a call not begun never begins; a running one cannot be stopped
        running = [future for future, job in zip(waited, jobs) if not job.done()]
        if running:  # also after a cancellation: a second one (uvicorn cancels once) is all that could cut this
            await asyncio.wait(running)
    failed = next((job.exception() for job in jobs if not job.cancelled() and job.exception() is not None), None)
    if failed is not None:
        raise failed
    return [job.result() for job in jobs]


CLIENT_CLOSED = 499  # the status proxies log for a request whose client closed the connection before its answer


async def until_disconnected(request, work, withdrawal=None):
    """await *work* (a coroutine) unless the client leaves first: then the work is cancelled (its images still
    queued for the model are withdrawn, an explanation on the model stops at its next pass through *withdrawal*
    (batching.Withdrawal), its pixels given back) and the request ends with 499, which only the access log (with
    the model's jobs dropped unbegun: dropped=N) and the metrics see. Called once the body has been read: a
    receive then returns only when the client disconnects (or the answer is complete)."""
    task = asyncio.ensure_future(work)

    async def client_gone() -> None:
        try:
            while (await request.receive())["type"] != "http.disconnect":
                pass
        except Exception:  # a receive that fails says nothing about the client: the work goes on
            await asyncio.Event().wait()

    watcher = asyncio.ensure_future(client_gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this request itself is cancelled (the server's stop timeout)
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # its clean-up (the budget's release) runs before the answer
    if task.cancelled() and watcher.done() and not watcher.cancelled():
        timings = getattr(getattr(request, "state", None), "timings", None)
        if withdrawal is not None and isinstance(timings, dict):
            timings["dropped"] = withdrawal.dropped
        raise HTTPException(CLIENT_CLOSED, f"{request.method} {shown(request.url.path)}: the client closed the "
                                           "connection before the answer; its work was stopped")
    return task.result()


def upload_name(upload: UploadFile) -> str:
    """The file name a client gave, bounded: it is echoed in answers and messages."""
    name = upload.filename or "upload"
    return name if len(name) <= MAX_NAME_CHARS else name[:MAX_NAME_CHARS] + "..."
