#!/usr/bin/env python3
"""The prediction service and the video path against pure model inference, measured in one run.

  pure     the model alone on one decoded 640 px image held as a float tensor (detect(), batch 1):
           what the hardware can do, in images/s, on the bench's main thread, the only thread of
           this process that runs torch (so the process has one OpenMP team, as the service does:
           utils/service/batching.py), measured in 4 slices between the rounds of each served level
  served   bin/serve.py in its own process (uvicorn on loopback), POST /api/predict with that
           image as a JPEG upload, from 1, 4 and 16 concurrent clients: requests/s, p50 and p95
           latency; served images/s / pure images/s is the share of the model's speed the
           service keeps (goal >= 0.9 at every level, no failed request). The clients are a light
           load generator (http.client on kept-alive connections, the multipart body built once),
           alive for the whole level and paused during the pure slices, so that the bench's own
           HTTP work takes as little as it can of the cores the server runs on
  video    utils.detection.video.predict_video on a clip of that image (every frame processed,
           no output video): frames/s / pure images/s at the same size (goal >= 0.9)

Each level is bounded in requests (--requests) and time (--max-seconds). The model is
--model (default: runs/sample/outputs/model.pt, the make run model). The figures, with the
machine's load average before and after (other work on the machine depresses the ratios),
are written to --output (default: bench/results/serve.json, written atomically).

    .venv/bin/python bench/serve.py [--model runs/sample/outputs/model.pt] [--requests 32]
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PURE_SECONDS = 16.0  # pure inference measured for this long per served level, in ROUNDS slices between its requests
ROUNDS = 4


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "runs" / "sample" / "outputs" / "model.pt")
    p.add_argument("--image", type=Path, default=None,
                   help="photo to send (default: the first sample image), resized to --size on its longer side")
    p.add_argument("--size", type=int, default=640, help="longer side of the image in px (default: 640)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrency levels (default: 1 4 16)")
    p.add_argument("--requests", type=int, default=128, help="requests per level at most, in 4 rounds (default: 128)")
    p.add_argument("--max-seconds", type=float, default=120, help="time per level at most (default: 120)")
    p.add_argument("--video-frames", type=int, default=24, help="frames of the video clip (default: 24)")
    p.add_argument("--server-args", default="", help="more flags for bin/serve.py, e.g. \"--batch-size 1\"")
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "serve.json",
                   help="JSON of the figures (default: bench/results/serve.json)")
    return p


def make_image(args):
    from PIL import Image

    found = sorted((ROOT / "data" / "sample" / "images").glob("*.jpg"))
    source = args.image or (found[0] if found else None)
    if source is None:
        raise SystemExit("bench/serve.py: no image: data/sample/images holds no .jpg (`make run` makes it) "
                         "and --image was not given")
    image = Image.open(source).convert("RGB")
    scale = args.size / max(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return image, buffer.getvalue()


def pure_meter(model_path: Path, image):
    """A function measuring pure inference for *seconds*: images/s of detect() on the decoded image, batch 1,
    on this (the main) thread. No other thread of the bench runs torch: a second thread running it would
    give the process a second OpenMP team, which on 2 cores slows both (utils/service/batching.py)."""
    import numpy as np
    import torch

    from utils.detection.inference import detect, to_model_input
    from utils.detection.model import load_model_file

    model, _ = load_model_file(model_path, "cpu")
    tensor = to_model_input(torch.from_numpy(np.array(image)).permute(2, 0, 1), "cpu")
    detect(model, [tensor], score_threshold=0.05)  # warm-up

    def measure(seconds: float) -> float:
        count, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds or count < 5:
            detect(model, [tensor], score_threshold=0.05)
            count += 1
        return count / (time.perf_counter() - began)

    return measure


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def multipart_body(jpeg: bytes) -> tuple[bytes, dict]:
    """The request body of one upload in field `files`, and its headers, built once for every request."""
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="bench.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode() + jpeg + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


class Clients:
    """*count* client threads, each on one kept-alive connection, posting *body* when a round runs."""

    def __init__(self, port: int, body: bytes, headers: dict, count: int):
        self.port, self.body, self.headers = port, body, headers
        self.lock, self.round_started, self.round_done = threading.Lock(), threading.Condition(), threading.Event()
        self.remaining, self.in_round, self.round_id, self.closing = 0, 0, 0, False
        self.latencies: list[float] = []
        self.failed = 0
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def run_round(self, requests: int, max_seconds: float) -> float:
        """Post *requests* from all clients (at most *max_seconds*); the round's wall time."""
        self.round_done.clear()
        with self.round_started:
            self.remaining, self.deadline = requests, time.perf_counter() + max_seconds
            self.in_round, self.round_id = len(self.threads), self.round_id + 1
            began = time.perf_counter()
            self.round_started.notify_all()
        self.round_done.wait()
        return time.perf_counter() - began

    def close(self) -> None:
        with self.round_started:
            self.closing = True
            self.round_started.notify_all()
        for thread in self.threads:
            thread.join(30)

    def _take(self) -> bool:
        with self.lock:
            if self.remaining <= 0 or time.perf_counter() > self.deadline:
                return False
            self.remaining -= 1
            return True

    def _client(self) -> None:
        connection, seen = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300), 0
        while True:
            with self.round_started:
                self.round_started.wait_for(lambda last=seen: self.closing or self.round_id > last)
                if self.closing:
                    connection.close()
                    return
                seen = self.round_id
            # a fresh connection each round: the server closes one left idle (uvicorn: after 5 s) during a pure slice
            connection.close()
            while self._take():
                start = time.perf_counter()
                try:
                    connection.request("POST", "/api/predict", body=self.body, headers=self.headers)
                    answer = connection.getresponse()
                    answer.read()
                    ok = answer.status == 200
                except (OSError, http.client.HTTPException):
                    connection.close()  # reconnects on the next request
                    ok = False
                with self.lock:
                    if ok:
                        self.latencies.append(time.perf_counter() - start)
                    else:
                        self.failed += 1
            with self.lock:
                self.in_round -= 1
                if self.in_round == 0:
                    self.round_done.set()


def interleaved(port: int, jpeg: bytes, clients: int, requests: int, max_seconds: float, pure) -> dict:
    """One level in ROUNDS rounds of pure inference then served requests, so that both figures see the
    same minutes of the machine: on this shared 2-core machine pure inference alone moves by 20-40 %
    within minutes, and one pure figure taken before a whole level measured that drift, not the service."""
    body, headers = multipart_body(jpeg)
    pool = Clients(port, body, headers, clients)
    served_s, pure_rates = 0.0, []
    try:
        for round_ in range(ROUNDS):
            pure_rates.append(pure(PURE_SECONDS / ROUNDS))
            served_s += pool.run_round(requests // ROUNDS + (round_ < requests % ROUNDS), max_seconds / ROUNDS)
    finally:
        pool.close()
    latencies = sorted(pool.latencies)
    return {"ok": len(latencies), "failed": pool.failed, "wall_s": served_s, "rps": len(latencies) / served_s,
            "pure_images_per_s": statistics.fmean(pure_rates), "pure_per_round": pure_rates,
            "p50_s": statistics.median(latencies),
            "p95_s": latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))]}


def served(model_path: Path, jpeg: bytes, clients_levels, requests: int, max_seconds: float, pure,
           server_args: tuple = ()) -> list[dict]:
    """Each level interleaved with pure measurements (interleaved())."""
    import httpx

    port = free_port()
    # its clients all come from loopback, one address: no per-client limit (it would answer all but 8 with 429)
    server = subprocess.Popen([sys.executable, str(ROOT / "bin" / "serve.py"), "--model", str(model_path),
                               "--port", str(port), "--device", "cpu", "--queue-size", "64",
                               "--max-requests-per-client", "0", *server_args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("bench/serve.py: the service did not start")
            time.sleep(0.3)
        httpx.post(f"{url}/api/predict", files={"files": ("bench.jpg", jpeg, "image/jpeg")}, timeout=120)  # warm-up
        return [{"clients": clients, **interleaved(port, jpeg, clients, requests, max_seconds, pure)}
                for clients in clients_levels]
    finally:
        server.terminate()
        server.wait(30)


def video_rate(model_path: Path, image, frames: int) -> float:
    import cv2
    import numpy as np

    from utils.detection.model import load_model_file
    from utils.detection.video import predict_video

    model, _ = load_model_file(model_path, "cpu")
    with tempfile.TemporaryDirectory(prefix="bench-video.") as tmp:
        clip = Path(tmp) / "clip.mp4"
        frame = cv2.cvtColor(np.array(image), cv2.COLOR_RGB2BGR)
        writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (image.width, image.height))
        for _ in range(frames):
            writer.write(frame)
        writer.release()
        began = time.perf_counter()
        summary = predict_video(model, "cpu", str(clip), Path(tmp) / "out", 0.05, stride=1)
        return summary["frames_processed"] / (time.perf_counter() - began)


def main(args) -> int:
    if not args.model.is_file():
        print(f"bench/serve.py: {args.model} not found (run `make run` first, or pass --model)", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    image, jpeg = make_image(args)
    print(f"Service benchmark: {args.model}, one {image.width}x{image.height} JPEG ({len(jpeg) // 1024} KB), "
          f"{os.cpu_count()} CPUs, torch threads default")
    pure = pure_meter(args.model, image)
    rows = served(args.model, jpeg, args.clients, args.requests, args.max_seconds, pure,
                  tuple(args.server_args.split()))
    for row in rows:
        row["served_over_pure"] = row["rps"] / row["pure_images_per_s"]
        print(f"  served, {row['clients']:>2} client(s): {row['rps']:.2f} requests/s, "
              f"p50 {row['p50_s'] * 1000:.0f} ms, p95 {row['p95_s'] * 1000:.0f} ms, {row['ok']} ok, "
              f"{row['failed']} failed; pure between its rounds {row['pure_images_per_s']:.2f} images/s; "
              f"served / pure {row['served_over_pure']:.2f} (goal >= 0.9)",
              flush=True)
    pure_after = pure(PURE_SECONDS)
    # On the main thread, as bin/predict_video.py runs it: this process's main thread already has an OpenMP
    # team (pure_meter), so a thread of its own would be slowed by the teams' count (utils/service/batching.py).
    video = video_rate(args.model, image, args.video_frames)
    print(f"  video: {video:.2f} frames/s at {image.width}x{image.height}; video / pure {video / pure_after:.2f} "
          "(goal >= 0.9)")
    load_after = os.getloadavg()
    print(f"  load average (1, 5, 15 min) before {', '.join(f'{v:.2f}' for v in load_before)}, after "
          f"{', '.join(f'{v:.2f}' for v in load_after)} on {os.cpu_count()} CPUs")
    from utils import defaults
    from utils.atomic import write_json

    write_json(args.output, {"model": str(args.model), "server_args": args.server_args,
                             "server_gil_switch_s": defaults.SERVICE_GIL_SWITCH_S,
                             "image": {"width": image.width, "height": image.height, "jpeg_bytes": len(jpeg)},
                             "cpus": os.cpu_count(), "load_average_before": load_before,
                             "load_average_after": load_after, "served": rows,
                             "pure_images_per_s_before_video": pure_after, "video_frames_per_s": video,
                             "video_over_pure": video / pure_after,
                             "goal_served_over_pure": 0.9,
                             "goal_met": all(r["served_over_pure"] >= 0.9 and r["failed"] == 0 for r in rows)})
    print(f"  written: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
