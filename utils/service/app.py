"""The prediction service: a trained model.pt behind a small HTTP API (FastAPI), for bin/serve.py.

    GET  /api/health    liveness and the inference queue
    GET  /api/model     classes, backbone, image size, operating threshold, what the model file records
    POST /api/predict   multipart field `files` (repeatable): detections and compliance per image, overall
    POST /api/explain   one image `file` and one detection (`box`, `label`): a heat map of its class evidence
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
can re-filter at another threshold without a new request. The overall figure is also given as
an estimate with its 95 % bootstrap interval over the images sent (`estimate`, `estimates`:
utils/detection/quantify.py), at the request's threshold.

Explanations (utils.detection.explain, grad-cam package) cost a forward and a backward
pass per box: /api/predict?explain=true explains the best `explain_max_boxes` counted
detections of each image; the page asks /api/explain for the one box a user clicks.
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

from ..classes import CLASS_COLOURS, CLASSES, LABEL_OF, NAME_OF
from ..data.images import ImageError, load_rgb_bytes
from ..detection.compliance import compliance, merge_compliance
from .. import defaults as D
from ..detection.evaluation import load_trained_model
from ..detection.explain import EXPLAIN_METHODS, ExplainError, explain_image
from ..detection.inference import detect, to_model_input
from ..detection.quantify import prediction_estimates, soft_counts
from ..detection.plots import draw_detections
from torchvision.ops import box_iou

DETECTION_FLOOR = D.DETECTION_FLOOR  # lowest score returned: below it a box is noise at any threshold a user would pick
IMAGE_TYPES = {"image/jpeg", "image/png", "image/webp", "image/bmp", "image/tiff"}
RETRY_AFTER_S = 2
MATCH_IOU = 0.5  # /api/explain: the detection explained is the model's box of that class overlapping the given one
PAGE = Path(__file__).with_name("page.html")  # the web page at /: plain HTML and JS, no build step, no CDN


@dataclass
class ServiceConfig:
    model_path: Path
    device: str = "cpu"
    max_upload_mb: float = 20.0
    max_images: int = 16
    queue_size: int = 8
    token: str | None = None
    explain_max_boxes: int = D.EXPLAIN_MAX_BOXES


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


def _jpeg_data_url(picture) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _annotated_jpeg(image, out: dict, threshold: float) -> str:
    keep = out["scores"] >= threshold
    return _jpeg_data_url(draw_detections(image.copy(), out["boxes"][keep], out["labels"][keep], out["scores"][keep]))


def _explanation_record(explanation, method: str) -> dict:
    return {"method": method, "evidence_in_box": round(explanation.evidence_in_box, 4),
            "overlay": _jpeg_data_url(explanation.overlay)}


def parse_box(text: str) -> list[float]:
    """`x1,y1,x2,y2` in pixels, x2 > x1 and y2 > y1 (HTTPException 422 otherwise)."""
    try:
        box = [float(v) for v in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4 or not all(np.isfinite(box)) or box[2] <= box[0] or box[3] <= box[1]:
        raise HTTPException(422, f"box {text!r}: expected x1,y1,x2,y2 in pixels with x2 > x1 and y2 > y1")
    return box


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

    async def read_image(upload: UploadFile):
        """(name, PIL image) of one upload, decoded in memory; 413/415/422 naming the file otherwise."""
        name = upload.filename or "upload"
        if upload.content_type not in IMAGE_TYPES:
            raise HTTPException(415, f"{name}: unsupported type {upload.content_type!r}; "
                                     f"send one of {', '.join(sorted(IMAGE_TYPES))}")
        data = await upload.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise HTTPException(413, f"{name}: larger than {config.max_upload_mb:g} MB (--max-upload-mb)")
        try:
            return name, load_rgb_bytes(data, name)
        except ImageError as error:
            raise HTTPException(422, str(error)) from None

    async def in_worker(function, *args):
        """*function* on the inference thread, if the bounded queue has room (503 with Retry-After if not)."""
        if not queue.enter():
            raise HTTPException(503, f"busy: {queue.limit} requests already wait for the model; retry shortly",
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        try:
            return await asyncio.get_running_loop().run_in_executor(worker, function, *args)
        finally:
            queue.leave()

    def as_uint8(image) -> torch.Tensor:
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)

    def run_model(images: list, tta: bool, explain_threshold: float | None = None):
        """(detections per image, {detection index: explanation} per image; empty unless explaining)."""
        tensors = [as_uint8(image) for image in images]
        outputs = detect(model, [to_model_input(t, device) for t in tensors], tta=tta, score_threshold=DETECTION_FLOOR)
        explained = [{} for _ in images]
        if explain_threshold is not None:
            for tensor, out, found in zip(tensors, outputs, explained):
                counted = (out["scores"] >= explain_threshold).nonzero().flatten()
                for explanation in explain_image(model, tensor, out["boxes"][counted], out["labels"][counted],
                                                 out["scores"][counted], device, D.EXPLAIN_METHOD,
                                                 config.explain_max_boxes):
                    found[int(counted[explanation.index])] = _explanation_record(explanation, D.EXPLAIN_METHOD)
        return outputs, explained

    def explain_box(image, box: list[float], label: int, method: str):
        """The explanation of the model's detection of class *label* at *box*, or None if it finds none there."""
        tensor = as_uint8(image)
        out = detect(model, [to_model_input(tensor, device)], score_threshold=DETECTION_FLOOR)[0]
        candidates = (out["labels"] == label).nonzero().flatten()
        if len(candidates) == 0:
            return None
        ious = box_iou(torch.tensor([box]), out["boxes"][candidates])[0]
        best = int(ious.argmax())
        if float(ious[best]) <= MATCH_IOU:
            return None
        index = candidates[best: best + 1]
        return explain_image(model, tensor, out["boxes"][index], out["labels"][index], out["scores"][index],
                             device, method, 1)[0]

    @app.post("/api/predict", dependencies=[Depends(authorised)])
    async def predict(files: list[UploadFile] = File(..., description="one or more images (field `files`, repeatable)"),
                      score_threshold: float | None = Query(None, ge=0.0, le=1.0,
                                                            description="count detections at or above this score "
                                                                        "(default: the model's operating threshold)"),
                      tta: bool = Query(False, description="also run each image flipped and merge (about 2x slower)"),
                      annotated: bool = Query(False, description="include each image with its boxes drawn, "
                                                                 "as a JPEG data URL"),
                      explain: bool = Query(False, description="add to each of the best counted detections of "
                                                               "an image (at most --explain-max-boxes) an "
                                                               "`explanation`: a HiResCAM heat map of its class "
                                                               "evidence over a crop around it (JPEG data URL); "
                                                               "a backward pass per box")) -> dict:
        """Detections (down to the detection floor, with scores) and compliance per image and overall."""
        if len(files) > config.max_images:
            raise HTTPException(413, f"{len(files)} images in one request; at most {config.max_images} (--max-images)")
        threshold = default_threshold if score_threshold is None else score_threshold
        images = [await read_image(upload) for upload in files]
        outputs, explained = await in_worker(run_model, [image for _, image in images], tta,
                                             threshold if explain else None)
        results, records = [], []
        for (name, image), out, explanations in zip(images, outputs, explained):
            detections = _detections(out)
            for index, explanation in explanations.items():
                detections[index]["explanation"] = explanation
            record = {"file": name, "width": image.width, "height": image.height, "detections": detections,
                      "compliance": compliance([d["label"] for d in detections if d["score"] >= threshold])}
            if annotated:
                record["annotated"] = _annotated_jpeg(image, out, threshold)
            results.append(record)
            # numbered: two uploads may share a name, and the estimate's resampling order follows the names
            records.append({"file": f"{len(records):04d}", "soft_counts": soft_counts(out["labels"].tolist(),
                                                                                      out["scores"].tolist()),
                            "detections": [d for d in detections if d["score"] >= threshold]})
        # the bootstrap is CPU work: off the event loop, as inference is
        estimates = await asyncio.to_thread(prediction_estimates, records, meta.get("quantification"), threshold, tta)
        return {"model": config.model_path.name, "score_threshold": threshold,
                "score_threshold_source": "query" if score_threshold is not None else threshold_source,
                "tta": tta, "images": results, "overall": merge_compliance(r["compliance"] for r in results),
                **estimates}

    @app.post("/api/explain", dependencies=[Depends(authorised)])
    async def explain_detection(file: UploadFile = File(..., description="the image (one)"),
                                box: str = Query(..., description="the detection's box: x1,y1,x2,y2 in pixels, as "
                                                                  "/api/predict returned it"),
                                label: str = Query(..., description=f"its class: {', '.join(CLASSES)}"),
                                method: str = Query(D.EXPLAIN_METHOD, description="hirescam (per box, on the "
                                                    "features the box used), gradcam or eigencam (one "
                                                    "class-agnostic map per image)")) -> dict:
        """A heat map of the evidence for one detection's class, over a crop around its box (JPEG data URL),
        and the share of the map inside the box. 422 when the model finds no such detection there."""
        coordinates = parse_box(box)
        if label not in CLASSES:
            raise HTTPException(422, f"label {label!r}: not one of {', '.join(CLASSES)}")
        if method not in EXPLAIN_METHODS:
            raise HTTPException(422, f"method {method!r}: not one of {', '.join(EXPLAIN_METHODS)}")
        name, image = await read_image(file)
        try:
            explanation = await in_worker(explain_box, image, coordinates, LABEL_OF[label], method)
        except ExplainError as error:
            raise HTTPException(422, f"{config.model_path.name}: {error}") from None
        if explanation is None:
            raise HTTPException(422, f"{name}: the model finds no {label} detection overlapping box {box} "
                                     f"(IoU > {MATCH_IOU}); send a box /api/predict returned")
        return {"file": name, "label": label, "box": explanation.box, "score": explanation.score,
                **_explanation_record(explanation, method)}

    @app.exception_handler(HTTPException)
    async def one_line_errors(request: Request, error: HTTPException):
        return JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=error.headers)

    return app
