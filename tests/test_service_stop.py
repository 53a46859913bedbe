"""bin/serve.py as a process: decompression bombs leave its memory far under 2 GB, and SIGTERM in the middle
of a request lets that request finish and exits 0."""

from __future__ import annotations

import io
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from PIL import Image


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peak_rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def multipart(name: str, data: bytes, boundary: str = "stopboundary") -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the server's peak memory")
@pytest.mark.slow
def test_bombs_keep_memory_low_and_sigterm_finishes_the_request_in_flight(root, tiny_model_file, sample_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, str(root / "bin" / "serve.py"), "--model", str(tiny_model_file),
                               "--port", str(port), "--stop-timeout", "20"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)

        buffer = io.BytesIO()
        Image.new("1", (10_000, 10_000)).save(buffer, format="PNG")
        bombs = [("files", (f"bomb{i}.png", buffer.getvalue(), "image/png")) for i in range(16)]
        began = time.perf_counter()
        refused = httpx.post(f"{url}/api/predict", files=bombs, timeout=60)
        assert refused.status_code == 413 and "bomb0.png: image too large" in refused.json()["detail"]
        assert time.perf_counter() - began < 5
        assert peak_rss_bytes(server.pid) < 2 * 2**30

        # A request whose body is still arriving when SIGTERM comes: it must complete.
        photo = sorted((sample_dir / "images").glob("*.jpg"))[0].read_bytes()
        body = multipart("slow.jpg", photo)
        half_sent, finish = threading.Event(), threading.Event()

        def slowly():
            yield body[: len(body) // 2]
            half_sent.set()
            finish.wait(30)
            yield body[len(body) // 2:]

        answer = {}
        client = threading.Thread(target=lambda: answer.update(response=httpx.post(
            f"{url}/api/predict", content=slowly(), timeout=60,
            headers={"content-type": "multipart/form-data; boundary=stopboundary"})))
        client.start()
        assert half_sent.wait(30)
        time.sleep(0.5)  # the server has the request's headers and half its body
        server.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # the server is stopping: no new connections, the open request goes on
        finish.set()
        client.join(60)
        code = server.wait(60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(30)
    stderr = server.stderr.read()
    assert answer["response"].status_code == 200, answer["response"].text
    assert answer["response"].json()["images"][0]["file"] == "slow.jpg"
    assert code == 0, stderr[-2000:]
    assert "POST /api/predict 1.1 200" in stderr and "POST /api/predict 1.1 413" in stderr


def test_a_request_cut_off_at_the_stop_timeout_gets_503_and_the_model_thread_waits_stop_timeout(tiny_model_file,
                                                                                             monkeypatch):
    """uvicorn cancels the requests still in flight --stop-timeout after SIGTERM: each is answered 503 (uvicorn
    alone sends a bare 500), and the lifespan then waits for the model's thread --stop-timeout, not 30 s."""
    import asyncio

    from utils.service.app import ServiceConfig, create_app
    from utils.service.batching import BatchWorker
    from utils.service.edge import EdgeMiddleware
    from utils.service.metrics import ServiceMetrics

    async def never_answers(scope, receive, send):
        await asyncio.Event().wait()

    edge = EdgeMiddleware(never_answers, token=None, protected=(), max_body_bytes=100, metrics=ServiceMetrics())
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def cut_off():
        scope = {"type": "http", "method": "POST", "path": "/api/predict", "headers": [], "http_version": "1.1"}
        task = asyncio.ensure_future(edge(scope, receive, send))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.wait([task], timeout=10)

    asyncio.run(cut_off())
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 503 and b"stopping" in b"".join(m.get("body", b"") for m in sent)

    waited = []
    real_close = BatchWorker.close
    monkeypatch.setattr(BatchWorker, "close", lambda self, timeout=None: (waited.append(timeout),
                                                                          real_close(self, timeout)))
    from fastapi.testclient import TestClient

    with TestClient(create_app(ServiceConfig(model_path=tiny_model_file, stop_timeout=1.5))) as client:
        assert client.get("/livez").status_code == 200
    assert waited == [1.5]
