"""The prediction service: a trained model.pt behind a small HTTP API (FastAPI), for bin/serve.py.

    GET  /api/health    liveness and the inference queue
    GET  /api/model     classes, backbone, image size, operating threshold, what the model file records
    POST /api/predict   multipart field `files` (repeatable): detections and compliance per image, overall
    GET  /              a web page over the API (utils/service/page.html; works offline)

The model is loaded once. Inference runs in one worker thread, off the event loop, and
at most `queue_size` requests may wait for it: one more is answered 503 with Retry-After,
so a burst never becomes an unbounded backlog. Uploads are read into memory and decoded
there (nothing a client sends becomes a path on disk); every bad request gets a 4xx with
a reason naming the file: 413 too large or too many files, 415 not an image type, 422
undecodable or truncated. With a token (--token or MASK_SERVICE_TOKEN), /api/model and
/api/predict need `Authorization: Bearer <token>`.

Detections are returned down to `DETECTION_FLOOR`, each with its score, plus the
operating threshold: the compliance figures count those at or above the threshold
(the model's own, chosen on validation, unless `score_threshold` is given), and a client
can re-filter at another threshold without a new request.
"""

from __future__ import annotations

import asyncio
import base64
import io
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse

from ..classes import CLASS_COLOURS, CLASSES, NAME_OF
from ..data.images import ImageError, load_rgb_bytes
from ..detection.compliance import compliance, merge_compliance
from ..detection.evaluation import load_trained_model
from ..detection.inference import detect, to_model_input
from ..detection.plots import draw_detections

DETECTION_FLOOR = 0.05  # lowest score returned: below it a box is noise at any threshold a user would pick
IMAGE_TYPES = {"image/jpeg", "image/png", "image/webp", "image/bmp", "image/tiff"}
RETRY_AFTER_S = 2
PAGE = Path(__file__).with_name("page.html")  # the web page at /: plain HTML and JS, no build step, no CDN


@dataclass
class ServiceConfig:
    model_path: Path
    device: str = "cpu"
    max_upload_mb: float = 20.0
    max_images: int = 16
    queue_size: int = 8
    token: str | None = None


@dataclass
class _Queue:
    """Requests waiting for or in inference; bounded by ServiceConfig.queue_size."""

    limit: int
    waiting: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def enter(self) -> bool:
        with self.lock:
            if self.waiting >= self.limit:
                return False
            self.waiting += 1
            return True

    def leave(self) -> None:
        with self.lock:
            self.waiting -= 1


def _detections(out: dict) -> list[dict]:
    return [{"box": [round(v, 1) for v in box], "label": NAME_OF[int(label)], "score": round(float(score), 4)}
            for box, label, score in zip(out["boxes"].tolist(), out["labels"].tolist(), out["scores"].tolist())]


def _annotated_jpeg(image, out: dict, threshold: float) -> str:
    keep = out["scores"] >= threshold
    drawn = draw_detections(image.copy(), out["boxes"][keep], out["labels"][keep], out["scores"][keep])
    buffer = io.BytesIO()
    drawn.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def create_app(config: ServiceConfig) -> FastAPI:
    device = torch.device(config.device)
    model, meta, default_threshold, threshold_source = load_trained_model(config.model_path, device)
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
    queue = _Queue(config.queue_size)
    max_bytes = int(config.max_upload_mb * 2**20)

    app = FastAPI(title="mask-detection service",
                  description="Face-mask detection and the share of faces properly masked, from a model.pt "
                              "trained by the mask-detection workflow.",
                  version="1.0")
    app.state.config, app.state.queue = config, queue

    def authorised(request: Request) -> None:
        if config.token is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {config.token}".encode()):
            raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        """The web page: choose or drop photos, see the boxes, move the threshold, read the compliance."""
        return PAGE.read_text(encoding="utf-8")

    @app.get("/api/health")
    def health() -> dict:
        """Liveness, the model file and the inference queue."""
        return {"status": "ok", "model": config.model_path.name, "device": str(device),
                "queue": {"waiting": queue.waiting, "limit": queue.limit}}

    @app.get("/api/model", dependencies=[Depends(authorised)])
    def model_info() -> dict:
        """What the model is: classes, backbone, image size, operating threshold, training record."""
        return {"classes": list(CLASSES), "colours": {name: "#%02x%02x%02x" % rgb for name, rgb in CLASS_COLOURS.items()},
                "backbone": meta.get("backbone"), "image_size": meta.get("image_size"),
                "score_threshold": default_threshold, "score_threshold_source": threshold_source,
                "operating_threshold": meta.get("operating_threshold"), "detection_floor": DETECTION_FLOOR,
                "epochs_completed": meta.get("epochs_completed"), "training": meta.get("training"),
                "num_train_images": meta.get("num_train_images"), "num_val_images": meta.get("num_val_images"),
                "limits": {"max_upload_mb": config.max_upload_mb, "max_images": config.max_images}}

    def run_model(images: list, tta: bool) -> list[dict]:
        inputs = [to_model_input(torch.from_numpy(np.array(image)).permute(2, 0, 1), device) for image in images]
        return detect(model, inputs, tta=tta, score_threshold=DETECTION_FLOOR)

    @app.post("/api/predict", dependencies=[Depends(authorised)])
    async def predict(files: list[UploadFile] = File(..., description="one or more images (field `files`, repeatable)"),
                      score_threshold: float | None = Query(None, ge=0.0, le=1.0,
                                                            description="count detections at or above this score "
                                                                        "(default: the model's operating threshold)"),
                      tta: bool = Query(False, description="also run each image flipped and merge (about 2x slower)"),
                      annotated: bool = Query(False, description="include each image with its boxes drawn, "
                                                                 "as a JPEG data URL")) -> dict:
        """Detections (down to the detection floor, with scores) and compliance per image and overall."""
        if len(files) > config.max_images:
            raise HTTPException(413, f"{len(files)} images in one request; at most {config.max_images} (--max-images)")
        threshold = default_threshold if score_threshold is None else score_threshold
        images = []
        for upload in files:
            name = upload.filename or "upload"
            if upload.content_type not in IMAGE_TYPES:
                raise HTTPException(415, f"{name}: unsupported type {upload.content_type!r}; "
                                         f"send one of {', '.join(sorted(IMAGE_TYPES))}")
            data = await upload.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise HTTPException(413, f"{name}: larger than {config.max_upload_mb:g} MB (--max-upload-mb)")
            try:
                images.append((name, load_rgb_bytes(data, name)))
            except ImageError as error:
                raise HTTPException(422, str(error)) from None
        if not queue.enter():
            raise HTTPException(503, f"busy: {queue.limit} requests already wait for the model; retry shortly",
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(
                worker, run_model, [image for _, image in images], tta)
        finally:
            queue.leave()
        results = []
        for (name, image), out in zip(images, outputs):
            detections = _detections(out)
            record = {"file": name, "width": image.width, "height": image.height, "detections": detections,
                      "compliance": compliance([d["label"] for d in detections if d["score"] >= threshold])}
            if annotated:
                record["annotated"] = _annotated_jpeg(image, out, threshold)
            results.append(record)
        return {"model": config.model_path.name, "score_threshold": threshold,
                "score_threshold_source": "query" if score_threshold is not None else threshold_source,
                "tta": tta, "images": results, "overall": merge_compliance(r["compliance"] for r in results)}

    @app.exception_handler(HTTPException)
    async def one_line_errors(request: Request, error: HTTPException):
        return JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=error.headers)

    return app
