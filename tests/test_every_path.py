"""One model, the same photos in the awkward but legal forms users hold (EXIF orientation 1-8, greyscale, a palette
with transparency, 16-bit PNG, CMYK and progressive JPEG, 8x8 and 4000x50 px, a PNG named .jpg)
through every way the project runs it: bin/predict.py on a folder, bin/merge_predictions.py over shards,
bin/evaluate.py, the service's JSON (and the count its page makes of it), predict_video on a lossless video of the
decoded photos, and the explanations (predict --explain, /api/explain). Each gives a photo the same boxes, labels,
scores and count of properly masked faces, and refuses the same photos (a GIF, a TIFF of two pages, a strip too thin
for the model) naming the file and the problem in the same words, each refusal listed in that path's report."""

from __future__ import annotations

import csv
import json
import math

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import run_script
from utils.data.images import load_rgb
from utils.data.voc import VocAnnotation, VocObject, write_voc

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from utils.service.app import ServiceConfig, create_app  # noqa: E402

THRESHOLD = 0.1  # the untrained model's scores spread from the floor up: boxes under it and over it
BOX_TOLERANCE = 0.06  # px: the service lists boxes to 1 decimal, predict to 2
SCORE_STEP = 1.5e-4  # scores are listed to 4 decimals: one step, and 0.5001 - 0.5 is a hair over 1e-4 in floats
# The stored pixels that EXIF orientation k turns back into the photo (the inverse of Pillow's exif_transpose)
STORED_FOR = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
              7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}
TYPES = {".jpg": "image/jpeg", ".png": "image/png", ".tif": "image/tiff", ".gif": "image/gif"}
# photos whose decoded pixels are base.png's, pixel for pixel: they must have its detections on every path
AS_BASE = [f"exif{k}.png" for k in range(1, 9)] + ["base_named.jpg"]
REFUSED = ("anim.gif", "pages.tif", "thin.png")
SAMPLE = "sample_0000"  # the photo of tests/conftest.py's sample_dir all these are made of


def write_awkward_photos(images, annotations, base: Image.Image) -> list[str]:
    """*base* in every form, in *images*, each with a VOC file of its displayed size in *annotations*."""
    flipped = base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    base.save(images / "base.png")
    for k, stored in STORED_FOR.items():
        exif = Image.Exif()
        exif[0x0112] = k
        (base if stored is None else base.transpose(stored)).save(images / f"exif{k}.png", exif=exif)
    base.convert("L").save(images / "grey.png")
    Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257).save(images / "deep16.png")  # I;16
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    palette.save(images / "palette.png", transparency=0)  # palette index 0 transparent: white where it was
    base.convert("CMYK").save(images / "cmyk.jpg", quality=95)
    base.save(images / "progressive.jpg", quality=95, progressive=True)
    base.save(images / "pages.tif", save_all=True, append_images=[flipped])  # which page is the photo? refused
    base.save(images / "base_named.jpg", format="PNG")  # the extension lies: the bytes decide
    base.resize((8, 8), Image.Resampling.LANCZOS).save(images / "tiny8.png")
    base.resize((4000, 50), Image.Resampling.LANCZOS).save(images / "wide.png")
    base.resize((4000, 20), Image.Resampling.LANCZOS).save(images / "thin.png")  # 0.64 px tall at 128 px
    base.save(images / "anim.gif", save_all=True, append_images=[flipped])  # no format read here
    names = sorted(path.name for path in images.iterdir())
    for name in names:
        width, height = (4000, 20) if name == "thin.png" else base.size if name in REFUSED else \
            load_rgb(images / name).size
        write_voc(annotations / f"{name.rsplit('.', 1)[0]}.xml", VocAnnotation(name, width, height, objects=[
            VocObject("with_mask", 0, 0, max(2, width // 2), max(2, height // 2))]))
    return names


class Journal:
    """video_progress.VideoProgress's calls: keeps the detections predict_video counts on each frame."""

    def __init__(self):
        self.found = {}

    def detections(self, index):
        return None

    def add(self, index, out, soft):
        self.found[index] = out

    def close(self):
        pass

    def finish(self):
        pass


def video_of(pictures: list[Image.Image], path, model) -> list[dict]:
    """predict_video's counted detections and faces (its CSV's) for each frame of a lossless video of *pictures*
    (of one size), a frame each."""
    from utils.detection.video import predict_video

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), 1.0, pictures[0].size)
    for picture in pictures:
        writer.write(cv2.cvtColor(np.asarray(picture), cv2.COLOR_RGB2BGR))
    writer.release()
    journal = Journal()
    predict_video(model, torch.device("cpu"), str(path), path.with_suffix(""), score_threshold=THRESHOLD,
                  journal=journal)
    with open(path.with_suffix("") / "video_frames.csv", encoding="utf-8") as rows:
        faces = [int(row["faces"]) for row in csv.DictReader(rows)]
    assert len(faces) == len(journal.found) == len(pictures)
    return [{"faces": count, "detections": [{"box": box, "label": label, "score": score} for box, label, score in
                                            zip(out["boxes"].tolist(), out["labels"].tolist(), out["scores"].tolist())]}
            for count, out in zip(faces, (journal.found[index] for index in range(len(pictures))))]


@pytest.fixture(scope="module")
def paths(root, sample_dir, tiny_model_file, tmp_path_factory):
    """Every path's answer for every photo, by file name."""
    from utils.classes import NAME_OF
    from utils.detection.evaluation import load_trained_model

    work = tmp_path_factory.mktemp("every_path")
    images, annotations = work / "images", work / "annotations"
    images.mkdir()
    annotations.mkdir()
    base = Image.open(sample_dir / "images" / f"{SAMPLE}.jpg").convert("RGB")
    names = write_awkward_photos(images, annotations, base)
    common = ["--model", tiny_model_file, "--score-threshold", THRESHOLD, "--device", "cpu", "--workers", "0"]
    found = {"predict": {"images": [], "skipped": []}, "compliance": {}, "service": {}, "explain": {}, "video": {}}
    explained = names[0::2]  # predict --explain on one shard (a backward pass a box): these are compared
    for number, shard in enumerate([work / "shard0", work / "shard1"]):  # predict on each folder, then the merge
        shard.mkdir()
        for name in names[number::2]:
            (shard / name).write_bytes((images / name).read_bytes())
        drawn = ["--explain", "--explain-max-boxes", "1", "--annotated-dir", work / "drawn"] if number == 0 else \
            ["--no-annotated"]
        assert run_script(root, "predict", ["--images", shard, "--output-dir", work / "parts", "--output-tag",
                                            f"s{number}", *drawn, *common]) == 0
        part = json.loads((work / "parts" / f"predictions_s{number}.json").read_text())
        found["predict"]["images"] += part["images"]
        found["predict"]["skipped"] += part["skipped"]
        found["compliance"].update(json.loads((work / "parts" / f"compliance_s{number}.json").read_text())["per_image"])
    assert run_script(root, "merge_predictions", ["--inputs-dir", work / "parts", "--output-dir", work / "merged"]) == 0
    assert run_script(root, "evaluate", ["--images", images, "--annotations", annotations, "--output-dir",
                                         work / "evaluate", *common]) == 0
    found.update({"merged": json.loads((work / "merged" / "compliance.json").read_text()),
                  "evaluate": json.loads((work / "evaluate" / "evaluation.json").read_text()),
                  "evaluate_images": json.loads((work / "evaluate" / "evaluation_images.json").read_text())})
    with TestClient(create_app(ServiceConfig(model_path=tiny_model_file, explain_max_boxes=1))) as client:
        for name in names:
            upload = (name, (images / name).read_bytes(), TYPES[name[name.rindex("."):]])
            explain = "&explain=true" if name in explained else ""
            answer = client.post(f"/api/predict?score_threshold={THRESHOLD}{explain}", files=[("files", upload)])
            found["service"][name] = (answer.status_code, answer.json())
            if explain and answer.status_code == 200 and answer.json()["images"][0]["detections"]:
                best = max(answer.json()["images"][0]["detections"], key=lambda d: d["score"])
                query = f"box={','.join(map(str, best['box']))}&label={best['label']}"
                found["explain"][name] = client.post(f"/api/explain?{query}", files=[("file", upload)]).json()
    model, _, _, _ = load_trained_model(tiny_model_file, torch.device("cpu"))
    by_size = {}  # a video of the photos: one of each size, its frames the photos as decoded
    for name in names:
        if name not in REFUSED:
            picture = load_rgb(images / name)
            by_size.setdefault(picture.size, []).append((name, picture))
    for number, photos in enumerate(by_size.values()):
        frames = video_of([picture for _, picture in photos], work / f"video{number}.avi", model)
        found["video"].update(zip([name for name, _ in photos], frames))
    found["names"], found["labels"] = names, NAME_OF
    return found


def by_name(records: list[dict]) -> dict:
    return {record["file"].rsplit("/", 1)[-1]: record for record in records}


def same_detections(one: list[dict], other: list[dict]) -> bool:
    """Whether each detection of *one* has its own in *other*: the label, the score to one step of its 4 decimals
    (1.5e-4: 0.5001 - 0.5 is 1.0000000000000009e-4 in floats), the box to
    BOX_TOLERANCE. Matched, not zipped: an image run in a batch of four (predict) and alone (the service) gets
    scores a float rounding apart, which reorders the untrained model's tied ones (tests/test_detect.py)."""
    left = list(other)
    for a in one:
        match = next((b for b in left if a["label"] == b["label"] and abs(a["score"] - b["score"]) < SCORE_STEP
                      and all(abs(x - y) <= BOX_TOLERANCE for x, y in zip(a["box"], b["box"]))), None)
        if match is None:
            return False
        left.remove(match)
    return not left


@pytest.mark.e2e  # predict on two folders, their merge, evaluate, the service, a video
def test_every_path_gives_a_photo_the_same_boxes_labels_scores_and_count(paths):
    predicted = by_name(paths["predict"]["images"])
    merged = {name.rsplit("/", 1)[-1]: figure for name, figure in paths["merged"]["per_image"].items()}
    evaluated = {entry["image"]: entry for entry in paths["evaluate_images"]["images"]}
    figures = {name.rsplit("/", 1)[-1]: figure for name, figure in paths["compliance"].items()}
    checked = [name for name in paths["names"] if name not in REFUSED]
    assert sorted(predicted) == checked and sum(len(predicted[n]["detections"]) for n in checked) > 2 * len(checked)
    for name in checked:
        mine = predicted[name]
        status, answer = paths["service"][name]
        assert status == 200, answer
        served = answer["images"][0]
        counted = [d for d in served["detections"] if d["score"] >= THRESHOLD]  # the page's count of the answer
        assert same_detections(mine["detections"], counted), name
        assert (served["width"], served["height"]) == (mine["width"], mine["height"]), name
        video = paths["video"][name]
        labelled = [{**d, "label": paths["labels"][d["label"]]} for d in video["detections"]]
        assert same_detections(mine["detections"], labelled), name
        for figure in (served["compliance"], merged[name]):
            assert figure == figures[name], name
        faces = figures[name]["faces"]
        assert (video["faces"], evaluated[name]["detections"]) == (faces, faces), name
        assert evaluated[name]["predicted_percent"] == figures[name]["percent_properly_masked"], name


@pytest.mark.e2e  # predict on two folders, their merge, evaluate, the service, a video
def test_exif_orientations_and_a_lying_extension_read_the_photo_itself(paths):
    # stored turned, or as a PNG named .jpg: decoded as base.png is, so its very detections
    predicted = by_name(paths["predict"]["images"])
    for name in AS_BASE:
        assert same_detections(predicted[name]["detections"], predicted["base.png"]["detections"]), name
        assert (predicted[name]["width"], predicted[name]["height"]) == (160, 120), name
    # a 16-bit PNG is scaled by 257, as the 8-bit grey photo it was made from
    assert same_detections(predicted["deep16.png"]["detections"], predicted["grey.png"]["detections"])


@pytest.mark.e2e  # predict on two folders, their merge, evaluate, the service, a video
def test_predict_and_the_service_explain_a_box_alike(paths):
    predicted = by_name(paths["predict"]["images"])
    explained = 0
    for name, answer in paths["explain"].items():
        mine = predicted[name].get("explanations")
        best = max(predicted[name]["detections"], key=lambda d: d["score"], default=None)
        if not mine or best is None:
            continue
        assert answer["label"] == mine[0]["label"] == best["label"], name
        assert abs(answer["score"] - best["score"]) < SCORE_STEP, name
        assert abs(answer["evidence_in_box"] - mine[0]["evidence_in_box"]) <= 1e-3, name
        served = max(paths["service"][name][1]["images"][0]["detections"], key=lambda d: d["score"])
        assert abs(served["explanation"]["evidence_in_box"] - mine[0]["evidence_in_box"]) <= 1e-3, name
        explained += 1
    assert explained >= 4


@pytest.mark.e2e  # predict on two folders, their merge, evaluate, the service, a video
def test_every_path_refuses_the_same_photos_naming_the_file_and_the_problem_and_lists_them(paths):
    skipped = {entry["file"].rsplit("/", 1)[-1]: entry["reason"] for entry in paths["predict"]["skipped"]}
    assert sorted(skipped) == sorted(REFUSED) and len(paths["predict"]["images"]) == len(paths["names"]) - len(REFUSED)
    thin = skipped["thin.png"]
    assert thin.startswith("4000x20 px is too thin for the detector")
    assert skipped["anim.gif"].startswith("not an image file (format not recognised")  # by its bytes, as everywhere
    assert skipped["pages.tif"].startswith("a TIFF of 2 pages: which one is the photo is unknown")
    evaluated = {entry["file"].rsplit("/", 1)[-1]: entry["reason"] for entry in paths["evaluate"]["skipped"]}
    assert all(evaluated[name] == skipped[name] for name in REFUSED), evaluated
    assert paths["evaluate"]["num_images"] == len(paths["names"]) - len(REFUSED)
    merged = {entry["file"].rsplit("/", 1)[-1] for entry in paths["merged"]["skipped"]}
    assert merged == set(REFUSED)
    status, answer = paths["service"]["thin.png"]
    assert status == 422 and answer["detail"].startswith(f"thin.png: {thin}")
    for name, code in (("anim.gif", 415), ("pages.tif", 422)):  # the service read the declared type, not the bytes
        assert paths["service"][name] == (code, {"detail": f"{name}: {skipped[name]}"})


def test_the_service_counts_a_face_at_the_threshold_as_predict_does_not_by_its_rounded_score(
        root, sample_dir, tiny_model_file, tmp_path):
    """The service counted the detections whose score, rounded to 4 decimals, reached the threshold: a 0.49996 was
    listed as 0.5 and counted at 0.5, where predict, predict_video and evaluate compare the score itself. Now
    every path counts by the score, and a listed score is cut to 4 decimals, so that the page's count of the
    answer (listed score >= threshold) is the service's at any threshold of 4 decimals."""
    from utils.detection.evaluation import load_trained_model
    from utils.detection.inference import ImageItem, detect_files

    photo = sorted((sample_dir / "images").glob("*.jpg"))[1]
    model, _, _, _ = load_trained_model(tiny_model_file, torch.device("cpu"))
    (result,) = detect_files(model, [ImageItem(photo.name, photo)], "cpu", score_threshold=0.05, num_workers=0)
    scores = result.scores.tolist()
    # a score that rounds up to 4 decimals, whose rounding is the threshold: under it, yet listed at it when rounded
    score = next(s for s in sorted(scores, reverse=True) if round(s, 4) > s and not any(s < o <= round(s, 4)
                                                                                       for o in scores))
    threshold = round(score, 4)
    faces = int((result.scores >= threshold).sum())
    assert run_script(root, "predict", ["--images", photo, "--model", tiny_model_file, "--output-dir", tmp_path,
                                        "--score-threshold", threshold, "--workers", "0", "--device", "cpu",
                                        "--no-annotated"]) == 0
    predicted = json.loads((tmp_path / "compliance.json").read_text())["overall"]["faces"]
    with TestClient(create_app(ServiceConfig(model_path=tiny_model_file))) as client:
        answer = client.post(f"/api/predict?score_threshold={threshold}",
                             files=[("files", (photo.name, photo.read_bytes(), "image/jpeg"))]).json()
    served = answer["images"][0]
    assert predicted == faces == served["compliance"]["faces"] == answer["overall"]["faces"]
    assert sum(d["score"] >= threshold for d in served["detections"]) == faces  # the page's count


@pytest.mark.parametrize("threshold", [round(0.05 * step, 2) for step in range(1, 20)] + [0.1234, 0.0001])
def test_a_listed_score_reaches_a_threshold_exactly_when_the_job_counts_the_score(threshold):
    # the model's scores are float32, compared with the threshold as torch compares them (cast to float32)
    from utils.detection.compliance import listed_score

    near = np.float32(threshold)
    for score in (near, np.nextafter(near, np.float32(0)), np.nextafter(near, np.float32(1)), threshold - 4e-5,
                  threshold + 4e-5, threshold - 5e-5, math.nextafter(threshold, 0), math.nextafter(threshold, 1)):
        counted = bool(torch.tensor([float(score)], dtype=torch.float32)[0] >= threshold)
        assert (listed_score(score) >= threshold) == counted, (threshold, float(score))
        assert abs(float(np.float32(score)) - listed_score(score)) < 1e-4


def test_evaluate_lists_an_image_too_thin_for_the_model_with_predicts_reason(sample_dir, tiny_model_file, tmp_path):
    """evaluate gave such an image no detections and counted its faces as missed, unsaid (its test loss left it out),
    where predict skips it and lists why, and the service answers 422."""
    from utils.data.voc import parse_voc
    from utils.detection.evaluation import evaluate_model, labelled_pairs, load_trained_model
    from utils.detection.inference import ImageItem, detect_files

    folder = tmp_path / "set"
    folder.mkdir()
    for suffix in (".jpg", ".xml"):
        source = sample_dir / ("images" if suffix == ".jpg" else "annotations") / f"{SAMPLE}{suffix}"
        (folder / source.name).write_bytes(source.read_bytes())
    Image.new("RGB", (4000, 20), (120, 90, 60)).save(folder / "banner.png")
    write_voc(folder / "banner.xml",
              VocAnnotation("banner.png", 4000, 20, objects=[VocObject("with_mask", 10, 2, 30, 18)]))
    model, _, _, _ = load_trained_model(tiny_model_file, torch.device("cpu"))
    (skipped,) = detect_files(model, [ImageItem("banner.png", folder / "banner.png")], "cpu", num_workers=0)
    pairs, _ = labelled_pairs(folder, folder)
    report = evaluate_model(model, pairs, tmp_path / "out", batch_size=2, num_workers=0).report
    assert report["skipped"] == [{"file": str(folder / "banner.png"), "reason": skipped.reason}]
    assert skipped.reason.startswith("4000x20 px is too thin for the detector")
    assert report["num_images"] == 1 and report["num_faces"] == len(parse_voc(folder / f"{SAMPLE}.xml").objects)


def test_predict_video_refuses_a_video_too_thin_for_the_model_naming_it(root, tiny_model_file, tmp_path, capsys):
    """Its frames got no detections, each counted as a frame without faces, where predict skips such a photo and
    the service answers 422."""
    path = tmp_path / "strip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), 5.0, (600, 2))
    for _ in range(3):
        writer.write(np.full((2, 600, 3), 128, np.uint8))
    writer.release()
    code = run_script(root, "predict_video", ["--source", path, "--model", tiny_model_file, "--output-dir",
                                              tmp_path / "out", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and f"{path}: the file's frames: 600x2 px is too thin for the detector" in err, err
    assert "Traceback" not in err and not (tmp_path / "out" / "video_summary.json").exists()
