"""The percent properly masked for the same images and model through every path that gives it: predict, a merge
of its shards, the service and predict_video, with a stand-in detector whose boxes follow from each image's
pixels (an untrained model finds one class everywhere, which would hide a difference in the mix or the order)."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import calibrated_model_file, run_script

THRESHOLD = 0.3  # the calibration record's: the adjusted headline (pacc2) corrects the counts
KEYS = ("method", "percent", "low", "high", "units", "faces_found", "faces_estimated", "calibration_images")


def pixel_detector(model, images, tta=False, score_threshold=0.0):
    """utils.detection.inference.detect's stand-in: 0-7 boxes per image, classes and scores (from 0.01) drawn
    with a seed from the image's pixels, so any path that hands the model the same pixels gets the same boxes."""
    results = []
    for image in images:
        pixels = (image * 255).round().to(torch.uint8).cpu().numpy().tobytes() + bytes([bool(tta)])
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(pixels).digest()[:8], "little"))
        count, (height, width) = int(rng.integers(0, 8)), image.shape[-2:]
        x, y = rng.uniform(0, width / 2, count), rng.uniform(0, height / 2, count)
        boxes = torch.tensor(np.stack([x, y, x + width / 4, y + height / 4], axis=1).reshape(-1, 4),
                             dtype=torch.float32)
        labels = torch.tensor(rng.choice([1, 1, 2, 3], count), dtype=torch.int64)
        scores = torch.tensor(rng.uniform(0.01, 1.0, count), dtype=torch.float32)
        keep = scores >= score_threshold
        results.append({"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]})
    return results


@pytest.fixture
def detector(monkeypatch):
    from utils.detection import inference, video

    monkeypatch.setattr(inference, "detect", pixel_detector)
    monkeypatch.setattr(video, "detect", pixel_detector)
    try:
        from utils.service import app
    except ImportError:  # no fastapi: the service's tests skip
        return
    monkeypatch.setattr(app, "detect", pixel_detector)


@pytest.fixture(scope="module")
def calibrated_model(tiny_model_file, tmp_path_factory):
    """The tiny model with a validation record at THRESHOLD on 60 simulated images (over 100 faces)."""
    return calibrated_model_file(tiny_model_file, tmp_path_factory.mktemp("calibrated") / "model.pt", THRESHOLD,
                                 images=60, working_size=128)


@pytest.fixture(scope="module")
def small_photos(tmp_path_factory):
    """Photos of 96x96 px: under the model's working size, which the service would shrink a larger one to
    before the model (utils.service.uploads.model_sized_input) and predict inside it (other pixels here)."""
    from utils.data.sample_data import make_sample_dataset

    out = tmp_path_factory.mktemp("small")
    make_sample_dataset(out, num_images=6, seed=7, image_size=(96, 96))
    return out


def photo_folder(sample_dir, folder, count=5):
    folder.mkdir(parents=True)
    photos = sorted((sample_dir / "images").glob("*.jpg"))[:count]
    for photo in photos:
        shutil.copy(photo, folder / photo.name)
    return sorted(folder.iterdir())


def predict_args(model, threshold=THRESHOLD):
    return ["--model", model, "--score-threshold", str(threshold), "--device", "cpu", "--batch-size", "1",
            "--workers", "0", "--no-annotated"]


def figure(estimate: dict) -> dict:
    return {key: estimate.get(key) for key in KEYS}


def service_answer(model, photos, threshold=THRESHOLD):
    from fastapi.testclient import TestClient

    from utils.service.app import ServiceConfig, create_app

    files = [("files", (photo.name, photo.read_bytes(), "image/jpeg")) for photo in photos]
    with TestClient(create_app(ServiceConfig(model_path=model, max_upload_mb=1, max_images=8))) as client:
        answer = client.post(f"/api/predict?score_threshold={threshold}", files=files)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_the_service_gives_the_figure_predict_gives_whatever_order_the_photos_are_sent_in(
        root, small_photos, calibrated_model, detector, tmp_path):
    """The service numbered its images in the order sent, and the bootstrap draws images by position: the same
    photos sent in another order got another interval than predict's (a high of 82.55 for 81.75 here)."""
    pytest.importorskip("fastapi")
    photos = photo_folder(small_photos, tmp_path / "photos")
    assert run_script(root, "predict", ["--images", tmp_path / "photos", "--output-dir", tmp_path / "one",
                                        *predict_args(calibrated_model)]) == 0
    one = json.loads((tmp_path / "one" / "compliance.json").read_text())
    assert one["estimate"]["method"] == "pacc2" and one["estimate"]["low"] is not None
    for order in (photos, photos[::-1], photos[2:] + photos[:2]):
        body = service_answer(calibrated_model, order)
        assert body["overall"] == one["overall"]
        assert {image["file"]: image["compliance"] for image in body["images"]} == \
            {photo.name: one["per_image"][str(photo)] for photo in order}
        assert figure(body["estimate"]) == figure(one["estimate"])
        assert {m: figure(e) for m, e in body["estimates"].items()} == \
            {m: figure(e) for m, e in one["estimates"].items()}


class FrameCapture:
    """Stands in for an opened cv2.VideoCapture of a file whose frames are *frames* (BGR), 10 s apart: a block
    of the video's bootstrap (VIDEO_BLOCK_SECONDS) is one frame, as an image is one unit of predict's."""

    def __init__(self, frames):
        self.frames, self.read_count = list(frames), 0

    def read(self):
        if self.read_count == len(self.frames):
            return False, None
        self.read_count += 1
        return True, self.frames[self.read_count - 1]

    def get(self, prop):
        return {cv2.CAP_PROP_FPS: 0.1, cv2.CAP_PROP_FRAME_COUNT: float(len(self.frames)),
                cv2.CAP_PROP_POS_MSEC: 10_000.0 * (self.read_count - 1)}.get(prop, 0.0)

    def release(self):
        pass


def video_summary(model, photos, out, threshold=THRESHOLD):
    """predict_video's summary of *photos* as the frames of a video, with the model file's threshold source,
    flip TTA and validation record as bin/predict_video.py loads them."""
    from utils.detection.evaluation import load_trained_model
    from utils.detection.video import predict_video

    detector, meta, threshold, _ = load_trained_model(model, torch.device("cpu"), threshold)
    frames = [cv2.cvtColor(np.asarray(Image.open(photo).convert("RGB")), cv2.COLOR_RGB2BGR) for photo in photos]
    return predict_video(detector, torch.device("cpu"), "photos.mp4", out, threshold, tta=meta["tta"],
                         calibration=meta.get("quantification"), opened=(FrameCapture(frames), "file"))


def test_a_threshold_under_the_detection_floor_counts_the_same_faces_in_predict_the_service_and_video(
        root, small_photos, tiny_model_file, detector, tmp_path):
    """predict and predict_video detect down to the threshold when it is under DETECTION_FLOOR (flip TTA's and an
    ensemble's fused boxes can score under it); the service detected down to the floor only, and counted fewer
    faces there (16 for predict's 17)."""
    pytest.importorskip("fastapi")
    photos = photo_folder(small_photos, tmp_path / "photos")
    assert run_script(root, "predict", ["--images", tmp_path / "photos", "--output-dir", tmp_path / "one",
                                        *predict_args(tiny_model_file, 0.02)]) == 0
    one = json.loads((tmp_path / "one" / "compliance.json").read_text())
    kept = [d["score"] for i in json.loads((tmp_path / "one" / "predictions.json").read_text())["images"]
            for d in i["detections"]]
    assert min(kept) < 0.05  # faces under the floor are counted
    body = service_answer(tiny_model_file, photos, 0.02)
    assert body["overall"] == one["overall"]
    assert [image["compliance"] for image in body["images"]] == [one["per_image"][str(photo)] for photo in photos]
    assert min(d["score"] for image in body["images"] for d in image["detections"]) < 0.05
    assert figure(body["estimate"]) == figure(one["estimate"]) and body["estimate"]["method"] == "cc"
    video = video_summary(tiny_model_file, photos, tmp_path / "video", 0.02)
    assert video["overall"] == one["overall"] and figure(video["estimate"]) == figure(one["estimate"])


def test_a_model_without_validation_rates_falls_back_and_every_path_says_so_in_its_line_and_file(
        root, small_photos, tiny_model_file, detector, tmp_path, capsys):
    """The headline is pacc2; a model file without validation rates (one from before they were stored) gives cc
    instead, and the JSON said so ("fallback") while the printed lines of predict, merge_predictions and
    predict_video named cc alone. Also pins that 2 shards merged give predict's figure and interval, and the
    printed figure is the JSON's, rounded to one decimal."""
    pytest.importorskip("fastapi")
    from utils.detection.compliance import compliance_line

    photos = photo_folder(small_photos, tmp_path / "photos")
    capsys.readouterr()
    assert run_script(root, "predict", ["--images", tmp_path / "photos", "--output-dir", tmp_path / "one",
                                        *predict_args(tiny_model_file)]) == 0
    printed = {"predict": capsys.readouterr().out}
    one = json.loads((tmp_path / "one" / "compliance.json").read_text())
    for tag, shard in (("s1", photos[:2]), ("s2", photos[2:])):
        assert run_script(root, "predict", ["--images", *shard, "--output-dir", tmp_path / "parts",
                                            "--output-tag", tag, *predict_args(tiny_model_file)]) == 0
    capsys.readouterr()
    assert run_script(root, "merge_predictions", ["--inputs-dir", tmp_path / "parts", "--output-dir",
                                                  tmp_path / "merged"]) == 0
    printed["merge"] = capsys.readouterr().out
    merged = json.loads((tmp_path / "merged" / "compliance.json").read_text())
    video = video_summary(tiny_model_file, photos, tmp_path / "video")
    printed["video"] = compliance_line(video["overall"], video["estimate"])  # bin/predict_video.py's line
    body = service_answer(tiny_model_file, photos)

    headline = one["estimate"]
    assert headline["method"] == "cc" and headline["fallback"].startswith(
        "cc instead of pacc2: the model file holds no validation rates")
    assert headline["low"] is not None and headline["percent"] == one["overall"]["percent_properly_masked"]
    for estimate in (merged["estimate"], video["estimate"], body["estimate"]):
        assert figure(estimate) == figure(headline) and estimate["fallback"] == headline["fallback"]
    assert merged["estimates"] == one["estimates"] and merged["unavailable"] == one["unavailable"]
    for job, text in printed.items():  # the video's units are blocks of frames (here a frame each)
        assert (f"{headline['percent']:.1f}% properly masked (95% interval {headline['low']:.1f}-"
                f"{headline['high']:.1f}%, 5 {'blocks' if job == 'video' else 'images'}; {headline['fallback']})"
                in text), job


def test_an_ensembles_shards_merged_give_its_one_jobs_figure_when_its_models_run_at_different_sizes(
        root, small_photos, tiny_model_file, detector, tmp_path):
    """Fold models each choose their working size on their own validation images; an ensemble of two that chose
    differently writes working_size 'mixed: 128, 160', which merge_predictions refused as 'not a positive whole
    number' in every part: the workflow's sharded ensemble prediction could not be merged at all."""
    members = [calibrated_model_file(tiny_model_file, tmp_path / f"fold{size}.pt", THRESHOLD, working_size=size,
                                     chosen_size=size) for size in (128, 160)]
    photos = photo_folder(small_photos, tmp_path / "photos")
    ensemble = ["--model", *members, *predict_args(members[0])[2:]]
    assert run_script(root, "predict", ["--images", tmp_path / "photos", "--output-dir", tmp_path / "one",
                                        *ensemble]) == 0
    for tag, shard in (("s1", photos[:2]), ("s2", photos[2:])):
        assert run_script(root, "predict", ["--images", *shard, "--output-dir", tmp_path / "parts",
                                            "--output-tag", tag, *ensemble]) == 0
    assert run_script(root, "merge_predictions", ["--inputs-dir", tmp_path / "parts", "--expected", "2",
                                                  "--output-dir", tmp_path / "merged"]) == 0
    one, merged = (json.loads((tmp_path / name / "compliance.json").read_text()) for name in ("one", "merged"))
    assert merged["working_size"] == one["working_size"] == "mixed: 128, 160"
    assert merged["overall"] == one["overall"] and merged["per_image"] == one["per_image"]
    assert merged["estimate"] == one["estimate"] and merged["estimates"] == one["estimates"]
    assert one["estimate"]["method"] == "cc" and "an ensemble has none of its own" in one["estimate"]["fallback"]


def test_a_video_run_with_the_fold_ensemble_gives_the_figure_and_estimator_its_photos_get(
        root, small_photos, calibrated_model, detector, tmp_path, monkeypatch):
    """--fold-ensemble ran the photos through the fold models as one ensemble and the videos through the final
    model alone (bin/predict_video.py took one --model): a video's figure came from another model, and another
    estimator (pacc2 on the final model's validation rates where the ensemble, which has none, gives cc)."""
    from utils.detection import video

    photos = photo_folder(small_photos, tmp_path / "photos")
    ensemble = ["--model", calibrated_model, calibrated_model, "--score-threshold", str(THRESHOLD), "--device", "cpu"]
    assert run_script(root, "predict", ["--images", tmp_path / "photos", "--output-dir", tmp_path / "one",
                                        *ensemble, "--batch-size", "1", "--workers", "0", "--no-annotated"]) == 0
    frames = [cv2.cvtColor(np.asarray(Image.open(photo).convert("RGB")), cv2.COLOR_RGB2BGR) for photo in photos]
    monkeypatch.setattr(video, "open_source", lambda source: (FrameCapture(frames), "file"))  # the photos as frames
    (tmp_path / "clip.mp4").write_bytes(b"")
    assert run_script(root, "predict_video", ["--source", tmp_path / "clip.mp4", "--output-dir", tmp_path / "video",
                                              "--stride", "1", *ensemble]) == 0
    one = json.loads((tmp_path / "one" / "compliance.json").read_text())
    summary = json.loads((tmp_path / "video" / "video_summary.json").read_text())
    assert one["estimate"]["method"] == "cc" and "an ensemble has none of its own" in one["estimate"]["fallback"]
    assert summary["model"] == [str(calibrated_model)] * 2 and summary["overall"] == one["overall"]
    assert figure(summary["estimate"]) == figure(one["estimate"])
    assert summary["estimate"]["fallback"] == one["estimate"]["fallback"]
    # and the working size its photos' compliance.json gives (the summary said null: an ensemble has no transform)
    assert summary["working_size"] == one["working_size"] == 128


def test_photos_in_subfolders_get_one_interval_from_predict_a_merge_of_their_shards_and_the_service(
        root, small_photos, calibrated_model, detector, tmp_path):
    """The bootstrap drew the images in the order of their names, which differ by path: predict's paths put
    site-2/ before site/, the shards' site/ first, and the service (the uploads' names) interleaved them, so the
    same photos got three intervals. Now they are drawn in the order of their counts."""
    pytest.importorskip("fastapi")
    photos = sorted((small_photos / "images").glob("*.jpg"))
    for k, photo in enumerate(photos):
        (tmp_path / "photos" / ("site", "site-2")[k % 2]).mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, tmp_path / "photos" / ("site", "site-2")[k % 2] / photo.name)
    assert run_script(root, "predict", ["--images", tmp_path / "photos", "--output-dir", tmp_path / "one",
                                        *predict_args(calibrated_model)]) == 0
    assert run_script(root, "make_shards", ["--images", tmp_path / "photos", "--output", tmp_path / "shards",
                                            "--shard-size", "4"]) == 0
    for shard in sorted((tmp_path / "shards").glob("*.tar")):
        assert run_script(root, "predict", ["--images", shard, "--output-dir", tmp_path / "parts", "--output-tag",
                                            shard.stem, *predict_args(calibrated_model)]) == 0
    assert run_script(root, "merge_predictions", ["--inputs-dir", tmp_path / "parts", "--output-dir",
                                                  tmp_path / "merged"]) == 0
    one, merged = (json.loads((tmp_path / name / "compliance.json").read_text()) for name in ("one", "merged"))
    body = service_answer(calibrated_model, photos)
    assert one["estimate"]["method"] == "pacc2" and one["estimate"]["low"] is not None
    assert merged["per_folder"] == one["per_folder"] and sorted(one["per_folder"]) == ["site", "site-2"]
    for other in (merged, body):
        assert figure(other["estimate"]) == figure(one["estimate"])
        assert {m: figure(e) for m, e in other["estimates"].items()} == \
            {m: figure(e) for m, e in one["estimates"].items()}


def test_each_folders_figure_is_the_figure_of_that_folder_alone_whatever_its_name(
        root, small_photos, calibrated_model, detector, tmp_path):
    """compliance.json's figure per folder is the headline predict gives that folder on its own (one image: the
    figure, no interval, said so); a folder name matplotlib reads as math ('x$\\foo$') failed the whole job when
    compliance_by_folder.png was drawn (ValueError, exit 1, no output), and '$5 and $6' was drawn as math."""
    names = ["cost $5 and $6", "x$\\foo$", "solo"]
    photos = sorted((small_photos / "images").glob("*.jpg"))
    for name, group in zip(names, (photos[:2], photos[2:4], photos[4:5])):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for photo in group:
            shutil.copy(photo, tmp_path / "photos" / name / photo.name)
    assert run_script(root, "predict", ["--images", tmp_path / "photos", "--output-dir", tmp_path / "all",
                                        *predict_args(calibrated_model)]) == 0
    report = json.loads((tmp_path / "all" / "compliance.json").read_text())
    assert sorted(report["per_folder"]) == sorted(names)
    assert (tmp_path / "all" / "compliance_by_folder.png").stat().st_size > 0
    for number, name in enumerate(names):
        out = tmp_path / f"alone{number}"
        assert run_script(root, "predict", ["--images", tmp_path / "photos" / name, "--output-dir", out,
                                            *predict_args(calibrated_model)]) == 0
        alone = json.loads((out / "compliance.json").read_text())["estimate"]
        assert report["per_folder"][name] == alone, name
    solo = report["per_folder"]["solo"]
    assert solo["units"] == 1 and solo["low"] is None and solo["note"] == "one image: no interval"


def test_the_report_shows_the_figures_of_the_compliance_json_it_reads(root, small_photos, tiny_model_file, detector,
                                                                     tmp_path, capsys):
    """The run report's prediction set: merge_predictions' compliance.json as written (a headline standing in for
    pacc2), shown with the same overall percent, figure, interval, images and fallback (to one decimal)."""
    from run_folders import make_run_folder

    photo_folder(small_photos, tmp_path / "photos")
    assert run_script(root, "predict", ["--images", tmp_path / "photos", "--output-dir", tmp_path / "parts",
                                        "--output-tag", "shard-000000", *predict_args(tiny_model_file)]) == 0
    run_dir = make_run_folder(tmp_path / "run")
    assert run_script(root, "merge_predictions", ["--inputs-dir", tmp_path / "parts",
                                                  "--output-dir", run_dir / "outputs"]) == 0
    merged = json.loads((run_dir / "outputs" / "compliance.json").read_text())
    capsys.readouterr()
    assert run_script(root, "report", [run_dir]) == 0
    page = (run_dir / "outputs" / "report.html").read_text()
    overall, estimate = merged["overall"], merged["estimate"]
    assert estimate["low"] is not None and estimate["method"] == "cc"
    assert (f"{overall['faces']} faces (" + ", ".join(f"{overall['counts'][name]} {name}" for name in
                                                       ("with_mask", "without_mask", "mask_weared_incorrect"))
            + f"), <b>{overall['percent_properly_masked']:.1f}%</b> with_mask among the faces kept at the threshold "
            "(cc)") in page
    assert (f"Estimate (cc, classify and count): <b>{estimate['percent']:.1f}% (95% interval "
            f"{estimate['low']:.1f}&ndash;{estimate['high']:.1f}%)</b> over 5 images; cc instead of pacc2: the model "
            "file holds no validation rates") in page


def test_predict_two_shards_merged_and_the_video_path_give_one_adjusted_figure(
        root, small_photos, calibrated_model, detector, tmp_path):
    """With the model's validation rates (pacc2, the score sums corrected): the same per-image counts, overall,
    headline and every estimator from predict, a merge of 2 shards and predict_video over the photos as frames
    (one frame a block: the units predict resamples)."""
    photos = photo_folder(small_photos, tmp_path / "photos")
    assert run_script(root, "predict", ["--images", tmp_path / "photos", "--output-dir", tmp_path / "one",
                                        *predict_args(calibrated_model)]) == 0
    for tag, shard in (("s1", photos[3:]), ("s2", photos[:3])):
        assert run_script(root, "predict", ["--images", *shard, "--output-dir", tmp_path / "parts",
                                            "--output-tag", tag, *predict_args(calibrated_model)]) == 0
    assert run_script(root, "merge_predictions", ["--inputs-dir", tmp_path / "parts", "--output-dir",
                                                  tmp_path / "merged"]) == 0
    one, merged = (json.loads((tmp_path / name / "compliance.json").read_text()) for name in ("one", "merged"))
    video = video_summary(calibrated_model, photos, tmp_path / "video")
    assert one["estimate"]["method"] == "pacc2" and "fallback" not in one["estimate"]
    assert merged["per_image"] == {str(photo): one["per_image"][str(photo)] for photo in photos}
    with open(tmp_path / "video" / "video_frames.csv", newline="") as frames:
        assert [int(row["faces"]) for row in csv.DictReader(frames)] == [one["per_image"][str(p)]["faces"]
                                                                         for p in photos]
    for other in (merged, video):
        assert other["overall"] == one["overall"] and other["calibration"] == one["calibration"]
        assert figure(other["estimate"]) == figure(one["estimate"])
        assert {m: figure(e) for m, e in other["estimates"].items()} == \
            {m: figure(e) for m, e in one["estimates"].items()}


def test_the_video_path_sums_the_scores_as_predict_and_the_service_store_them(
        root, small_photos, tiny_model_file, monkeypatch, tmp_path):
    """predict (and so a merge of its shards) and the service keep each image's score sums to 4 decimals
    (quantify.soft_counts); predict_video summed the scores unrounded, so the same detections gave another pcc
    figure there (55.25 for predict's 55.24 here)."""
    from utils.detection import inference, video

    def two_faces(model, images, tta=False, score_threshold=0.0):
        return [{"boxes": torch.tensor([[1.0, 1.0, 20.0, 20.0], [30.0, 30.0, 50.0, 50.0]]),
                 "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.1234499, 0.1])} for _ in images]

    monkeypatch.setattr(inference, "detect", two_faces)
    monkeypatch.setattr(video, "detect", two_faces)
    photos = photo_folder(small_photos, tmp_path / "photos", count=2)
    assert run_script(root, "predict", ["--images", tmp_path / "photos", "--output-dir", tmp_path / "one",
                                        *predict_args(tiny_model_file)]) == 0
    one = json.loads((tmp_path / "one" / "compliance.json").read_text())
    summary = video_summary(tiny_model_file, photos, tmp_path / "video")
    assert one["estimates"]["pcc"]["percent"] == 55.24
    assert figure(summary["estimates"]["pcc"]) == figure(one["estimates"]["pcc"])


def report_page(root, run_dir, capsys) -> str:
    assert run_script(root, "report", [run_dir]) == 0
    capsys.readouterr()
    return (run_dir / "outputs" / "report.html").read_text()


def test_the_report_gives_each_videos_figure_with_its_interval_blocks_estimator_and_plot(
        root, small_photos, tiny_model_file, detector, tmp_path, capsys):
    """A run with --pred-videos: the report showed none of predict_video's outputs (the workflow did not hand it the
    summaries), so the videos' figures were on no page."""
    from run_folders import make_run_folder

    from utils.figures import one_decimal
    from utils.naming import video_output_names
    from utils.reporting.html_parts import esc
    from utils.reporting.run_folder import is_report_input

    summary = video_summary(tiny_model_file, photo_folder(small_photos, tmp_path / "photos"), tmp_path / "video")
    run_dir, names = make_run_folder(tmp_path / "run", hpo=False, statistics=False), video_output_names("gate_a")
    for role in ("summary", "plot"):  # as the workflow's report job gets them: tagged
        assert is_report_input(names[role])
        shutil.copy(tmp_path / "video" / video_output_names()[role], run_dir / "outputs" / names[role])
    page = report_page(root, run_dir, capsys)
    estimate = summary["estimate"]
    assert estimate["low"] is not None and estimate["units"] == 5
    assert (f"Estimate (cc, classify and count): <b>{one_decimal(estimate['percent'])}% (95% interval "
            f"{one_decimal(estimate['low'])}"
            f"&ndash;{one_decimal(estimate['high'])}%)</b> over 5 blocks of 1 processed frame(s); "
            f"{esc(estimate['fallback'])}.") in page
    assert "Video <code>photos.mp4</code>" in page and f"({esc(names['plot'])})</span></figcaption>" in page


def test_the_reports_header_gives_the_headline_estimate_with_its_interval_images_and_estimator(
        root, tmp_path, capsys):
    """The page's first line gave the count at the threshold alone ('77.0% predicted properly masked'): no interval,
    no images, no estimator, and not the headline's figure where the headline is pacc2."""
    from run_folders import estimate_record, make_run_folder

    run_dir = make_run_folder(tmp_path / "run", hpo=False, statistics=False, figures=False)
    path = run_dir / "outputs" / "evaluation.json"
    evaluation = json.loads(path.read_text())
    evaluation["quantification"]["estimate"] = estimate_record("pacc2", 74.2, 70.1, 78.3, 6)
    path.write_text(json.dumps(evaluation))
    page = report_page(root, run_dir, capsys)
    header = page[page.index("<header>"):page.index("</header>")]
    assert "74.2% (95% interval 70.1&ndash;78.3%) predicted properly masked on 6 test images (pacc2)" in header


def test_the_report_says_why_there_is_no_figure_or_no_interval_as_the_line_and_the_page_do(root, tmp_path, capsys):
    """A set where no face is found: the printed line says 'no figure (no faces found; ...)', the service's page
    'No estimate: no faces found', the report said 'n/a' as for a file holding no figure; and '(no interval)'
    where the others say why ('one image: no interval')."""
    from run_folders import estimate_record, make_run_folder

    run_dir = make_run_folder(tmp_path / "run", hpo=False, statistics=False, figures=False)
    path = run_dir / "outputs" / "compliance.json"
    written = json.loads(path.read_text())
    for estimate, shown in (({"percent": None, "low": None, "high": None, "note": "no faces found"},
                             "<b>no figure (no faces found)</b> over 6 images"),
                            ({"low": None, "high": None, "units": 1, "note": "one image: no interval"},
                             "<b>50.0% (one image: no interval)</b>")):
        path.write_text(json.dumps({**written, "estimate": {**estimate_record("cc", 50.0, 41.5, 58.5, 6), **estimate}}))
        assert shown in report_page(root, run_dir, capsys)


SAME_FIGURE = "the same model on the same pixels as the test set above, hence the same figure"


@pytest.mark.parametrize("pred_images, fold_ensemble, max_size, shrunk, said", [
    (None, False, None, 0, SAME_FIGURE),
    (None, True, None, 0, "but the fold models' ensemble (--fold-ensemble) predicts them"),
    (None, False, 640, 3, "but 3 of the test set's copies of them were shrunk to at most 640 px"),
    # a cap above every test photo's size (the mixed-dataset audit: --max-size 1024 on 320x240 photos) shrinks none
    (None, False, 1024, 0, SAME_FIGURE),
    (None, False, 640, None, "but the test set's copies of any of them over 640 px on their longer side were "
                             "shrunk to it (--max-size)"),  # an older report: the page cannot count them
    ("/data/cams", False, None, 0, None)])
def test_the_report_says_whether_the_test_splits_photos_read_the_figure_of_the_prediction_set(
        root, tmp_path, capsys, pred_images, fold_ensemble, max_size, shrunk, said):
    """Without --pred-images the prediction set is the test split's photos: the page gave them two figures (46.7 %
    from evaluate and 46.6 % from merge_predictions in a make run, from JPEG copies of the photos then) and did not
    say why. The sets now keep the photos' own pixels: the figures agree unless --max-size shrank some of them
    (preprocess's images_shrunk) or --fold-ensemble."""
    from run_folders import make_run_folder

    run_dir = make_run_folder(tmp_path / "run", hpo=False, statistics=False, figures=False,
                              config={"pred_images": pred_images, "fold_ensemble": fold_ensemble, "max_size": max_size})
    if shrunk is not None:
        report = run_dir / "outputs" / "preprocess_test_report.json"
        report.write_text(json.dumps({**json.loads(report.read_text()), "images_shrunk": shrunk}))
    page = report_page(root, run_dir, capsys)
    assert ("The prediction set is the test split's photos" in page) == (pred_images is None)
    assert said is None or said in page
