"""The service's hardened edge, one test per kind of bad input: decompression bombs (pixels from the header,
never decoded), bodies over the limit and missing credentials refused before the body is read (Content-Length
and streamed), a request's pixels over the memory budget, and bin/serve.py's bad flags (one line, exit 2)."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import subprocess
import sys

import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import utils.service.app as service  # noqa: E402
from utils.service.app import ServiceConfig, create_app  # noqa: E402


def bomb_png() -> bytes:
    """The issue's decompression bomb: a 10000x10000 1-bit PNG of ~12 KB that decodes to gigabytes."""
    buffer = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return bomb_png()


def test_decompression_bombs_are_refused_from_the_header_and_never_decoded(tiny_model_file, bomb, monkeypatch):
    decoded = []
    real_decode = service.decode_to_tensor
    monkeypatch.setattr(service, "decode_to_tensor", lambda data, name: decoded.append(name) or real_decode(data, name))
    assert len(bomb) < 20_000
    app = create_app(ServiceConfig(model_path=tiny_model_file, max_images=4))
    with TestClient(app) as client:
        answer = client.post("/api/predict", files=[("files", (f"bomb{i}.png", bomb, "image/png")) for i in range(4)])
    assert answer.status_code == 413, answer.text
    assert answer.json()["detail"].startswith("bomb0.png: image too large")
    assert decoded == []  # refused from the header: nothing was decoded


def _raw_request(app, path: str, headers: list[tuple[bytes, bytes]], method: str = "POST"):
    """Run one HTTP request through the ASGI app whose body must never be read; (status, body, reads)."""
    reads, sent = [], []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"x" * 1024, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], body.decode(), len(reads)


def test_missing_token_and_oversized_body_are_refused_before_the_body_is_read(tiny_model_file):
    app = create_app(ServiceConfig(model_path=tiny_model_file, token="s3cret", max_upload_mb=1, max_images=2))
    form = [(b"content-type", b"multipart/form-data; boundary=x")]
    status, body, reads = _raw_request(app, "/api/predict", form + [(b"content-length", b"314572800")])
    assert (status, reads) == (401, 0) and "missing or wrong bearer token" in body
    authorised = form + [(b"authorization", b"Bearer s3cret")]
    status, body, reads = _raw_request(app, "/api/predict", authorised + [(b"content-length", b"314572800")])
    assert (status, reads) == (413, 0) and "POST /api/predict: request body of 314572800 bytes; at most 3 MB" in body


def test_a_streamed_body_is_cut_off_at_the_limit(tiny_model_file):
    app = create_app(ServiceConfig(model_path=tiny_model_file, max_upload_mb=1, max_images=1))
    def chunks():  # no Content-Length: the edge counts what streams in
        for _ in range(64):
            yield b"\0" * 65536

    with TestClient(app) as client:
        answer = client.post("/api/predict", content=chunks(),
                             headers={"content-type": "multipart/form-data; boundary=x"})
    assert answer.status_code == 413 and "request body larger than 2 MB" in answer.json()["detail"]
    assert answer.headers["x-request-id"]



def test_content_length_and_path_are_bounded_in_answers_and_the_access_log(tiny_model_file, caplog):
    """A 5000-digit Content-Length is 413 (int() of it raised ValueError, a 500); a non-number is 400 with the value
    cut; a long path with a line break (uvicorn percent-decodes %0A) is quoted and cut in the answer and in the
    one access-log line."""
    import json
    import logging

    app = create_app(ServiceConfig(model_path=tiny_model_file, token="s3cret", max_upload_mb=1))
    authorised = [(b"content-type", b"multipart/form-data; boundary=x"), (b"authorization", b"Bearer s3cret")]
    status, body, reads = _raw_request(app, "/api/predict", authorised + [(b"content-length", b"9" * 5000)])
    assert (status, reads) == (413, 0) and "request body of over 10**18 bytes" in body and len(body) < 300
    status, body, reads = _raw_request(app, "/api/predict", authorised + [(b"content-length", b"12x" * 3000)])
    assert (status, reads) == (400, 0) and "is not a number" in body and len(body) < 300
    odd_path = "/api/predict/" + "a" * 5000 + "\ninjected line"
    with caplog.at_level(logging.INFO, logger="mask_service.access"):
        status, body, reads = _raw_request(app, odd_path, [(b"content-length", b"10")])
    detail = json.loads(body)["detail"]
    assert (status, reads) == (401, 0) and detail.startswith("POST '/api/predict/aaa") and "\n" not in detail
    assert len(detail) < 300
    lines = [r.getMessage() for r in caplog.records if r.name == "mask_service.access"]
    assert len(lines) == 1 and "\n" not in lines[0] and len(lines[0]) < 300
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mask_service.access"):  # h11 takes any token as a method, 16 KB
        status, body, reads = _raw_request(app, "/api/predict", [(b"content-length", b"10")], "G'E|T~!" * 2000)
    detail = json.loads(body)["detail"]
    assert status == 401 and detail.startswith('"G\'E|T~!') and len(detail) < 300
    lines = [r.getMessage() for r in caplog.records if r.name == "mask_service.access"]
    assert len(lines) == 1 and len(lines[0]) < 300

def test_a_request_over_the_pixel_budget_is_refused_before_decoding(tiny_model_file, sample_dir):
    photos = sorted((sample_dir / "images").glob("*.jpg"))[:2]  # 160x120 each
    app = create_app(ServiceConfig(model_path=tiny_model_file, pixels_in_memory=30_000))
    with TestClient(app) as client:
        one = client.post("/api/predict", files=[("files", ("a.jpg", photos[0].read_bytes(), "image/jpeg"))])
        both = client.post("/api/predict", files=[("files", (p.name, p.read_bytes(), "image/jpeg")) for p in photos])
    assert one.status_code == 200
    assert both.status_code == 413
    assert both.json()["detail"] == ("POST /api/predict: 2 images of 38,400 pixels in one request; at most 30,000: "
                                     "send fewer or smaller images")


def test_bad_query_values_are_one_bounded_line(tiny_model_file, sample_dir):
    photo = sorted((sample_dir / "images").glob("*.jpg"))[0]
    app = create_app(ServiceConfig(model_path=tiny_model_file))
    with TestClient(app) as client:
        answer = client.post("/api/predict?score_threshold=" + "9" * 5000,
                             files=[("files", ("a.jpg", photo.read_bytes(), "image/jpeg"))])
        missing = client.post("/api/predict")
        box = client.post("/api/explain?label=with_mask&box=" + "1," * 3000,
                          files=[("file", ("a.jpg", photo.read_bytes(), "image/jpeg"))])
        float_box = {given: client.post(f"/api/explain?label=with_mask&box={given}",
                                        files=[("file", ("a.jpg", photo.read_bytes(), "image/jpeg"))])
                     for given in ("1e39,0,2e39,1", "0,0,1e-46,1", "nan,0,1,1")}
        nan = client.post("/api/predict?score_threshold=nan", files=[("files", ("a.jpg", photo.read_bytes(),
                                                                                "image/jpeg"))])
    assert answer.status_code == 422
    detail = answer.json()["detail"]
    assert detail.startswith("POST /api/predict: query score_threshold: ") and len(detail) < 300
    assert missing.status_code == 422 and missing.json()["detail"].startswith("POST /api/predict: body files: ")
    assert box.status_code == 422 and box.json()["detail"].startswith("box '1,1,") and len(box.json()["detail"]) < 300
    for given in ("1e39,0,2e39,1", "0,0,1e-46,1", "nan,0,1,1"):  # inf, or x2 == x1, in the model's float32
        assert float_box[given].status_code == 422 and float_box[given].json()["detail"].startswith(f"box '{given}'")
    assert nan.status_code == 422 and "finite number" in nan.json()["detail"]


def _listening_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.parametrize("flags, message", [
    (["--port", "99999"], "argument --port: expected a whole number from 1 to 65535, got 99999"),
    (["--queue-size", "0"], "argument --queue-size: expected a whole number of at least 1, got 0"),
    (["--decode-threads", "two"], "argument --decode-threads: expected a whole number of at least 1, got 'two'"),
    (["--max-upload-mb", "nan"], "argument --max-upload-mb: expected a finite number above 0, got 'nan'"),
    (["--max-requests-per-client", "-1"], "argument --max-requests-per-client: expected a whole number of at least 0, "
                                          "got -1"),
    (["--stop-timeout", "-1"], "argument --stop-timeout: expected a finite number of 0 or more, got -1"),
    (["--host", "no.such.host.invalid"], "--host 'no.such.host.invalid': not an address of this machine"),
    (["--port", "IN_USE"], "cannot listen there (Address already in use)"),
    (["--model", "MISSING"], "none.pt: model file not found"),
])
@pytest.mark.slow
def test_serve_bad_flags_are_one_line_and_exit_2(root, tiny_model_file, tmp_path, flags, message):
    with _listening_port() as busy:
        flags = [str(busy.getsockname()[1]) if f == "IN_USE" else str(tmp_path / "none.pt") if f == "MISSING" else f
                 for f in flags]
        model = [] if "--model" in flags else ["--model", str(tiny_model_file)]
        free = _listening_port()
        free_port = str(free.getsockname()[1])
        free.close()
        proc = subprocess.run([sys.executable, str(root / "bin" / "serve.py"), *model, "--port", free_port, *flags],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("serve: error: ") and message in lines[0], lines


def test_a_second_server_that_bound_the_port_while_its_model_loaded_is_refused_in_one_line(root):
    """Two servers started on one port within a model's load both bind it (SO_REUSEADDR); the one that listens
    second is refused naming the address, not by a traceback out of uvicorn's listen()."""
    from helpers import load_script
    from utils.errors import InputError

    serve = load_script(root, "serve")
    first = serve.bind("127.0.0.1", 0)
    port = first.getsockname()[1]
    second = serve.bind("127.0.0.1", port)  # the first not listening yet: the second binds too
    serve.listen(first, "127.0.0.1", port, 16)
    with pytest.raises(InputError, match=rf"^--host 127.0.0.1 --port {port}: another server began to listen there "
                                         r"while the model loaded \(Address already in use\)$"):
        serve.listen(second, "127.0.0.1", port, 16)
    assert second.fileno() == -1  # closed
    first.close()


def test_serve_listens_before_uvicorn_so_a_server_that_listened_while_its_model_loaded_refuses_it(
        root, tiny_model_file, monkeypatch):
    """main() itself, not only listen(): the socket listens after the model loads and before uvicorn starts, so
    another server that began to listen on the port meanwhile ends this one in listen()'s line."""
    from helpers import load_script
    from utils.errors import InputError

    serve = load_script(root, "serve")
    with _listening_port() as probe:
        port = probe.getsockname()[1]
    other = []

    async def no_app(scope, receive, send):
        return None

    def load_while_another_server_starts(config):  # the other server binds (SO_REUSEADDR) and listens first
        other.append(serve.bind("127.0.0.1", port))
        other[0].listen()
        return no_app

    monkeypatch.setattr(service, "create_app", load_while_another_server_starts)
    monkeypatch.setattr(serve, "access_logging", lambda: None)  # no handler left on this process's logger
    monkeypatch.setattr(sys, "setswitchinterval", lambda interval: None)
    args = serve.get_args_parser().parse_args(["--model", str(tiny_model_file), "--port", str(port)])
    try:
        with pytest.raises(InputError, match=rf"^--host 127.0.0.1 --port {port}: another server began to listen"):
            serve.main(args)
    finally:
        other[0].close()


def test_serve_refuses_a_bad_flag_a_busy_port_or_a_missing_model_before_importing_torch(root, tmp_path):
    # bin/serve.py imported torch (~5 s of a 2-core machine) before it parsed its flags, bound its port or found
    # its model file missing: each of these refusals waited for an import it never used
    code = ("import runpy, sys\n"
            "for argv in sys.argv[1:]:\n"
            "    sys.argv = ['serve.py', *argv.split()]\n"
            "    try:\n"
            "        runpy.run_path('bin/serve.py', run_name='__main__')\n"
            "    except SystemExit as end:\n"
            "        print('exit', end.code)\n"
            "print('loaded:', sorted(m for m in ('torch', 'torchvision') if m in sys.modules))\n")
    model = tmp_path / "model.pt"
    model.write_bytes(b"PK\x03\x04 not read before torch")  # the checks before the port and torch read no more
    with _listening_port() as busy:
        done = subprocess.run([sys.executable, "-c", code, "--port 99999",
                               f"--model {model} --port {busy.getsockname()[1]}",
                               f"--model {tmp_path / 'none.pt'} --port {busy.getsockname()[1]}"],
                              cwd=root, capture_output=True, text=True, timeout=120)
    ends = [line for line in done.stdout.splitlines() if line.startswith(("exit ", "loaded: "))]  # not the args line
    assert ends == ["exit 2", "exit 2", "exit 2", "loaded: []"], done.stderr
    # the model file's checks come before the port is bound: a missing model is named even where the port is busy
    errors = [line for line in done.stderr.splitlines() if line.startswith("serve: error: ")]
    assert len(errors) == 3 and "Address already in use" in errors[1], done.stderr
    assert errors[2] == f"serve: error: {tmp_path / 'none.pt'}: model file not found"


def test_a_model_the_loader_refuses_after_the_port_is_bound_leaves_the_socket_closed(root, tmp_path, monkeypatch):
    """serve binds its port before the model loads; a model file that passes the checks before torch but that the
    loader refuses (not a torch file) left the bound socket open in the process that called main(), holding the
    port until the garbage collector came by."""
    from helpers import load_script
    from utils.errors import InputError

    serve = load_script(root, "serve")
    bound, bind = [], serve.bind
    monkeypatch.setattr(serve, "bind", lambda host, port: bound.append(bind(host, port)) or bound[-1])
    broken = tmp_path / "model.pt"
    broken.write_bytes(b"PK\x03\x04 not a torch file")
    with _listening_port() as probe:
        port = probe.getsockname()[1]
    args = serve.get_args_parser().parse_args(["--model", str(broken), "--port", str(port)])
    with pytest.raises(InputError, match=f"^{broken}: not a readable model file "):
        serve.main(args)
    assert len(bound) == 1 and bound[0].fileno() == -1  # closed


def _streamed_parts(app, path: str, part: bytes, count: int):
    """POST *count* multipart parts to the ASGI app, one per receive; (status, detail, parts the app read)."""
    reads, sent = [0], []

    async def receive():
        reads[0] += 1
        if reads[0] > count:
            return {"type": "http.request", "body": b"--A--\r\n", "more_body": False}
        return {"type": "http.request", "body": part, "more_body": True}

    async def send(message):
        sent.append(message)

    target, _, query = path.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": target, "raw_path": target.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(b"content-type", b"multipart/form-data; boundary=A")], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 8000)}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body)["detail"], reads[0]


def test_parts_past_the_limits_are_refused_while_the_body_streams(tiny_model_file):
    """Starlette's defaults let a request hold 1000 files and 1000 fields of 1 MB in memory before the route
    counted them: more file parts than --max-images (one for /api/explain), or any text field, are refused as the
    parser meets them, the rest of the body unread."""
    app = create_app(ServiceConfig(model_path=tiny_model_file, max_images=3))
    file_part = b'--A\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n\r\n' + b"x" * 1000 + b"\r\n"
    text_part = b'--A\r\nContent-Disposition: form-data; name="x"\r\n\r\n' + b"a" * 1000 + b"\r\n"
    status, detail, reads = _streamed_parts(app, "/api/predict", file_part, 300)
    assert status == 413 and "more than 3 files in one request; at most 3 (--max-images)" in detail and reads <= 5
    status, detail, reads = _streamed_parts(app, "/api/predict", text_part, 300)
    assert status == 422 and "a form field that is not a file" in detail and reads <= 2
    explain_part = file_part.replace(b'name="files"', b'name="file"')
    status, detail, reads = _streamed_parts(app, "/api/explain?box=1,1,5,5&label=with_mask", explain_part, 300)
    assert status == 413 and "more than one file" in detail and reads <= 3


def test_only_the_accepted_formats_are_ever_opened(tmp_path):
    """Pillow left to itself tries every plugin, and its ICO plugin decodes the whole image on open: the header
    check, the decode and the jobs' header read (utils/data/images.py) open JPEG, PNG, BMP, TIFF, WebP only."""
    from utils.data.images import NotAnImageError, check_image_pixels, image_size, load_rgb, load_rgb_bytes

    icon = tmp_path / "icon.jpg"
    Image.new("RGB", (64, 64)).save(icon, format="ICO")
    gif = tmp_path / "anim.png"
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    for path in (icon, gif):
        for read in (check_image_pixels, image_size, load_rgb, lambda p: load_rgb_bytes(p.read_bytes(), str(p))):
            with pytest.raises(NotAnImageError, match="not an image file"):
                read(path)
    webp = tmp_path / "a.webp"
    Image.new("RGB", (8, 6)).save(webp, format="WEBP")
    assert check_image_pixels(webp) == (8, 6) and load_rgb(webp).size == (8, 6)


def test_the_parsers_and_routers_own_refusals_name_the_request_and_what_it_takes(tiny_model_file):
    """Starlette's multipart parser and router answered 'Missing boundary in multipart.', 'Invalid multipart data.'
    (a part's header over python-multipart's 4 KB, say), 'Not Found' or 'Method Not Allowed' alone: no request
    named, nothing said of what to send. The method named is bounded (h11 takes any token up to 16 KB)."""
    app = create_app(ServiceConfig(model_path=tiny_model_file))
    huge_header = (b'--A\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\nX-' + b"a" * 5000
                   + b": b\r\n\r\nx\r\n--A--\r\n")
    with TestClient(app) as client:
        no_boundary = client.post("/api/predict", content=b"x", headers={"content-type": "multipart/form-data"})
        bad_part = client.post("/api/explain?box=1,1,5,5&label=with_mask", content=huge_header,
                               headers={"content-type": "multipart/form-data; boundary=A"})
        wrong_method, nowhere = client.get("/api/predict"), client.get("/api/nowhere")
    assert no_boundary.status_code == 400
    assert no_boundary.json()["detail"] == ("POST /api/predict: not a multipart form read here (Missing boundary in "
                                            "multipart); send the images as multipart/form-data file parts "
                                            "(field `files`)")
    assert bad_part.status_code == 400 and bad_part.json()["detail"].startswith(
        "POST /api/explain: not a multipart form read here (Invalid multipart data); send the images as "
        "multipart/form-data file parts (field `file`)")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert wrong_method.json()["detail"] == "GET /api/predict: method not allowed (this path takes POST)"
    assert nowhere.status_code == 404 and nowhere.json()["detail"] == "GET /api/nowhere: not found"
    status, body, _ = _raw_request(app, "/api/model", [], "G'E|T~!" * 2000)
    assert status == 405 and json.loads(body)["detail"].startswith('"G\'E|T~!') and len(body) < 300


def test_annotated_pictures_are_shrunk_so_an_answer_stays_small_and_boxes_follow():
    """?annotated=true drew each picture at full size: a request's pictures (up to 64 M pixels) made an answer of up
    to tens of MB, held outside the pixel budget for as long as its client took to read it. Drawn now at most
    SERVICE_ANNOTATED_MAX_SIDE pixels on the longer side, its boxes scaled with it."""
    import base64

    import numpy as np
    import torch

    from utils import defaults as D
    from utils.classes import CLASS_COLOURS, LABEL_OF
    from utils.service.uploads import annotated_jpeg

    tensor = torch.zeros((3, 1200, 1600), dtype=torch.uint8)  # a black 1600x1200 photo
    out = {"boxes": torch.tensor([[1000.0, 600.0, 1500.0, 1100.0]]), "labels": torch.tensor([LABEL_OF["with_mask"]]),
           "scores": torch.tensor([0.9])}
    url = annotated_jpeg(tensor, out, 0.5)
    picture = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    scale = D.SERVICE_ANNOTATED_MAX_SIDE / 1600
    assert picture.size == (D.SERVICE_ANNOTATED_MAX_SIDE, round(1200 * scale))
    pixels = np.asarray(picture.convert("RGB"), dtype=int)
    left, bottom = round(1000 * scale), round(1100 * scale)
    colour = np.array(CLASS_COLOURS["with_mask"])
    assert np.abs(pixels[(600 + 1100) // 2 * picture.height // 1200, left + 1] - colour).max() < 60  # its left edge
    assert np.abs(pixels[bottom - 1, round(1250 * scale)] - colour).max() < 60  # its bottom edge
    assert pixels[50, 50].max() < 30 and pixels[bottom + 20, left + 20].max() < 30  # black off the box
    small = annotated_jpeg(torch.zeros((3, 120, 160), dtype=torch.uint8), out, 0.5)  # no larger than sent
    assert Image.open(io.BytesIO(base64.b64decode(small.split(",", 1)[1]))).size == (160, 120)
