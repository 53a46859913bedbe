"""The prediction service: a trained model.pt behind a small HTTP API (FastAPI), for bin/serve.py.

    GET  /api/health    the model file and the admission queue
    GET  /livez         liveness: the process answers
    GET  /readyz        readiness: the model is loaded, the queue has room, the server is not stopping (else 503)
    GET  /metrics       Prometheus text format (utils/service/metrics.py)
    GET  /api/model     classes, backbone, image size, operating threshold, what the model file records
    POST /api/predict   multipart field `files` (repeatable): detections and compliance per image, overall
    POST /api/explain   one image `file` and one detection (`box`, `label`): a heat map of its class evidence
    GET  /              a web page over the API (utils/service/page.html; works offline)

The edge (utils/service/edge.py, plain ASGI) refuses a request without the token (--token) and
a body over the size limit before reading it, gives every request an id and one access-log line
with its decode / queue / inference times, and counts requests for /metrics.

A prediction request is admitted if fewer than `queue_size` are in flight (else 503 with
Retry-After). Each upload's width x height is read from its header before anything is decoded:
above `max_image_pixels` it is answered 413 and never decoded; the request then waits until its
decoded pixels fit under `pixels_in_memory` (all requests together; more than that alone: 413),
so no request can make the server swell. Uploads are decoded in memory (nothing a client sends
becomes a path on disk) on a pool of threads, one per core, off the event loop. The model runs
on one thread (utils/service/batching.py) that puts images of the same size from any requests
into one forward pass. Every bad request gets a 4xx with a reason naming the file: 413 too large
or too many, 415 not an image of a format read here (by its bytes, whatever type is declared),
422 undecodable, truncated or too thin for the model's working size.

Detections are returned down to `DETECTION_FLOOR` (the threshold, when lower), each with its score, plus the
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
import io
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from torchvision.ops import box_iou

from .. import defaults as D
from .. import errors
from ..classes import CLASS_COLOURS, CLASSES, LABEL_OF
from ..data.images import ImageError, NotAnImageError, PixelLimitError, check_image_pixels
from ..detection.compliance import compliance, merge_compliance
from ..detection.evaluation import load_trained_model
from ..detection.explain import ExplainError, stop_point
from ..detection.inference import above, detect, detection_floor, too_thin
from ..detection.quantify import prediction_estimates, soft_counts
from .batching import BatchWorker, Withdrawal, on_a_passing_thread, results_of, stage_seconds
from .edge import EdgeMiddleware, shown_path, shown_request
from .metrics import CONTENT_TYPE_LATEST, ServiceMetrics
from .uploads import (AdmissionQueue, PixelBudget, Upload, annotated_jpeg, decode_to_tensor, default_decode_threads,
                      detect_as_predict, detection_records, explain_as_predict, explanation_record, model_pixels,
                      model_sized_input, on_pool, parse_box, until_disconnected, upload_name)

DETECTION_FLOOR = D.DETECTION_FLOOR  # lowest score returned: below it a box is noise at any threshold a user would pick
MATCH_IOU = D.SERVICE_EXPLAIN_MATCH_IOU  # /api/explain: the model's box of that class overlapping the given one
PAGE = Path(__file__).with_name("page.html")  # the web page at /: plain HTML and JS, no build step, no CDN
PROTECTED = ("/api/model", "/api/predict", "/api/explain")  # need the token when one is set; probes never do
FILE_FIELDS = {"/api/predict": "files", "/api/explain": "file"}  # each upload route's multipart field of images
PROBES = ("/livez", "/readyz", "/api/health", "/metrics")  # answered even when --max-requests are in flight


@dataclass
class ServiceConfig:
    model_path: Path
    device: str = "cpu"
    max_upload_mb: float = D.SERVICE_MAX_UPLOAD_MB
    max_images: int = D.SERVICE_MAX_IMAGES
    queue_size: int = D.SERVICE_QUEUE_SIZE
    token: str | None = None
    explain_max_boxes: int = D.EXPLAIN_MAX_BOXES
    max_image_pixels: int = D.SERVICE_MAX_IMAGE_PIXELS
    pixels_in_memory: int = D.SERVICE_PIXELS_IN_MEMORY
    batch_size: int = D.SERVICE_BATCH_SIZE
    batch_max_pixels: int = D.SERVICE_BATCH_MAX_PIXELS
    batch_wait_ms: float = D.SERVICE_BATCH_WAIT_MS
    decode_threads: int | None = D.SERVICE_DECODE_THREADS
    stop_timeout: float = D.SERVICE_STOP_TIMEOUT_S
    max_requests: int = D.SERVICE_MAX_REQUESTS
    body_timeout: float = D.SERVICE_BODY_TIMEOUT_S
    min_body_rate_kbs: float = D.SERVICE_MIN_BODY_RATE_KBS
    body_deadline: float = D.SERVICE_BODY_DEADLINE_S  # 0: none
    max_requests_per_client: int | None = None  # None: SERVICE_CLIENT_SHARE_OF_REQUESTS of max_requests; 0: no limit

    @property
    def client_limit(self) -> int | None:
        """Requests one client address may have in the app at once; None: no such limit."""
        if self.max_requests_per_client is None:
            return max(1, int(self.max_requests * D.SERVICE_CLIENT_SHARE_OF_REQUESTS))
        return self.max_requests_per_client or None

    @property
    def client_queue_limit(self) -> int | None:
        """Admitted requests one client address may hold at once: its share of max_requests, of queue_size."""
        share = self.client_limit
        return None if share is None else max(1, self.queue_size * min(share, self.max_requests) // self.max_requests)

    @property
    def max_body_bytes(self) -> int:
        """The largest request body: every image at its largest, plus the multipart framing."""
        return int((self.max_images * self.max_upload_mb + D.SERVICE_REQUEST_OVERHEAD_MB) * 2**20)


def create_app(config: ServiceConfig) -> FastAPI:
    device = torch.device(config.device)
    # Not on this (the main) thread: see batching.py on OpenMP teams.
    model, meta, default_threshold, threshold_source = on_a_passing_thread(load_trained_model, config.model_path,
                                                                            device)
    queue = AdmissionQueue(config.queue_size, config.client_queue_limit)
    max_bytes = int(config.max_upload_mb * 2**20)
    metrics = ServiceMetrics()
    decode_threads = config.decode_threads or default_decode_threads()

    def run_batch(tensors: list[torch.Tensor], tta: bool) -> list[dict]:
        """The model on images of one size (batching.py), on the inference thread; boxes in their pixels."""
        inputs = [model_sized_input(model, t, device) for t in tensors]
        # down to any request's threshold: one under the floor counts the boxes predict counts there (flip TTA's
        # fused boxes can score under it); each request keeps those down to its own (detection_floor)
        outputs = detect(model, [image for image, _ in inputs], tta=tta, score_threshold=0.0)
        for out, (_, back) in zip(outputs, inputs):
            if back is not None:
                out["boxes"] = out["boxes"] * torch.tensor([back[0], back[1], back[0], back[1]])
        return outputs

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.worker = BatchWorker(run_batch, config.batch_size, config.batch_max_pixels,
                                       config.batch_wait_ms / 1000, on_batch=metrics.batch_images.observe)
        app.state.decoder = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="decode")
        app.state.budget = PixelBudget(config.pixels_in_memory)
        metrics.queue_images.set_function(app.state.worker.depth)
        metrics.pixels_held.set_function(lambda: app.state.budget.held)
        try:
            yield
        finally:
            # uvicorn has waited for the requests in flight (at most --stop-timeout), then cancelled the rest:
            # their jobs are dropped, the one on the model finishes (waited for at most --stop-timeout again),
            # then the threads stop. Off the event loop, so that the cut-off requests' 503s go out meanwhile.
            deadline = app.state.stop_deadline  # bin/serve.py: SIGTERM's time + --stop-timeout
            await asyncio.to_thread(app.state.worker.close, config.stop_timeout if deadline is None
                                    else max(0.0, deadline - time.monotonic()))
            await asyncio.to_thread(app.state.decoder.shutdown, wait=True, cancel_futures=True)

    app = FastAPI(title="mask-detection service",
                  description="Face-mask detection and the share of faces properly masked, from a model.pt "
                              "trained by the mask-detection workflow.",
                  version="1.0", lifespan=lifespan)
    app.state.config, app.state.queue, app.state.metrics = config, queue, metrics
    app.state.stopping = False  # set by bin/serve.py on SIGTERM: /readyz turns 503 while requests finish
    app.state.stop_deadline = None  # set with it: time.monotonic() by which the stop is to be done
    metrics.requests_admitted.set_function(lambda: queue.waiting)
    app.add_middleware(EdgeMiddleware, token=config.token, protected=PROTECTED, max_body_bytes=config.max_body_bytes,
                       metrics=metrics, max_requests=config.max_requests, probes=PROBES,
                       body_timeout=config.body_timeout, min_body_rate=config.min_body_rate_kbs * 1024,
                       body_deadline=config.body_deadline or None, max_requests_per_client=config.client_limit)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        """The web page: choose or drop photos, see the boxes, move the threshold, read the compliance."""
        return PAGE.read_text(encoding="utf-8")

    @app.get("/api/health")
    def health() -> dict:
        """The model file and the admission queue."""
        return {"status": "ok", "model": config.model_path.name, "device": str(device),
                "queue": {"waiting": queue.waiting, "limit": queue.limit}}

    @app.get("/livez")
    def livez() -> dict:
        """Liveness: the process answers (a restart is only needed when this fails)."""
        return {"status": "alive"}

    @app.get("/readyz")
    def readyz(request: Request):
        """Readiness: model loaded, queue not full, not stopping; 503 with the reasons otherwise."""
        worker = getattr(request.app.state, "worker", None)
        reasons = []
        if worker is None or not worker.alive():
            reasons.append("the model's worker is not running")
        if queue.waiting >= queue.limit:
            reasons.append(f"queue full ({queue.waiting} of {queue.limit} requests in flight)")
        if request.app.state.stopping:
            reasons.append("stopping (SIGTERM): finishing the requests in flight")
        body = {"status": "not ready" if reasons else "ready", "reasons": reasons,
                "queue": {"waiting": queue.waiting, "limit": queue.limit}}
        return JSONResponse(body, status_code=503 if reasons else 200)

    @app.get("/metrics", include_in_schema=False)
    def metrics_page() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/model")
    def model_info() -> dict:
        """What the model is: classes, backbone, image size, operating threshold, training record."""
        colours = {name: "#%02x%02x%02x" % rgb for name, rgb in CLASS_COLOURS.items()}
        return {"classes": list(CLASSES), "colours": colours,
                "backbone": meta.get("backbone"), "image_size": meta.get("image_size"),
                **{key: meta.get(key) for key in ("working_size", "working_size_source", "tta", "tta_source")},
                **{key: meta.get(key) for key in ("box_voting", "box_vote_iou", "box_voting_source")},
                "score_threshold": default_threshold, "score_threshold_source": threshold_source,
                "operating_threshold": meta.get("operating_threshold"), "detection_floor": DETECTION_FLOOR,
                "epochs_completed": meta.get("epochs_completed"), "training": meta.get("training"),
                "num_train_images": meta.get("num_train_images"), "num_val_images": meta.get("num_val_images"),
                "limits": {"max_upload_mb": config.max_upload_mb, "max_images": config.max_images}}

    def admit(request: Request) -> str | None:
        """The request's client address once admitted (503 when the queue is full, 429 when the client holds its
        share). No refusal when stopping: uvicorn takes no new connections then, and a request already received
        (its body may still be arriving) is one in flight, to be finished."""
        client = request.client.host if request.client else None  # the edge's address (X-Forwarded-For: bin/serve.py)
        queue.enter(f"{request.method} {shown_path(request.url.path)}", client)
        return client

    async def read_upload(request: Request, upload: UploadFile) -> Upload:
        """The upload and its size from the header, nothing decoded; 413/415/422 naming the file."""
        # the bytes decide, not the declared type (curl declares a .jfif, .tif or a name without extension
        # application/octet-stream): a photo is what the jobs read (data.images.IMAGE_FORMATS), with their reasons
        name = upload_name(upload)
        size = upload.size if upload.size is not None else upload.file.seek(0, io.SEEK_END)
        if size > max_bytes:
            raise HTTPException(413, f"{name}: larger than {config.max_upload_mb:g} MB (--max-upload-mb)")
        try:
            # on the pool too: a header is small, but some formats make Pillow read (and inflate) chunks first
            width, height = await asyncio.get_running_loop().run_in_executor(
                request.app.state.decoder, check_image_pixels, upload.file, config.max_image_pixels, name)
        except PixelLimitError as error:
            raise HTTPException(413, str(error)) from None
        except NotAnImageError as error:  # the type a client declares is not trusted: the bytes must be one
            raise HTTPException(415, str(error)) from None
        except ImageError as error:
            raise HTTPException(422, str(error)) from None
        thin = too_thin(model, height, width)  # from the header: nothing decoded for it
        if thin:
            raise HTTPException(422, f"{name}: {thin}; crop or pad it to a less elongated shape")
        upload.file.seek(0)
        return Upload(name, upload.file, width, height)

    async def decode_all(request: Request, uploads: list[Upload], announce: bool) -> list[torch.Tensor]:
        """The uploads as uint8 tensors, decoded on the pool in parallel; at the first bad one the decodes not
        begun are not begun, and the answer (422, or 413 for pixels) names the first bad one in upload order of
        those decoded."""
        worker = request.app.state.worker
        if announce:
            worker.expect(len(uploads))
        decoded = False
        try:
            tensors = await on_pool(request.app.state.decoder, decode_to_tensor, [(u.file, u.name) for u in uploads])
            decoded = True
            return tensors
        except ImageError as error:
            raise HTTPException(413 if isinstance(error, PixelLimitError) else 422, str(error)) from None
        finally:
            if announce and not decoded:  # the worker no longer waits for these images to join its batches
                worker.expect(-len(uploads))

    async def holding_pixels(request: Request, uploads: list[Upload], work):
        """await work() while the uploads' decoded pixels are counted against pixels_in_memory."""
        pixels = sum(u.width * u.height for u in uploads)
        if pixels > config.pixels_in_memory:
            raise HTTPException(413, f"{request.method} {shown_path(request.url.path)}: {len(uploads)} images of "
                                     f"{pixels:,} pixels in one request; at most {config.pixels_in_memory:,}: send "
                                     "fewer or smaller images")
        budget = request.app.state.budget
        await budget.acquire(pixels)
        try:
            return await work()
        finally:
            await budget.release(pixels)

    def record_timings(request: Request, decode_s: float, timings: list, images: int) -> None:
        stages = {"decode": decode_s, **stage_seconds(timings)}
        request.state.timings.update(**stages, images=images)
        for stage, seconds in stages.items():
            metrics.stage.labels(stage).observe(seconds)

    def explain_one(tensor: torch.Tensor, given, out: dict, index: int, tta: bool, stop) -> dict:
        """The explanation record of detection *index* of one image on *given*, its model input (a forward and a
        backward pass, two under TTA): one job on the model's thread, so that an explain=true request of 16 images
        never holds it for all its boxes at once. *stop* set (the request stopped waiting): no pass begins."""
        one = slice(index, index + 1)
        explanation = explain_as_predict(model, tensor, out["boxes"][one], out["labels"][one], out["scores"][one],
                                         device, D.EXPLAIN_METHOD, 1, tta, should_stop=stop.is_set, given=given)[0]
        return explanation_record(explanation, D.EXPLAIN_METHOD)

    async def explain_best(worker: BatchWorker, tensors: list, outputs: list, tta: bool, threshold: float,
                           timings: list, withdrawal: Withdrawal) -> list[dict]:
        """{detection index: explanation} per image, for its best `explain_max_boxes` counted detections, on its
        model input made once (on the decode pool). The jobs are submitted one at a time, each when the last is
        done: other requests' images queued meanwhile run between them (one call for all held others 20+ s)."""
        explained = [{} for _ in tensors]
        for tensor, out, found in zip(tensors, outputs, explained):
            counted = (out["scores"] >= threshold).nonzero().flatten()
            best = counted[torch.argsort(out["scores"][counted], descending=True)][: config.explain_max_boxes]
            given = (await on_pool(app.state.decoder, model_pixels, [(model, tensor)]))[0] if len(best) else None
            for index in best.tolist():
                future, timing = worker.submit_call(explain_one, tensor, given, out, index, tta, withdrawal.stop)
                timings.append(timing)
                found[index] = (await results_of([future], withdrawal))[0]
        return explained

    def explain_box(tensor: torch.Tensor, box: list[float], label: int, method: str, stop):
        """The explanation of the model's detection of class *label* at *box*, or None if it finds none there.
        The box is looked for among the detections /api/predict returns (with flip TTA when the model chose it);
        the heat map is the evidence of the passes that made it (both, under flip TTA). *stop* set (the request
        stopped waiting: its client left): no further pass begins (explain.ExplainStopped)."""
        stop_point(stop.is_set)  # withdrawn as the worker took this job
        given = model_pixels(model, tensor)  # the model's input for the detection and the explanation
        out = detect_as_predict(model, tensor, device, meta["tta"], DETECTION_FLOOR, given)
        stop_point(stop.is_set)  # the client left during the detection pass
        candidates = (out["labels"] == label).nonzero().flatten()
        if len(candidates) == 0:
            return None
        ious = box_iou(torch.tensor([box]), out["boxes"][candidates])[0]
        best = int(ious.argmax())
        if not float(ious[best]) > MATCH_IOU:  # NaN too: never explain a detection the box does not match
            return None
        index = candidates[best: best + 1]
        return explain_as_predict(model, tensor, out["boxes"][index], out["labels"][index], out["scores"][index],
                                  device, method, 1, meta["tta"], should_stop=stop.is_set, given=given)[0]

    # The multipart parser refuses, while the body streams, a file part past the route's count and any text field
    # (Starlette's defaults, 1000 files and 1000 fields of up to 1 MB each, let a request hold a GB before the
    # route ran); one_line_errors below names the limit.
    @app.post("/api/predict", form_limits={"max_files": config.max_images, "max_fields": 0, "max_part_size": 1024})
    async def predict(request: Request,
                      files: list[UploadFile] = File(..., description="one or more images (field `files`, repeatable)"),
                      score_threshold: float | None = Query(None, ge=0.0, le=1.0, allow_inf_nan=False,
                                                            description="count detections at or above this score "
                                                                        "(default: the model's operating threshold)"),
                      tta: bool | None = Query(None, description="also run each image flipped and fuse both "
                                                                 "passes' boxes (about 2x slower) (default: the "
                                                                 "model's choice, made on its validation images)"),
                      annotated: bool = Query(False, description="include each image with its boxes drawn, "
                                                                 "as a JPEG data URL (its longer side at most "
                                                                 f"{D.SERVICE_ANNOTATED_MAX_SIDE} px)"),
                      explain: bool = Query(False, description="add to each of the best counted detections of "
                                                               "an image (at most --explain-max-boxes) an "
                                                               "`explanation`: a HiResCAM heat map of its class "
                                                               "evidence over a crop around it (JPEG data URL); "
                                                               "a backward pass per box")) -> dict:
        """Detections (down to the detection floor, with scores) and compliance per image and overall."""
        threshold = default_threshold if score_threshold is None else score_threshold
        tta = meta["tta"] if tta is None else tta
        client = admit(request)
        withdrawal = Withdrawal()
        try:
            uploads = [await read_upload(request, upload) for upload in files]
            worker = request.app.state.worker

            async def decode_detect_and_draw():
                # Everything that holds the decoded pixels happens in here, while they count against the budget
                # and the request holds its place in the queue; only sizes, boxes and JPEG text leave.
                began = time.perf_counter()
                tensors = await decode_all(request, uploads, announce=True)
                decoded = time.perf_counter()
                submitted = [worker.submit_image(tensor, tta) for tensor in tensors]
                outputs = [above(out, detection_floor(threshold))
                           for out in await results_of([future for future, _ in submitted], withdrawal)]
                explained, timings = [{} for _ in tensors], [timing for _, timing in submitted]
                if explain:
                    explained = await explain_best(worker, tensors, outputs, tta, threshold, timings, withdrawal)
                record_timings(request, decoded - began, timings, len(tensors))
                pictures = [None] * len(tensors)
                if annotated:  # drawing and JPEG-encoding a large photo takes a while: not on the event loop
                    pictures = await on_pool(request.app.state.decoder, annotated_jpeg,
                                             [(tensor, out, threshold) for tensor, out in zip(tensors, outputs)])
                return [tuple(tensor.shape[-2:]) for tensor in tensors], outputs, explained, pictures

            sizes, outputs, explained, pictures = await until_disconnected(
                request, holding_pixels(request, uploads, decode_detect_and_draw), withdrawal)
        finally:
            queue.leave(client)
        results, records = [], []
        for upload, (height, width), out, explanations, picture in zip(uploads, sizes, outputs, explained, pictures):
            detections = detection_records(out)
            for index, explanation in explanations.items():
                detections[index]["explanation"] = explanation
            counted = [d for d, kept in zip(detections, (out["scores"] >= threshold).tolist()) if kept]  # as predict
            record = {"file": upload.name, "width": int(width), "height": int(height),
                      "detections": detections, "compliance": compliance([d["label"] for d in counted])}
            if annotated:
                record["annotated"] = picture
            results.append(record)
            for d in counted:
                metrics.faces.labels(d["label"]).inc()
            records.append({"soft_counts": soft_counts(out["labels"].tolist(), out["scores"].tolist()),
                            "detections": counted})
        metrics.images.inc(len(results))
        # quantify.estimate draws the images in the order of their counts, not their names: whatever the order and the
        # names they are sent with (the page sends no folder), the same photos get the interval predict gives them
        # the bootstrap is CPU work: off the event loop, as inference is
        estimates = await asyncio.to_thread(prediction_estimates, records, meta.get("quantification"), threshold, tta,
                                            working_size=meta.get("working_size"))
        return {"model": config.model_path.name, "score_threshold": threshold,
                "score_threshold_source": "query" if score_threshold is not None else threshold_source,
                "tta": tta, "images": results, "overall": merge_compliance(r["compliance"] for r in results),
                **estimates}

    @app.post("/api/explain", form_limits={"max_files": 1, "max_fields": 0, "max_part_size": 1024})
    async def explain_detection(request: Request,
                                file: UploadFile = File(..., description="the image (one)"),
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
            raise HTTPException(422, f"label {errors.shown(label)}: not one of {', '.join(CLASSES)}")
        if method not in D.EXPLAIN_METHODS:
            raise HTTPException(422, f"method {errors.shown(method)}: not one of {', '.join(D.EXPLAIN_METHODS)}")
        client = admit(request)
        withdrawal = Withdrawal()
        try:
            upload = await read_upload(request, file)

            async def decode_and_explain():
                began = time.perf_counter()
                tensor = (await decode_all(request, [upload], announce=False))[0]
                decoded = time.perf_counter()
                future, timing = request.app.state.worker.submit_call(explain_box, tensor, coordinates,
                                                                      LABEL_OF[label], method, withdrawal.stop)
                try:
                    found = (await results_of([future], withdrawal))[0]
                finally:
                    record_timings(request, decoded - began, [timing], 1)
                return found

            explanation = await until_disconnected(request, holding_pixels(request, [upload], decode_and_explain),
                                                   withdrawal)
        except ExplainError as error:
            raise HTTPException(422, f"{config.model_path.name}: {error}") from None
        finally:
            queue.leave(client)
        if explanation is None:
            raise HTTPException(422, f"{upload.name}: the model finds no {label} detection overlapping box {box} "
                                     f"(IoU > {MATCH_IOU}); send a box /api/predict returned")
        return {"file": upload.name, "label": label, "box": explanation.box, "score": explanation.score,
                **explanation_record(explanation, method)}

    @app.exception_handler(StarletteHTTPException)  # FastAPI's HTTPException, and the multipart parser's
    async def one_line_errors(request: Request, error: StarletteHTTPException):
        status, detail = error.status_code, error.detail
        where, field = shown_request(request.method, request.url.path), FILE_FIELDS.get(request.url.path, "files")
        if status == 400 and str(detail).startswith("Too many files"):
            status, detail = 413, (f"{where}: more than {config.max_images} files in one request; at most "
                                   f"{config.max_images} (--max-images)" if request.url.path == "/api/predict"
                                   else f"{where}: more than one file; send one image (field `file`)")
        elif status == 400 and str(detail).startswith("Too many fields"):
            status, detail = 422, (f"{where}: a form field that is not a file; send only images, as file parts "
                                   f"(field `{field}`)")
        elif status == 400:  # the parser's own words ("Invalid multipart data.", "Missing boundary in multipart.", or
            # FastAPI's "There was an error parsing the body") named neither the request nor what it reads
            detail = (f"{where}: not a multipart form read here ({str(detail).rstrip('.')}); send the images as "
                      f"multipart/form-data file parts (field `{field}`)")
        elif status in (404, 405):  # the router's bare "Not Found" and "Method Not Allowed": of which request
            allowed = (error.headers or {}).get("Allow")
            detail = f"{where}: {str(detail).lower()}" + (f" (this path takes {allowed})" if allowed else "")
        return JSONResponse({"detail": detail}, status_code=status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def one_line_validation_errors(request: Request, error: RequestValidationError):
        """FastAPI's own answer is a list that echoes each bad value whole: one line, values bounded."""
        problems = []
        for problem in error.errors()[:3]:
            where = " ".join(str(part) for part in problem.get("loc", ()))
            given = problem.get("input")
            shown = f" (got {errors.shown(str(given))})" if isinstance(given, (str, int, float)) else ""
            problems.append(f"{where}: {problem.get('msg', 'invalid')}{shown}")
        return JSONResponse({"detail": f"{request.method} {shown_path(request.url.path)}: {'; '.join(problems)}"},
                            status_code=422)

    return app
