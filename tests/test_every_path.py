"""One model through every way the project runs it (predict, evaluate, the service, predict_video): a picture too
thin for the model is refused alike, naming the file and the problem, each refusal listed in that path's report."""

from __future__ import annotations

import cv2
import numpy as np
import torch
from PIL import Image

from helpers import run_script
from utils.data.voc import VocAnnotation, VocObject, write_voc

SAMPLE = "sample_0000"  # a photo of tests/conftest.py's sample_dir


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
