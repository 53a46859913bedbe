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
