#!/usr/bin/env python3
"""Serve a trained model: a prediction API (FastAPI + uvicorn) for images.

    bin/serve.py --model runs/sample/outputs/model.pt                  # http://127.0.0.1:8000/docs
    curl -F files=@photo.jpg 'http://127.0.0.1:8000/api/predict?annotated=true'

GET /api/health, GET /api/model, POST /api/predict (multipart field `files`, repeatable;
query score_threshold, tta, annotated, explain): per image the detections with scores and
the compliance figure (faces per class, percent properly masked), and overall; POST
/api/explain (one `file`; query box, label, method): a heat map of one detection's class
evidence (HiResCAM, grad-cam package) — the page shows it when a box is clicked. The OpenAPI
page is /docs. The model is loaded once; inference runs in one worker thread with at
most --queue-size requests waiting (then 503 with Retry-After). Bad uploads get a 4xx
naming the file: 413 too large (--max-upload-mb) or too many (--max-images), 415 not
an image type, 422 undecodable. Binds 127.0.0.1 unless --host says otherwise; with
--token (or MASK_SERVICE_TOKEN) the API needs `Authorization: Bearer <token>`.
Exit 2 with one line when the model cannot be loaded or a flag is bad.
"""

import argparse
import os
import sys
from pathlib import Path

from utils import defaults as D
from utils.cli import run_job
from utils.detection.engine import resolve_device
from utils.errors import InputError

TOKEN_ENV = "MASK_SERVICE_TOKEN"


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="model file written by bin/train.py")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 exposes it: "
                             "set --token then)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest image accepted (default: 20)")
    parser.add_argument("--max-images", type=int, default=16, help="most images per request (default: 16)")
    parser.add_argument("--explain-max-boxes", type=int, default=D.EXPLAIN_MAX_BOXES,
                        help="/api/predict?explain=true: best detections explained per image (a backward pass "
                             f"each) (default: {D.EXPLAIN_MAX_BOXES})")
    parser.add_argument("--queue-size", type=int, default=8,
                        help="requests that may wait for the model; one more gets 503 (default: 8)")
    parser.add_argument("--token", default=None,
                        help=f"require `Authorization: Bearer TOKEN` (default: ${TOKEN_ENV} when set, else none)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where the model runs (default: auto)")
    return parser


def main(args) -> int:
    if args.max_upload_mb <= 0 or args.max_images < 1 or args.queue_size < 1 or args.explain_max_boxes < 1:
        raise InputError("--max-upload-mb must be positive, --max-images, --queue-size and --explain-max-boxes "
                         "at least 1")
    import uvicorn

    from utils.service.app import ServiceConfig, create_app

    token = args.token or os.environ.get(TOKEN_ENV) or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and token is None:
        print(f"serve: warning: {args.host} exposes the API to the network without a token (--token)", file=sys.stderr)
    app = create_app(ServiceConfig(model_path=args.model, device=str(resolve_device(args.device)),
                                   max_upload_mb=args.max_upload_mb, max_images=args.max_images,
                                   queue_size=args.queue_size, token=token,
                                   explain_max_boxes=args.explain_max_boxes))
    print(f"serve: {args.model} on http://{args.host}:{args.port} (API docs: /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main, get_args_parser()))
