"""No request can hold the service's places for longer than its work, nor leave work behind it: a trickling
body is cut off (the edge's minimum rate), and a steady one at its deadline, waiters for the pixel budget are
served in order, a request's pixels stay counted until its annotated pictures are drawn, a request that fails
or whose client leaves withdraws its images still queued for the model, and a stop reports an abandoned model
job only when one was running. No timings are asserted: generous timeouts only turn a hang into a failure."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

import pytest
import torch

fastapi = pytest.importorskip("fastapi")
from fastapi import HTTPException  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from utils.service.app import ServiceConfig, create_app  # noqa: E402
from utils.service.batching import BatchWorker, Timing, results_of, stage_seconds  # noqa: E402
from utils.service.edge import EdgeMiddleware  # noqa: E402
from utils.service.metrics import ServiceMetrics  # noqa: E402
from utils.service.uploads import CLIENT_CLOSED, PixelBudget, on_pool, until_disconnected  # noqa: E402

HANG = 20  # seconds before a wait is called a hang


async def _reads_the_body_then_answers(scope, receive, send):
    while (message := await receive())["type"] == "http.request" and message.get("more_body"):
        pass
    if message["type"] == "http.disconnect":
        raise RuntimeError("client gone")  # as the multipart parser does
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _post_with_body(chunk: bytes, pause_s: float, chunks: int, **limits) -> tuple[int, bytes]:
    """POST a body of *chunks* chunks sent *pause_s* apart through the edge; its status and answer."""
    sent, count = [], [0]

    async def send(message):
        sent.append(message)

    async def receive():
        count[0] += 1
        if count[0] > 1:
            await asyncio.sleep(pause_s)
        return {"type": "http.request", "body": chunk, "more_body": count[0] < chunks}

    edge = EdgeMiddleware(_reads_the_body_then_answers, token=None, protected=(), max_body_bytes=10**6,
                          metrics=ServiceMetrics(), **limits)
    scope = {"type": "http", "method": "POST", "path": "/api/predict", "headers": [], "http_version": "1.1"}
    asyncio.run(asyncio.wait_for(edge(scope, receive, send), HANG))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_a_body_that_trickles_under_the_minimum_rate_is_cut_off_and_a_steady_one_is_not():
    """One byte every 20 ms never pauses for body_timeout, so it used to hold its place for as long as the
    client liked; after the first body_timeout it must average min_body_rate."""
    status, answer = _post_with_body(b"x", 0.02, 10**6, body_timeout=0.2, min_body_rate=1024)
    assert status == 408 and b"under 1 KB/s" in answer and b"request cut off" in answer
    status, answer = _post_with_body(b"x" * 2048, 0.02, 30, body_timeout=0.2, min_body_rate=1024)  # ~100 KB/s
    assert (status, answer) == (200, b"ok")
    status, answer = _post_with_body(b"x", 0.02, 30, body_timeout=0.2, min_body_rate=0)  # no minimum rate
    assert (status, answer) == (200, b"ok")


def test_a_body_that_keeps_just_above_the_minimum_rate_is_cut_off_at_the_body_deadline():
    """A body that never falls under the minimum rate used to be let in for as long as its bytes earned (the largest
    body at 32 KB/s: 2.9 hours), so a few such clients held the request slots; the whole body now has a deadline.
    This one comes at ~100 KB/s, well above the 1 KB/s minimum, and would go on for 10**6 chunks."""
    status, answer = _post_with_body(b"x" * 2048, 0.02, 10**6, body_timeout=0.2, min_body_rate=1024,
                                     body_deadline=0.5)
    assert status == 408 and b"body not complete in 0.5 s" in answer and b"request cut off" in answer
    status, answer = _post_with_body(b"x" * 2048, 0.02, 5, body_timeout=0.2, min_body_rate=1024,
                                     body_deadline=HANG)  # a body done in time is not touched
    assert (status, answer) == (200, b"ok")


def test_the_pixel_budget_serves_waiters_in_order_and_a_cancelled_waiter_gives_its_turn_away():
    async def scenario():
        budget, order = PixelBudget(10), []

        async def take(name, pixels):
            await budget.acquire(pixels)
            order.append(name)

        await budget.acquire(6)
        large = asyncio.ensure_future(take("large", 10))
        await asyncio.sleep(0.01)
        small = asyncio.ensure_future(take("small", 3))  # fits beside the 6 held, but the large one came first
        await asyncio.sleep(0.05)
        waiting_before_release = list(order)
        await budget.release(6)
        await asyncio.wait_for(large, HANG)
        after_release = list(order)
        await budget.release(10)
        await asyncio.wait_for(small, HANG)
        await budget.release(3)

        await budget.acquire(6)  # a waiter cancelled at the head of the line lets the next one in
        stuck = asyncio.ensure_future(take("stuck", 10))
        await asyncio.sleep(0.01)
        behind = asyncio.ensure_future(take("behind", 3))
        await asyncio.sleep(0.01)
        stuck.cancel()
        await asyncio.wait_for(behind, HANG)
        return waiting_before_release, after_release, order, budget.held

    waiting, after_release, order, held = asyncio.run(scenario())
    assert waiting == [] and after_release == ["large"]
    assert order == ["large", "small", "behind"] and held == 6 + 3


def test_a_failed_job_withdraws_its_siblings_still_queued():
    async def scenario():
        failed, queued = Future(), Future()
        failed.set_exception(RuntimeError("the model failed on this image"))
        with pytest.raises(RuntimeError, match="model failed"):
            await results_of([failed, queued])
        return queued

    assert asyncio.run(scenario()).cancelled()  # the worker drops it instead of running it for nobody


class _Request:
    """What until_disconnected reads of a request: its method, path and receive."""

    def __init__(self, receive):
        self.method, self.receive = "POST", receive
        self.url = type("URL", (), {"path": "/api/predict"})()


def test_a_client_that_leaves_stops_its_work_and_one_that_stays_gets_the_answer():
    async def scenario():
        queued = Future()

        async def gone_soon():
            await asyncio.sleep(0.05)
            return {"type": "http.disconnect"}

        with pytest.raises(HTTPException) as left:
            await asyncio.wait_for(until_disconnected(_Request(gone_soon), results_of([queued])), HANG)

        async def stays():
            await asyncio.Event().wait()

        async def work():
            await asyncio.sleep(0.01)
            return "answer"

        answer = await asyncio.wait_for(until_disconnected(_Request(stays), work()), HANG)
        return left.value, queued, answer

    left, queued, answer = asyncio.run(scenario())
    assert left.status_code == CLIENT_CLOSED and "closed the connection" in left.detail
    assert queued.cancelled() and answer == "answer"


def test_a_stop_reports_an_abandoned_job_only_when_one_is_on_the_model():
    idle = BatchWorker(lambda batch, tta: [0 for _ in batch], batch_size=1, batch_max_pixels=10**8, wait_s=0.0)
    idle.close(0)  # no time at all: the idle thread is on its way out, not abandoned
    assert not idle.busy_after_close()

    release = threading.Event()
    busy = BatchWorker(lambda batch, tta: [0 for _ in batch], batch_size=1, batch_max_pixels=10**8, wait_s=0.0)
    try:
        running, _ = busy.submit_call(release.wait, HANG)
        for _ in range(400):  # until the call is on the model
            if running.running():
                break
            threading.Event().wait(0.01)
        queued, _ = busy.submit_image(torch.zeros(3, 2, 2), False)
        busy.close(0)
        assert busy.busy_after_close()
        with pytest.raises(RuntimeError, match="stopped before this image"):
            queued.result(HANG)  # answered, never left waiting
    finally:
        release.set()
    assert running.result(HANG) is True


def test_a_request_keeps_its_pixels_counted_until_its_annotated_pictures_are_drawn(tiny_model_file, sample_dir,
                                                                                   monkeypatch):
    """Annotated pictures are drawn from the decoded pixels: those used to be given back to the budget (and the
    request's queue place freed) before the drawing, so requests beyond the budget could hold decoded photos."""
    import utils.service.app as service

    real_annotated, held = service.annotated_jpeg, []
    app = create_app(ServiceConfig(model_path=tiny_model_file))

    def recorded_annotated(tensor, out, threshold):
        held.append((app.state.budget.held, app.state.queue.waiting))
        return real_annotated(tensor, out, threshold)

    monkeypatch.setattr(service, "annotated_jpeg", recorded_annotated)
    photo = sorted((sample_dir / "images").glob("*.jpg"))[0].read_bytes()
    with TestClient(app) as client:
        answer = client.post("/api/predict?annotated=true", files=[("files", ("a.jpg", photo, "image/jpeg"))])
        after = (app.state.budget.held, app.state.queue.waiting)
    assert answer.status_code == 200, answer.text
    width, height = answer.json()["images"][0]["width"], answer.json()["images"][0]["height"]
    assert held == [(width * height, 1)] and after == (0, 0)


def test_a_bad_upload_stops_the_decodes_of_its_request_not_yet_begun(tiny_model_file, sample_dir, monkeypatch):
    """The first upload is cut short: its 422 comes without decoding the other 15 (one decode thread, so those
    wait in the pool's queue), where every upload of the request used to be decoded for nothing. A good decode
    takes a second here, so at most the one the thread took next has begun by the time the rest are withdrawn."""
    import time

    import utils.service.app as service

    real_decode, decoded = service.decode_to_tensor, []

    def recorded_decode(file, name):
        decoded.append(name)
        if name != "cut.jpg":
            time.sleep(1.0)
        return real_decode(file, name)

    monkeypatch.setattr(service, "decode_to_tensor", recorded_decode)
    photo = sorted((sample_dir / "images").glob("*.jpg"))[0].read_bytes()
    files = [("files", ("cut.jpg", photo[: len(photo) // 2], "image/jpeg"))]
    files += [("files", (f"{i}.jpg", photo, "image/jpeg")) for i in range(15)]
    app = create_app(ServiceConfig(model_path=tiny_model_file, decode_threads=1, max_images=16))
    with TestClient(app) as client:
        answer = client.post("/api/predict", files=files)
        first_request = list(decoded)
        assert answer.status_code == 422 and answer.json()["detail"].startswith("cut.jpg: ")
        assert client.post("/api/predict", files=files[1:2]).status_code == 200  # the server goes on
    assert first_request in (["cut.jpg"], ["cut.jpg", "0.jpg"]), first_request


def test_on_pool_waits_for_the_calls_running_and_raises_the_first_failure_in_call_order():
    """Calls already running when one fails hold decoded pixels: they are waited for before the request gives its
    pixels back. The failure raised is the first in call order, not whichever failed first in time."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    finished = []

    def call(name, seconds, fails):
        time.sleep(seconds)
        finished.append(name)
        if fails:
            raise ValueError(name)

    async def scenario():
        with ThreadPoolExecutor(max_workers=2) as pool:
            with pytest.raises(ValueError) as raised:
                await on_pool(pool, call, [("slow", 0.5, True), ("fast", 0.0, True)])
            seen = list(finished)
            with pytest.raises(ValueError):
                await on_pool(pool, call, [("bad", 0.0, True), ("running", 0.5, False)])
            return str(raised.value), seen, list(finished)

    first, seen, after = asyncio.run(asyncio.wait_for(scenario(), HANG))
    assert first == "slow" and sorted(seen) == ["fast", "slow"]
    assert after[2:] == ["bad", "running"]  # "running" finished before on_pool raised


def test_stage_times_leave_out_jobs_that_never_finished():
    """A request whose client left, or whose jobs the stop dropped, has timings never started: its queue time read
    minus the clock's reading (-38,000 s in the access log and the metrics)."""
    begun = Timing(queued=100.0, started=101.0, finished=103.0)
    never = Timing(queued=100.5)  # withdrawn before it began
    assert stage_seconds([begun, never]) == {"queue": 1.0, "inference": 2.0}
    assert stage_seconds([never]) == {}


def test_a_client_that_leaves_drops_its_explanation_and_queued_images_and_the_log_says_so(tiny_model_file, caplog,
                                                                                            monkeypatch):
    """A real server: the client closes its socket while its request's first model job runs. /api/explain's job
    (a detection pass, then the explanation's passes) used to run its explanation to the end for nobody; it now
    stops before its next pass. /api/predict's images still queued are dropped. The 499 access-log line says how
    many model jobs were dropped unbegun."""
    import io
    import logging
    import socket
    import time

    import uvicorn
    from PIL import Image

    import utils.service.app as service
    import utils.service.uploads as uploads
    from utils.classes import LABEL_OF

    on_model, release, explained = threading.Event(), threading.Event(), []

    def held_detect(model, images, **kwargs):  # one face per image, found once the test lets it go
        on_model.set()
        release.wait(HANG)
        return [{"boxes": torch.tensor([[1.0, 1.0, 20.0, 20.0]]), "labels": torch.tensor([LABEL_OF["with_mask"]]),
                 "scores": torch.tensor([0.9])} for _ in images]

    monkeypatch.setattr(service, "detect", held_detect)
    monkeypatch.setattr(uploads, "detect", held_detect)  # /api/explain's detection (uploads.detect_as_predict)
    monkeypatch.setattr(service, "explain_as_predict", lambda *args, **kwargs: explained.append(1))
    app = create_app(ServiceConfig(model_path=tiny_model_file, batch_size=1))
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), "white").save(buffer, "JPEG")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()

    def leave_while_on_the_model(path: str, field: str, images: int) -> None:
        on_model.clear()
        release.clear()
        body = b"".join(b"--b\r\nContent-Disposition: form-data; name=\"%s\"; filename=\"%d.jpg\"\r\n"
                        b"Content-Type: image/jpeg\r\n\r\n%s\r\n" % (field.encode(), i, buffer.getvalue())
                        for i in range(images)) + b"--b--\r\n"
        with socket.create_connection(sock.getsockname()) as client:
            client.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body))
            assert on_model.wait(HANG)
        for _ in range(int(HANG / 0.01)):  # until the server has ended the request (its access-log line)
            if any(" 499 " in r.getMessage() for r in caplog.records if r.name == "mask_service.access"):
                break
            time.sleep(0.01)
        release.set()
        after, _ = app.state.worker.submit_call(lambda: "idle")  # runs once the model's thread is done with it
        assert after.result(HANG) == "idle"

    try:
        with caplog.at_level(logging.INFO, logger="mask_service.access"):
            for _ in range(400):
                if server.started:
                    break
                time.sleep(0.05)
            leave_while_on_the_model("/api/explain?box=1,1,20,20&label=with_mask", "file", 1)
            assert explained == []  # the explanation's passes never began
            caplog.clear()
            leave_while_on_the_model("/api/predict", "files", 3)
    finally:
        release.set()
        server.should_exit = True
        thread.join(HANG)
    lines = [r.getMessage() for r in caplog.records if r.name == "mask_service.access"]
    assert any(" 499 " in line and "dropped=2" in line for line in lines), lines
