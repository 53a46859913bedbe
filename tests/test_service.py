"""The prediction service (utils/service/app.py, bin/serve.py) through FastAPI's TestClient: the answers,
the 4xx for bad uploads, the token, and the bounded queue (503 with Retry-After)."""

from __future__ import annotations

import io
import subprocess
import sys
import threading

import pytest
from PIL import Image

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from utils.service.app import ServiceConfig, create_app  # noqa: E402


@pytest.fixture(scope="module")
def client(tiny_model_file):
    with TestClient(create_app(ServiceConfig(model_path=tiny_model_file, max_upload_mb=1, max_images=3))) as c:
        yield c


def jpeg(sample_dir, index=0) -> bytes:
    return sorted((sample_dir / "images").glob("*.jpg"))[index].read_bytes()


def test_health_model_and_openapi(client):
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["queue"] == {"waiting": 0, "limit": 8}
    info = client.get("/api/model").json()
    assert info["classes"] == ["with_mask", "without_mask", "mask_weared_incorrect"]
    assert info["backbone"] == "retinaface_mnet025" and info["image_size"] == 128
    assert 0 < info["score_threshold"] <= 1 and info["limits"] == {"max_upload_mb": 1, "max_images": 3}
    assert info["tta"] is False and "holds no choice" in info["tta_source"]  # each request's default
    assert info["box_voting"] is False and info["box_vote_iou"] is None and "no choice" in info["box_voting_source"]
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/health", "/api/model", "/api/predict", "/api/explain"} <= set(paths)
    params = {p["name"] for p in paths["/api/predict"]["post"]["parameters"]}
    assert params == {"score_threshold", "tta", "annotated", "explain"}
    assert {p["name"] for p in paths["/api/explain"]["post"]["parameters"]} == {"box", "label", "method"}


def test_predict_two_images_with_compliance_and_annotated_pictures(client, sample_dir):
    files = [("files", ("a.jpg", jpeg(sample_dir, 0), "image/jpeg")),
             ("files", ("b.png", _png(jpeg(sample_dir, 1)), "image/png"))]
    answer = client.post("/api/predict?score_threshold=0.1&annotated=true", files=files)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [image["file"] for image in body["images"]] == ["a.jpg", "b.png"]
    assert body["tta"] is False  # not asked for: the model's choice (none in this file)
    assert body["score_threshold"] == 0.1 and body["score_threshold_source"] == "query"
    for image in body["images"]:
        assert (image["width"], image["height"]) == (320, 240) or image["width"] > 0
        counted = [d for d in image["detections"] if d["score"] >= 0.1]
        assert image["compliance"]["faces"] == len(counted)
        assert all(d["score"] >= 0.05 for d in image["detections"])  # the floor, for client-side re-filtering
        assert image["annotated"].startswith("data:image/jpeg;base64,")
    assert body["overall"]["faces"] == sum(image["compliance"]["faces"] for image in body["images"])
    # the overall figure as an estimate with its interval, over the images sent, at the request's threshold
    assert body["estimate"]["method"] == "cc" and body["estimate"]["units"] == 2 and body["estimate"]["seed"] == 42
    assert body["estimate"]["percent"] == body["overall"]["percent_properly_masked"]
    assert body["estimate"]["faces_found"] == body["overall"]["faces"]
    assert set(body["estimates"]) == {"cc", "pcc"} and "acc" in body["unavailable"]


def _png(data: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buffer, format="PNG")
    return buffer.getvalue()


def _ico() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="ICO")
    return buffer.getvalue()


@pytest.mark.parametrize("files, status, reason", [
    ([("files", ("notes.txt", b"hello", "text/plain"))], 415, "notes.txt: not an image file"),  # the bytes decide
    ([("files", ("fake.jpg", b"\xff\xd8\xff not a jpeg", "image/jpeg"))], 415, "fake.jpg: not an image file"),
    ([("files", ("text.jpg", b"hello", "image/jpeg"))], 415, "text.jpg: not an image file"),  # the bytes decide
    ([("files", ("icon.png", _ico(), "image/png"))], 415, "icon.png: not an image file"),  # ICO: never opened
    ([("files", ("big.jpg", b"\xff" * (2**20 + 10), "image/jpeg"))], 413, "big.jpg: larger than 1 MB"),
    ([("files", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(4)], 413,
     "more than 3 files in one request; at most 3"),
])
def test_bad_uploads_get_a_4xx_naming_the_problem(client, files, status, reason):
    answer = client.post("/api/predict", files=files)
    assert answer.status_code == status and reason in answer.json()["detail"]


def test_an_image_too_thin_for_the_model_is_422_not_500(client):
    """The tiny model resizes to at most 128 pixels on the long side: a 2x257 strip's short side comes out at 0
    pixels, and torch's resize raised on the model's thread (500, with a traceback in the log); 2x256 is 1 pixel
    wide there and is answered. /api/explain reads the upload the same way."""
    def png(width, height) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (width, height)).save(buffer, format="PNG")
        return buffer.getvalue()

    for size in ((2, 257), (257, 2)):
        answer = client.post("/api/predict", files=[("files", ("strip.png", png(*size), "image/png"))])
        assert answer.status_code == 422, answer.text
        assert answer.json()["detail"].startswith(f"strip.png: {size[0]}x{size[1]} px is too thin for the detector")
    answer = client.post("/api/explain?box=0,0,1,1&label=with_mask",
                         files=[("file", ("strip.png", png(2, 257), "image/png"))])
    assert answer.status_code == 422 and "too thin" in answer.json()["detail"]
    assert client.post("/api/predict", files=[("files", ("s.png", png(2, 256), "image/png"))]).status_code == 200


def test_the_declared_type_is_read_as_a_media_type(client, sample_dir):
    for declared in ("IMAGE/JPEG", "image/jpeg; charset=x", " image/jpeg "):
        answer = client.post("/api/predict", files=[("files", ("a.jpg", jpeg(sample_dir), declared))])
        assert answer.status_code == 200, (declared, answer.text)


def test_truncated_image_and_bad_threshold(client, sample_dir):
    data = jpeg(sample_dir)
    answer = client.post("/api/predict", files=[("files", ("cut.jpg", data[: len(data) // 2], "image/jpeg"))])
    assert answer.status_code == 422 and answer.json()["detail"].startswith("cut.jpg: ")
    assert client.post("/api/predict?score_threshold=2", files=[("files", ("a.jpg", data, "image/jpeg"))]
                       ).status_code == 422


def test_token_required_when_set(tiny_model_file, sample_dir):
    app = create_app(ServiceConfig(model_path=tiny_model_file, token="s3cret"))
    with TestClient(app) as c:
        files = [("files", ("a.jpg", jpeg(sample_dir), "image/jpeg"))]
        assert c.get("/api/health").status_code == 200
        assert c.get("/api/model").status_code == 401
        assert c.post("/api/predict", files=files, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post("/api/predict", files=files, headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_a_full_queue_answers_503_with_retry_after(tiny_model_file, sample_dir, monkeypatch):
    app = create_app(ServiceConfig(model_path=tiny_model_file, queue_size=1))
    release = threading.Event()
    import utils.service.app as service

    real_detect = service.detect

    def slow_detect(*args, **kwargs):
        release.wait(30)
        return real_detect(*args, **kwargs)

    monkeypatch.setattr(service, "detect", slow_detect)
    files = [("files", ("a.jpg", jpeg(sample_dir), "image/jpeg"))]
    with TestClient(app) as c:
        first = {}
        worker = threading.Thread(target=lambda: first.update(answer=c.post("/api/predict", files=files)))
        worker.start()
        for _ in range(200):  # until the first request holds the only queue place
            if c.get("/api/health").json()["queue"]["waiting"] == 1:
                break
            threading.Event().wait(0.05)
        busy = c.post("/api/predict", files=files)
        release.set()
        worker.join(60)
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "2" and "busy" in busy.json()["detail"]
    assert first["answer"].status_code == 200


def test_one_client_cannot_hold_every_queue_place_and_another_still_gets_in(tiny_model_file, sample_dir, monkeypatch):
    """One address with as many requests as --queue-size (a script with 8 workers) held every place, and every other
    client was answered 503 for as long as it kept them up. A client now holds at most its share (its share of
    --max-requests, of --queue-size: 2 of 8 by default); one more from it is 429 with the reason and Retry-After, and
    another address still gets in."""
    import utils.service.app as service

    app = create_app(ServiceConfig(model_path=tiny_model_file, queue_size=4))  # a client's share: 8 of 32, 1 of 4
    assert app.state.queue.per_client == 1
    release, real_detect = threading.Event(), service.detect

    def held_detect(*args, **kwargs):
        release.wait(30)
        return real_detect(*args, **kwargs)

    monkeypatch.setattr(service, "detect", held_detect)

    async def from_client(scope, receive, send):  # the client address as uvicorn would report it, from a header
        if scope["type"] == "http":
            scope["client"] = (dict(scope["headers"])[b"x-test-client"].decode(), 1)
        await app(scope, receive, send)

    files = [("files", ("a.jpg", jpeg(sample_dir), "image/jpeg"))]
    answers = {}

    def post(name, client):
        answers[name] = c.post("/api/predict", files=files, headers={"x-test-client": client})

    def queued(count):  # bounded: only a hang runs out
        for _ in range(600):
            if app.state.queue.waiting == count:
                return True
            threading.Event().wait(0.05)
        return False

    with TestClient(from_client) as c:
        first = threading.Thread(target=post, args=("first", "10.0.0.1"))
        first.start()
        assert queued(1)
        post("again", "10.0.0.1")  # the old code admitted it, and it waited for the model with the first
        other = threading.Thread(target=post, args=("other", "10.0.0.2"))
        other.start()
        assert queued(2)
        release.set()
        first.join(60)
        other.join(60)
    again = answers["again"]
    assert again.status_code == 429 and again.headers["Retry-After"] == "2", again.text
    assert again.json()["detail"] == ("POST /api/predict: too many requests from '10.0.0.1' waiting for the model: 1 "
                                      "of the 4 places (--queue-size); at most 1 from one client; retry when one is "
                                      "answered")
    assert answers["first"].status_code == 200 and answers["other"].status_code == 200
    assert app.state.queue.waiting == 0 and app.state.queue.by_client == {}  # every place given back


@pytest.mark.slow
def test_serve_refuses_a_missing_model_in_one_line(root, tmp_path):
    proc = subprocess.run([sys.executable, str(root / "bin" / "serve.py"), "--model", str(tmp_path / "none.pt")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"serve: error: {tmp_path / 'none.pt'}: model file not found"


@pytest.mark.browser
def test_the_page_in_a_real_browser_shows_boxes_and_compliance_and_refilters(tiny_model_file, sample_dir,
                                                                            tmp_path):
    from browser import chromium_session, serve_app

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    photo = sorted((sample_dir / "images").glob("*.jpg"))[0]
    app = create_app(ServiceConfig(model_path=tiny_model_file))
    with serve_app(app) as url, chromium_session(tmp_path) as browser:
        browser.get(url)
        wait = WebDriverWait(browser, 60)
        wait.until(EC.text_to_be_present_in_element((By.ID, "model"), "retinaface_mnet025"))
        browser.find_element(By.ID, "files").send_keys(str(photo))
        card = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, f".card[data-file='{photo.name}']")))
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".card img")))
        wait.until(lambda b: b.execute_script("return document.querySelector('.card img').complete"))
        overall_text = browser.find_element(By.ID, "overall").text
        # the page's count at the threshold, named as what it is: "properly masked" is the server's estimate alone
        assert "Overall:" in overall_text and "with_mask among the faces kept at the threshold (cc)" in overall_text
        assert "properly masked" not in overall_text.replace(browser.find_element(By.ID, "overall-interval").text, "")
        # a photo's heading holds its count's words whole: kept on one line, they ran past a 380 px card, cut off
        browser.set_window_size(440, 1000)
        heading = "const h = document.querySelector('.card h3'); return [h.scrollWidth, h.clientWidth]"
        scroll, client = browser.execute_script(heading)
        assert scroll <= client, (scroll, client)
        estimate_text = browser.find_element(By.ID, "overall-interval").text
        assert "1 image" in estimate_text  # the server's estimate, its images
        # a model file without validation rates: the headline is cc, standing in for pacc2, and the page says why
        assert "cc instead of pacc2: the model file holds no validation rates" in estimate_text
        at_model_threshold = len(browser.find_elements(By.CSS_SELECTOR, ".box"))
        # the slider re-filters in the page: no new request, more boxes at the lowest threshold
        requests_before = browser.execute_script("return performance.getEntriesByType('resource').length")
        browser.execute_script("const s = document.getElementById('threshold'); s.value = s.min;"
                               "s.dispatchEvent(new Event('input'));")
        at_floor = len(browser.find_elements(By.CSS_SELECTOR, ".box"))
        assert at_floor >= at_model_threshold and at_floor > 0  # an untrained model: many low-score boxes
        assert browser.find_element(By.ID, "threshold-value").text == "0.05"
        scroll, client = browser.execute_script(heading)  # its longer words now: '…% with_mask among the faces kept…'
        assert scroll <= client and "with_mask among" in browser.find_element(By.CSS_SELECTOR, ".card .pct").text
        assert "at the request's threshold only" in browser.find_element(By.ID, "overall-interval").text
        card = browser.find_element(By.CSS_SELECTOR, ".card")
        assert "face(s)" in card.text and len(card.find_elements(By.CSS_SELECTOR, "tbody tr")) == at_floor
        assert browser.execute_script("return performance.getEntriesByType('resource').length") == requests_before
        # clicking a box asks /api/explain for that box and shows the heat map in its card
        browser.find_elements(By.CSS_SELECTOR, ".box")[-1].click()  # the last drawn lies on top of the others
        picture = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".card .explain img.explanation")))
        wait.until(lambda b: b.execute_script("const i = document.querySelector('.explain img');"
                                              "return i.complete && i.naturalWidth > 0"))
        assert "of the heat lies inside the box" in browser.find_element(By.CSS_SELECTOR, ".explain").text
        assert picture.get_attribute("src").startswith("data:image/jpeg;base64,")
        assert len(browser.find_elements(By.CSS_SELECTOR, ".box.chosen")) == 1
        assert browser.save_screenshot(str(tmp_path / "page.png"))
        # a bad upload is answered on the page with the service's reason
        bad = tmp_path / "notes.txt"
        bad.write_text("not an image")
        browser.find_element(By.ID, "files").send_keys(str(bad))
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "Not processed"))
        assert "notes.txt" in browser.find_element(By.ID, "status").text
    assert (tmp_path / "page.png").stat().st_size > 10_000


@pytest.mark.browser
def test_the_page_pairs_each_answer_with_its_own_file_whatever_the_names(tiny_model_file, sample_dir, tmp_path):
    """The page looked its previews and files up by name: two files of one name from two folders both showed the
    last one's picture (and its box explained the wrong image), and a name with a quote (sent by the browser as
    %22) found no preview at all and its box's explanation never came (a TypeError). Each answer is now paired
    with the file at its place in the upload."""
    from browser import chromium_session, serve_app
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    photos = sorted((sample_dir / "images").glob("*.jpg"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    paths = [tmp_path / "a" / "same.jpg", tmp_path / "b" / "same.jpg", tmp_path / 'q"<i>x&y.jpg']
    paths[0].write_bytes(photos[0].read_bytes())
    Image.open(photos[1]).resize((80, 60)).save(paths[1])
    paths[2].write_bytes(photos[2].read_bytes())
    app = create_app(ServiceConfig(model_path=tiny_model_file))
    with serve_app(app) as url, chromium_session(tmp_path) as browser:
        browser.get(url)
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.execute_script("return state.model !== null"))
        browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in paths))
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".card")) == 3)
        wait.until(lambda b: b.execute_script("return [...document.querySelectorAll('.card .frame img')]"
                                              ".every((i) => i.complete)"))
        shown = browser.execute_script("return [...document.querySelectorAll('.card .frame img')]"
                                       ".map((i) => i.naturalWidth)")
        assert shown == [160, 80, 160]  # each card shows its own picture
        title = browser.find_elements(By.CSS_SELECTOR, ".card h3 span")[4].text  # cards' name and percent spans
        assert "<i>x&y" in title  # the name as text, not markup
        browser.execute_script("const s = document.getElementById('threshold'); s.value = s.min;"
                               "s.dispatchEvent(new Event('input'));")
        card = browser.find_elements(By.CSS_SELECTOR, ".card")[2]
        card.find_elements(By.CSS_SELECTOR, ".box")[-1].click()
        # read in one script: the page redraws the cards as answers come, and an element found in one call could be
        # gone by the next (StaleElementReferenceException)
        explained = "return document.querySelectorAll('.card .explain')[2].innerText"
        wait.until(lambda b: "Computing" not in b.execute_script(explained))
        assert "of the heat lies inside the box" in browser.execute_script(explained)


@pytest.mark.browser
def test_the_page_shows_every_refusal_with_its_status_and_reason(tiny_model_file, sample_dir, tmp_path):
    """The page said only "model unavailable (401)" without a token (the service's reason, and how to give the
    token, left out); read every error answer as JSON, so a reverse proxy's HTML page (nginx's 413 for a photo over
    its 1 MB default) showed only the syntax error; and sent uploads the service refuses while they stream, whose
    answer a browser can lose when the connection is closed under the upload. Now: the status and the reason (the
    detail, or the page's text), and the service's limits (/api/model) checked before sending."""
    from browser import chromium_session, serve_app
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    app = create_app(ServiceConfig(model_path=tiny_model_file, token="s3cret", max_images=2, max_upload_mb=1))
    html_413 = (b"<html><head><title>413 Request Entity Too Large</title></head><body><center><h1>413 Request Entity "
                b"Too Large</h1></center><hr><center>nginx</center></body></html>")

    async def behind_a_proxy(scope, receive, send):  # a proxy refusing a request (marked ?big), as nginx words it
        if scope["type"] == "http" and scope["path"] == "/api/predict" and b"big" in scope["query_string"]:
            await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"text/html")]})
            await send({"type": "http.response.body", "body": html_413})
            return
        await app(scope, receive, send)

    photos = sorted((sample_dir / "images").glob("*.jpg"))[:3]
    photo = photos[0]
    large = tmp_path / "large.jpg"
    large.write_bytes(photo.read_bytes() + b"\0" * 2**20)  # over --max-upload-mb 1
    with serve_app(behind_a_proxy) as url, chromium_session(tmp_path) as browser:
        wait = WebDriverWait(browser, 60)
        browser.get(url)
        wait.until(EC.text_to_be_present_in_element((By.ID, "model"), "unavailable"))
        shown = browser.find_element(By.ID, "model").text
        assert shown.startswith("Model unavailable: 401 ") and shown.endswith(
            ": GET /api/model: missing or wrong bearer token (Authorization: Bearer <token>); open this page as "
            "…/#token=THE_TOKEN")
        browser.get(url + "#token=s3cret")
        browser.refresh()
        wait.until(lambda b: b.execute_script("return state.model !== null"))
        requests_before = browser.execute_script("return performance.getEntriesByType('resource').length")
        choose = browser.find_element(By.ID, "files")
        choose.send_keys("\n".join(str(p) for p in photos))
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "Not sent"))
        assert browser.find_element(By.ID, "status").text == "Not sent: 3 images; at most 2 in one request"
        browser.execute_script("document.getElementById('files').value = ''")  # a new choice, not added to
        choose.send_keys(str(large))
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "large.jpg"))
        assert browser.find_element(By.ID, "status").text == "Not sent: large.jpg: larger than 1 MB"
        assert browser.execute_script("return performance.getEntriesByType('resource').length") == requests_before
        browser.execute_script("const send = window.fetch; window.fetch = (url, options) => "
                               "send(String(url).replace('api/predict', 'api/predict?big'), options);")
        browser.execute_script("document.getElementById('files').value = ''")
        choose.send_keys(str(photo))
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "Not processed"))
        shown = browser.find_element(By.ID, "status").text
        assert shown.startswith("Not processed: 413 ") and "413 Request Entity Too Large nginx" in shown, shown
