#!/usr/bin/env python3
"""Serve a trained model: a prediction API (FastAPI + uvicorn) for images.

    bin/serve.py --model runs/sample/outputs/model.pt                  # http://127.0.0.1:8000/docs
    curl -F files=@photo.jpg 'http://127.0.0.1:8000/api/predict?annotated=true'

GET /api/health, GET /api/model, POST /api/predict (multipart field `files`, repeatable;
query score_threshold, tta, annotated, explain): per image the detections with scores and
the count at the threshold (faces kept per class, their percent with_mask), and overall; POST
/api/explain (one `file`; query box, label, method): a heat map of one detection's class
evidence (HiResCAM, grad-cam package) — the page shows it when a box is clicked. The OpenAPI
page is /docs. Probes: GET /livez (the process answers), GET /readyz (model loaded, queue not
full, not stopping); GET /metrics in Prometheus text format; one access-log line per request
with its id (X-Request-ID) and its decode / queue / inference times.

The model is loaded once; one inference thread puts up to --batch-size images of the same
size from any requests into one forward pass; at most --queue-size requests wait for it and at
most --max-requests are received or served at once (then 503 with Retry-After; the probes
always answer), at most --max-requests-per-client of them (and the same share of --queue-size)
from one client address (then 429; behind a reverse proxy on another host, name it in
--forwarded-allow-ips or give --max-requests-per-client 0: docs/service.md). A
connection must send a complete request head within --header-timeout seconds of connecting
or of its last answer, and a body may not stall for --body-timeout seconds nor, after that
long, average under --min-body-rate KB/s, nor take longer than
--body-deadline seconds in all (408); a client must take its answer within --send-timeout
seconds plus its unsent bytes at --min-body-rate, else its connection is aborted. Bad uploads get a
4xx naming the file: 413 too large (--max-upload-mb, --max-image-pixels, checked from the
header before decoding) or too many file parts (--max-images, refused as the body streams),
415 not a JPEG, PNG, BMP, TIFF or WebP image (by its bytes), 422 undecodable or too thin for the
model's working size. A body over the request limit, and with --token (or MASK_SERVICE_TOKEN) a request without
`Authorization: Bearer <token>`, is refused before it is read. A request whose client leaves
before its answer is stopped (its images still queued for the model are withdrawn). Binds
127.0.0.1 unless --host says otherwise.

SIGTERM (or Ctrl-C) stops taking requests, lets those in flight finish (at most
--stop-timeout seconds; those still running then are answered 503) and exits 0. Exit 2 with
one line when the model cannot be loaded, the address cannot be bound or a flag is bad.
"""

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from utils import defaults as D
from utils.cli import (int_between, non_negative_float, non_negative_int, positive_float, positive_int,
                       require_model_files, run_job)
from utils.errors import InputError

TOKEN_ENV = "MASK_SERVICE_TOKEN"
JOB = "serve"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (no usage block) and exit 2."""

    def error(self, message):
        self.exit(2, f"{JOB}: error: {message} (see --help)\n")


port_number = int_between(1, 65535)


def get_args_parser():
    parser = OneLineParser(prog=JOB, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="model file written by bin/train.py")
    parser.add_argument("--host", default=D.SERVICE_HOST,
                        help=f"address to bind (default: {D.SERVICE_HOST}, this machine only; 0.0.0.0 exposes it: "
                             "set --token then)")
    parser.add_argument("--port", type=port_number, default=D.SERVICE_PORT,
                        help=f"port, 1-65535 (default: {D.SERVICE_PORT})")
    parser.add_argument("--max-upload-mb", type=positive_float, default=D.SERVICE_MAX_UPLOAD_MB,
                        help=f"largest image file accepted (default: {D.SERVICE_MAX_UPLOAD_MB:g})")
    parser.add_argument("--max-images", type=positive_int, default=D.SERVICE_MAX_IMAGES,
                        help=f"most images per request (default: {D.SERVICE_MAX_IMAGES})")
    parser.add_argument("--max-image-pixels", type=positive_int, default=D.SERVICE_MAX_IMAGE_PIXELS,
                        help="largest width x height of an upload, read from its header before decoding "
                             f"(default: {D.SERVICE_MAX_IMAGE_PIXELS:,})")
    parser.add_argument("--explain-max-boxes", type=positive_int, default=D.EXPLAIN_MAX_BOXES,
                        help="/api/predict?explain=true: best detections explained per image (a backward pass "
                             f"each) (default: {D.EXPLAIN_MAX_BOXES})")
    parser.add_argument("--queue-size", type=positive_int, default=D.SERVICE_QUEUE_SIZE,
                        help=f"requests in flight at most; one more gets 503 (default: {D.SERVICE_QUEUE_SIZE})")
    parser.add_argument("--batch-size", type=positive_int, default=D.SERVICE_BATCH_SIZE,
                        help=f"images of any requests in one forward pass (default: {D.SERVICE_BATCH_SIZE})")
    parser.add_argument("--batch-wait-ms", type=non_negative_float, default=D.SERVICE_BATCH_WAIT_MS,
                        help="how long a begun batch waits for images still being decoded "
                             f"(default: {D.SERVICE_BATCH_WAIT_MS:g})")
    parser.add_argument("--decode-threads", type=positive_int, default=D.SERVICE_DECODE_THREADS,
                        help="threads decoding uploads (default: one per CPU core)")
    parser.add_argument("--max-requests", "--max-connections", dest="max_requests", type=positive_int,
                        default=D.SERVICE_MAX_REQUESTS,
                        help="requests received or served at once; more get 503 (the probes /livez, /readyz, "
                             "/api/health, /metrics excepted; open connections without a request do not count) "
                             f"(default: {D.SERVICE_MAX_REQUESTS})")
    parser.add_argument("--max-requests-per-client", type=non_negative_int, default=None,
                        help="of those, requests from one client address at once, and the same share of "
                             "--queue-size (at least 1); more get 429. Behind a "
                             "reverse proxy all requests come from its address: name it in --forwarded-allow-ips, "
                             "or pass 0 (no per-client limit; leave it to the proxy) (default: a quarter of "
                             f"--max-requests, {int(D.SERVICE_MAX_REQUESTS * D.SERVICE_CLIENT_SHARE_OF_REQUESTS)} "
                             "at its default)")
    parser.add_argument("--forwarded-allow-ips", default=os.environ.get("FORWARDED_ALLOW_IPS",
                                                                        D.SERVICE_FORWARDED_ALLOW_IPS),
                        help="comma-separated addresses or networks of reverse proxies whose X-Forwarded-For "
                             "header names the client (for --max-requests-per-client and the access log); no one "
                             "else's is read; '' reads no one's (default: $FORWARDED_ALLOW_IPS where it is set, "
                             f"else {D.SERVICE_FORWARDED_ALLOW_IPS}, the loopback address --host binds by default: a "
                             "reverse proxy on this host)")
    parser.add_argument("--header-timeout", type=positive_float, default=D.SERVICE_HEADER_TIMEOUT_S,
                        help="seconds a connection has to send a complete request line and headers, after "
                             f"connecting or after its previous answer (default: {D.SERVICE_HEADER_TIMEOUT_S:g})")
    parser.add_argument("--body-timeout", type=positive_float, default=D.SERVICE_BODY_TIMEOUT_S,
                        help="seconds a request body may send nothing before it is cut off with 408 (default: "
                             f"{D.SERVICE_BODY_TIMEOUT_S:g})")
    parser.add_argument("--min-body-rate", type=non_negative_float, default=D.SERVICE_MIN_BODY_RATE_KBS,
                        help="KB/s a request body must average once --body-timeout seconds have passed since it "
                             f"began, else it is cut off with 408; 0: no minimum (default: "
                             f"{D.SERVICE_MIN_BODY_RATE_KBS:g})")
    parser.add_argument("--body-deadline", type=non_negative_float, default=D.SERVICE_BODY_DEADLINE_S,
                        help="seconds a whole request body may take, however steadily it comes, else it is cut off "
                             f"with 408; 0: no deadline (default: {D.SERVICE_BODY_DEADLINE_S:g})")
    parser.add_argument("--send-timeout", type=positive_float, default=D.SERVICE_SEND_TIMEOUT_S,
                        help="seconds a client has, plus its answer's unsent bytes at --min-body-rate, to take an "
                             "answer waiting in the server's buffer, else the connection is aborted (default: "
                             f"{D.SERVICE_SEND_TIMEOUT_S:g})")
    parser.add_argument("--stop-timeout", type=non_negative_float, default=D.SERVICE_STOP_TIMEOUT_S,
                        help="SIGTERM: seconds requests in flight get to finish (default: "
                             f"{D.SERVICE_STOP_TIMEOUT_S:g})")
    parser.add_argument("--token", default=None,
                        help=f"require `Authorization: Bearer TOKEN` (default: ${TOKEN_ENV} when set, else none)")
    parser.add_argument("--device", default=D.DEVICE, choices=("auto", "cpu", "cuda"),
                        help=f"where the model runs (default: {D.DEVICE})")
    return parser


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a bad address is one line (InputError), not a server log."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as error:
        raise InputError(f"--host {host[:80]!r}: not an address of this machine ({error})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise InputError(f"--host {host} --port {port}: cannot listen there ({error.strerror or error})") from None
    sock.set_inheritable(True)
    return sock


def listen(sock: socket.socket, host: str, port: int, backlog: int) -> None:
    """Listen on the socket bind() gave, once the model is loaded. Two servers started on one port within the
    seconds a model takes to load both bind it (SO_REUSEADDR lets sockets share an address until one listens):
    the second to listen is refused here in one line, where uvicorn's own listen() ended in a traceback."""
    try:
        sock.listen(backlog)
    except OSError as error:
        sock.close()
        raise InputError(f"--host {host} --port {port}: another server began to listen there while the model "
                         f"loaded ({error.strerror or error})") from None


def proxy_settings(forwarded_allow_ips: str) -> dict:
    """uvicorn's settings that read X-Forwarded-For from the proxies named (comma-separated) and no one else; none
    named: no one's. The flag's default is IPv4 loopback (or $FORWARDED_ALLOW_IPS, as uvicorn's): the usual way this
    server, bound to loopback unless --host says otherwise, is exposed is a reverse proxy on the same host, whose
    clients would otherwise all be one client to --max-requests-per-client."""
    proxies = [address.strip() for address in forwarded_allow_ips.split(",") if address.strip()]
    return {"proxy_headers": bool(proxies), "forwarded_allow_ips": proxies or None}


def access_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s access: %(message)s"))
    logger = logging.getLogger("mask_service.access")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(args) -> int:
    require_model_files([args.model])  # the model loader's own refusals, before anything is opened or imported
    # Bound before the model loads (a bad address costs no model load), and closed on every way out: a model the
    # loader refused left the port bound in the process that called main (a test's, an embedding program's)
    with bind(args.host, args.port) as sock:
        return serve_on(sock, args)


def serve_on(sock: socket.socket, args) -> int:
    """Load the model, listen on *sock* (bound, not listening yet) and serve until SIGTERM or Ctrl-C."""
    import uvicorn

    token = args.token or os.environ.get(TOKEN_ENV) or None
    # torch (the device, the model) is imported only now: a bad flag, address or model path is refused in a
    # fraction of a second, not after the seconds that importing torch takes
    from utils.detection.device import resolve_device
    from utils.service.app import ServiceConfig, create_app
    from utils.service.protocol import head_deadline_protocol

    if args.host not in ("127.0.0.1", "localhost", "::1") and token is None:
        print(f"{JOB}: warning: {args.host} exposes the API to the network without a token (--token)", file=sys.stderr)
    app = create_app(ServiceConfig(model_path=args.model, device=str(resolve_device(args.device)),
                                   max_upload_mb=args.max_upload_mb, max_images=args.max_images,
                                   max_image_pixels=args.max_image_pixels, queue_size=args.queue_size,
                                   token=token, explain_max_boxes=args.explain_max_boxes,
                                   batch_size=args.batch_size, batch_wait_ms=args.batch_wait_ms,
                                   decode_threads=args.decode_threads, stop_timeout=args.stop_timeout,
                                   max_requests=args.max_requests, body_timeout=args.body_timeout,
                                   min_body_rate_kbs=args.min_body_rate, body_deadline=args.body_deadline,
                                   max_requests_per_client=args.max_requests_per_client))
    access_logging()
    # The model's thread takes the GIL back between its ops; Python's default lets the event loop keep it
    # for up to 5 ms while it parses a request (defaults.SERVICE_GIL_SWITCH_S)
    sys.setswitchinterval(D.SERVICE_GIL_SWITCH_S)

    class Server(uvicorn.Server):
        """uvicorn's server, but a SIGTERM or SIGINT ends in exit 0 after the graceful stop, where uvicorn
        re-raises the signal (exit 143): a stop asked for and done is a success."""

        def handle_exit(self, sig, frame):
            if not app.state.stopping:
                app.state.stop_deadline = time.monotonic() + args.stop_timeout
            app.state.stopping = True  # /readyz answers 503 at once
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    # No limit_concurrency: uvicorn counts open sockets with it, so a few silent connections answered everyone 503.
    # The head deadline closes those (protocol.py); the edge bounds the requests in flight (--max-requests).
    config = uvicorn.Config(app, log_level="info", access_log=False, timeout_graceful_shutdown=args.stop_timeout,
                            **proxy_settings(args.forwarded_allow_ips),
                            http=head_deadline_protocol(args.header_timeout, args.send_timeout,
                                                        args.min_body_rate * 1024))
    listen(sock, args.host, args.port, config.backlog)
    print(f"{JOB}: {args.model} on http://{args.host}:{args.port} (API docs: /docs)", flush=True)
    Server(config).run(sockets=[sock])
    worker = getattr(app.state, "worker", None)
    if worker is not None and worker.busy_after_close():
        # --stop-timeout passed with a job still on the model: the process ends without it. Python's own exit
        # would end the interpreter under that thread's torch op, and the C++ runtime aborts (exit 134).
        print(f"{JOB}: stopped; the model's last job was abandoned after --stop-timeout {args.stop_timeout:g} s",
              flush=True)
        sys.stderr.flush()
        os._exit(0)
    print(f"{JOB}: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main, get_args_parser()))
