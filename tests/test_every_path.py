"""One model through every way the project runs it (predict, evaluate, the service, predict_video): a face is
counted alike at the threshold, and a picture too thin for the model is refused alike, naming the file and the
problem, each refusal listed in that path's report."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import run_script
from utils.data.voc import VocAnnotation, VocObject, write_voc

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from utils.service.app import ServiceConfig, create_app  # noqa: E402

SAMPLE = "sample_0000"  # a photo of tests/conftest.py's sample_dir


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
