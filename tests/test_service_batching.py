"""Batched inference (utils/service/batching.py) gives the answers single images get, and the service is
observable: /metrics in Prometheus text format, /livez and /readyz, one access-log line per request."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from utils.classes import LABEL_OF  # noqa: E402
from utils.detection.evaluation import load_trained_model  # noqa: E402
from utils.detection.inference import detect, to_model_input  # noqa: E402
from utils.service.app import DETECTION_FLOOR, ServiceConfig, create_app  # noqa: E402
from utils.service.batching import BatchWorker  # noqa: E402


def as_tensor(path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


@pytest.mark.slow
def test_images_from_several_submitters_share_a_pass_and_get_their_single_answers(tiny_model_file, sample_dir):
    model, *_ = load_trained_model(tiny_model_file, "cpu")
    tensors = [as_tensor(p) for p in sorted((sample_dir / "images").glob("*.jpg"))[:4]]  # all 160x120
    odd = tensors[0][:, :100, :150].contiguous()  # another size: never in their batch (padding would change it)

    def run_batch(batch, tta):
        return detect(model, [to_model_input(t, "cpu") for t in batch], tta=tta, score_threshold=DETECTION_FLOOR)

    worker = BatchWorker(run_batch, batch_size=4, batch_max_pixels=10**8, wait_s=0.005)
    release = threading.Event()
    try:
        blocker, _ = worker.submit_call(release.wait, 30)  # holds the worker while everything queues up
        submitted = [worker.submit_image(t, False) for t in tensors] + [worker.submit_image(odd, False)]
        release.set()
        answers = [future.result(60) for future, _ in submitted]
        blocker.result(60)
    finally:
        worker.close(60)
    assert [timing.batch_images for _, timing in submitted] == [4, 4, 4, 4, 1]
    singles = [run_batch([t], False)[0] for t in tensors + [odd]]
    for batched, single in zip(answers, singles):
        assert_same_detections(batched, single)


def assert_same_detections(a: dict, b: dict, box_tol: float = 1e-2, score_tol: float = 1e-4) -> None:
    """Equal up to float noise; the order of near-tied scores may differ, so each box is matched."""
    assert len(a["scores"]) == len(b["scores"])
    torch.testing.assert_close(a["scores"].sort().values, b["scores"].sort().values, atol=score_tol, rtol=0)
    for box, label, score in zip(a["boxes"], a["labels"], a["scores"]):
        same = (b["labels"] == label) & ((b["scores"] - score).abs() <= score_tol)
        assert same.any() and float((b["boxes"][same] - box).abs().max(dim=1).values.min()) <= box_tol


@pytest.fixture(scope="module")
def client(tiny_model_file):
    with TestClient(create_app(ServiceConfig(model_path=tiny_model_file))) as c:
        yield c


def test_one_request_of_several_images_answers_as_single_requests(client, sample_dir):
    photos = sorted((sample_dir / "images").glob("*.jpg"))[:3]
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in photos]
    together = client.post("/api/predict?score_threshold=0.05", files=files).json()["images"]
    alone = [client.post("/api/predict?score_threshold=0.05", files=[f]).json()["images"][0] for f in files]
    for a, b in zip(together, alone):
        assert_same_detections(*({"boxes": torch.tensor([d["box"] for d in image["detections"]]).reshape(-1, 4),
                                  "labels": torch.tensor([LABEL_OF[d["label"]] for d in image["detections"]]),
                                  "scores": torch.tensor([d["score"] for d in image["detections"]])}
                                 for image in (a, b)), box_tol=0.2, score_tol=2e-4)


def test_a_photo_larger_than_the_model_works_at_answers_as_predict_counts_it(client, tiny_model_file, sample_dir,
                                                                              tmp_path):
    """The service shrinks a photo to the model's working size before the model would (less memory), as predict's
    decode workers shrink it (inference.pixels_for_model): the answer is predict's on the same photo, boxes in the
    photo's pixels."""
    from utils.detection.compliance import listed_score
    from utils.detection.inference import ImageItem, detect_files

    def listed(scores):  # as predict and the service list a score: 4 decimals, cut down (not rounded)
        return torch.tensor([listed_score(score) for score in scores.tolist()])

    photo = sorted((sample_dir / "images").glob("*.jpg"))[1]
    Image.open(photo).convert("RGB").resize((640, 480)).save(tmp_path / "big.png")  # 5x the tiny model's 128 px
    served = client.post("/api/predict", files=[("files", ("big.png", (tmp_path / "big.png").read_bytes(),
                                                            "image/png"))]).json()
    model, *_ = load_trained_model(tiny_model_file, "cpu")
    (alone,) = detect_files(model, [ImageItem("big.png", tmp_path / "big.png")], "cpu",
                            score_threshold=DETECTION_FLOOR, num_workers=0)
    detections = served["images"][0]["detections"]
    assert detections and (served["images"][0]["width"], served["images"][0]["height"]) == (640, 480)
    assert_same_detections({"boxes": torch.tensor([d["box"] for d in detections]),
                            "labels": torch.tensor([LABEL_OF[d["label"]] for d in detections]),
                            "scores": torch.tensor([d["score"] for d in detections])},
                           {"boxes": alone.boxes, "labels": alone.labels, "scores": listed(alone.scores)},
                           box_tol=0.051, score_tol=1.5e-4)  # boxes to 1 decimal; a score a hair off a cut: one step


def test_metrics_probes_and_one_access_line_per_request(client, sample_dir, caplog):
    photo = sorted((sample_dir / "images").glob("*.jpg"))[0]
    with caplog.at_level(logging.INFO, logger="mask_service.access"):
        answer = client.post("/api/predict?score_threshold=0", headers={"X-Request-ID": "req-42"},
                             files=[("files", ("a.jpg", photo.read_bytes(), "image/jpeg"))])
    assert answer.status_code == 200 and answer.headers["x-request-id"] == "req-42"
    faces = {}
    for d in answer.json()["images"][0]["detections"]:
        faces[d["label"]] = faces.get(d["label"], 0) + 1
    lines = [r.getMessage() for r in caplog.records if r.name == "mask_service.access"]
    assert len(lines) == 1 and lines[0].startswith("id=req-42 POST /api/predict 1.1 200 total_ms=")
    assert all(f" {stage}_ms=" in lines[0] for stage in ("decode", "queue", "inference")) and " images=1 " in lines[0]

    assert client.get("/livez").json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"

    from prometheus_client.parser import text_string_to_metric_families

    scraped = client.get("/metrics")
    assert scraped.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(scraped.text) for s in family.samples}
    assert samples[("mask_service_requests_total", (("route", "/api/predict"), ("status", "200")))] >= 1
    assert samples[("mask_service_requests_total", (("route", "/livez"), ("status", "200")))] >= 1
    assert samples[("mask_service_request_duration_seconds_count", (("route", "/api/predict"),))] >= 1
    assert ("mask_service_stage_seconds_count", (("stage", "inference"),)) in samples
    assert samples[("mask_service_queue_images", ())] == 0
    assert samples[("mask_service_images_total", ())] >= 1
    for name in ("with_mask", "without_mask", "mask_weared_incorrect"):
        assert samples[("mask_service_faces_total", (("class", name),))] >= faces.get(name, 0)
    assert sum(v for (n, _), v in samples.items() if n == "mask_service_faces_total") >= sum(faces.values())
    client.get("/no/such/page")
    again = client.get("/metrics").text
    assert 'route="other",status="404"' in again and "/no/such/page" not in again


def test_a_passing_thread_returns_the_result_and_raises_the_error_in_the_caller():
    import threading

    from utils.service.batching import on_a_passing_thread

    assert on_a_passing_thread(lambda: threading.current_thread() is threading.main_thread()) is False
    assert on_a_passing_thread(lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(KeyError, match="missing"):
        on_a_passing_thread(lambda: {}["missing"])


def test_a_request_that_stops_waiting_never_ends_the_worker_thread():
    """A waiting request cancelled (the stop timeout, asyncio.wrap_future) cancels its job's future: the worker
    drops that job and serves the next ones, where setting the cancelled future's result used to kill it."""
    release = threading.Event()
    worker = BatchWorker(lambda batch, tta: [t.shape[-1] for t in batch], batch_size=4, batch_max_pixels=10**8,
                         wait_s=0.0)
    try:
        blocker, _ = worker.submit_call(release.wait, 30)
        gone, _ = worker.submit_image(torch.zeros(3, 2, 5), False)
        gone_call, _ = worker.submit_call(lambda: "never")
        assert gone.cancel() and gone_call.cancel()  # pending: cancelled, as wrap_future does
        release.set()
        assert blocker.result(30) is True
        later, _ = worker.submit_image(torch.zeros(3, 2, 7), False)
        assert later.result(30) == 7  # the thread lives: the next request is answered, not left hanging
        assert worker.alive()
    finally:
        release.set()
        worker.close(30)


def test_an_explain_request_lets_other_requests_run_between_its_boxes(tiny_model_file, sample_dir, monkeypatch):
    """explain=true costs a backward pass per box: its boxes are one job each, submitted one after another, so
    another request's image queued meanwhile runs before the next box, where one call for all of them held the
    model's thread (20+ s for 16 images) while every other client waited."""
    import utils.service.app as service

    order, first_box, release = [], threading.Event(), threading.Event()
    real_explain, real_detect = service.explain_as_predict, service.detect

    def recorded_explain(*args, **kwargs):
        order.append("explain")
        if not first_box.is_set():
            first_box.set()
            release.wait(30)
        return real_explain(*args, **kwargs)

    def recorded_detect(*args, **kwargs):
        order.append("detect")
        return real_detect(*args, **kwargs)

    monkeypatch.setattr(service, "explain_as_predict", recorded_explain)
    monkeypatch.setattr(service, "detect", recorded_detect)
    photo = sorted((sample_dir / "images").glob("*.jpg"))[0].read_bytes()
    app = create_app(ServiceConfig(model_path=tiny_model_file, explain_max_boxes=3))
    answers = {}
    with TestClient(app) as c:
        explaining = threading.Thread(target=lambda: answers.update(explain=c.post(
            "/api/predict?explain=true&score_threshold=0", files=[("files", ("e.jpg", photo, "image/jpeg"))])))
        explaining.start()
        assert first_box.wait(60)  # the explain request's first box is on the model's thread
        other = threading.Thread(target=lambda: answers.update(other=c.post(
            "/api/predict", files=[("files", ("o.jpg", photo, "image/jpeg"))])))
        other.start()
        for _ in range(600):  # until the other request's image waits for the model
            if app.state.worker.depth() >= 1:
                break
            threading.Event().wait(0.05)
        release.set()
        explaining.join(120)
        other.join(120)
    assert answers["explain"].status_code == 200 and answers["other"].status_code == 200
    explained = [d for d in answers["explain"].json()["images"][0]["detections"] if "explanation" in d]
    assert len(explained) == 3 and order.count("explain") == 3
    assert order[:3] == ["detect", "explain", "detect"], order  # the other request ran between the boxes


@pytest.mark.slow  # over 5 s on a quiet 2-core machine
def test_an_explain_request_reduces_a_large_picture_once_not_once_a_box(tiny_model_file, sample_dir, monkeypatch):
    """explain=true on a picture larger than the model's size: its detections and each box's explanation run on the
    picture reduced as predict reduces it (uploads.model_pixels). The reduction (a Lanczos resize of the whole
    upload, 25 M pixels at most) was made again for every box explained, on the model's thread; now once for the
    detections and once for all the explanations, the explanations unchanged."""
    import io

    import utils.service.uploads as uploads
    from utils import defaults as D

    reductions = []
    real_pixels_for_model = uploads.pixels_for_model

    def counted(model, pixels, bound):
        reductions.append(tuple(pixels.shape))
        return real_pixels_for_model(model, pixels, bound)

    monkeypatch.setattr(uploads, "pixels_for_model", counted)
    buffer = io.BytesIO()
    photo = Image.open(sorted((sample_dir / "images").glob("*.jpg"))[1]).convert("RGB").resize((640, 480))
    photo.save(buffer, format="PNG")  # 5x the tiny model's 128 px
    with TestClient(create_app(ServiceConfig(model_path=tiny_model_file, explain_max_boxes=3))) as c:
        answer = c.post("/api/predict?explain=true&score_threshold=0",
                        files=[("files", ("big.png", buffer.getvalue(), "image/png"))])
        assert answer.status_code == 200, answer.text
        detections = answer.json()["images"][0]["detections"]
        explained = [index for index, d in enumerate(detections) if "explanation" in d]
        assert len(explained) == 3
        assert reductions == [(3, 480, 640)] * 2, reductions
        box = ",".join(str(v) for v in detections[explained[0]]["box"])
        one = c.post(f"/api/explain?box={box}&label={detections[explained[0]]['label']}",
                     files=[("file", ("big.png", buffer.getvalue(), "image/png"))])
        assert one.status_code == 200, one.text
        assert reductions == [(3, 480, 640)] * 3, reductions  # /api/explain: one for its detection and explanation
    model, meta, *_ = load_trained_model(tiny_model_file, "cpu")
    picture = torch.from_numpy(np.array(photo)).permute(2, 0, 1)
    out = uploads.detect_as_predict(model, picture, "cpu", meta["tta"], DETECTION_FLOOR)
    for index in explained:  # as each box explained alone, its picture reduced for it
        one = slice(index, index + 1)
        (alone,) = uploads.explain_as_predict(model, picture, out["boxes"][one], out["labels"][one],
                                              out["scores"][one], "cpu", D.EXPLAIN_METHOD, 1, meta["tta"])
        assert round(alone.evidence_in_box, 4) == detections[index]["explanation"]["evidence_in_box"]
