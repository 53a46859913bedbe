"""utils.detection.inference.detect: the flip-TTA merge, the score threshold, an image's detections independent
of its batch mates (evaluation's too), and images too thin for the model."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch import nn

from utils.detection.inference import detect


class LeftHalfDetector(nn.Module):
    """Reports each bright rectangle whose left edge lies in the left half of its input: a stand-in
    that misses faces on the right, so only the flipped pass can find them there."""

    def __init__(self):
        super().__init__()
        self.roi_heads = type("RoiHeads", (), {"detections_per_img": 100})()

    def forward(self, images):
        outputs = []
        for image in images:
            bright = image[0] > 0.5
            columns = bright.any(dim=0).tolist() + [False]
            boxes, start = [], None
            for x, on in enumerate(columns):  # runs of bright columns = rectangles (they never share columns)
                if on and start is None:
                    start = x
                elif not on and start is not None:
                    ys = torch.nonzero(bright[:, start:x].any(dim=1)).reshape(-1)
                    if start < image.shape[-1] / 2:
                        boxes.append([start, int(ys.min()), x, int(ys.max()) + 1])
                    start = None
            boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            outputs.append({"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64),
                            "scores": torch.full((len(boxes),), 0.9)})
        return outputs


def test_tta_maps_flipped_boxes_back_and_merges_them():
    image = torch.zeros(3, 40, 100)
    image[:, 5:25, 10:30] = 1.0  # left face; its mirror image would be at x 70..90
    image[:, 15:35, 60:80] = 1.0  # right face, invisible to the stand-in unless flipped (then x 20..40)
    plain = detect(LeftHalfDetector(), [image])[0]
    assert plain["boxes"].tolist() == [[10.0, 5.0, 30.0, 25.0]]
    for result in detect(LeftHalfDetector(), [image, image], tta=True):
        found = sorted(zip(result["boxes"].tolist(), result["scores"].tolist()))
        # The flipped pass finds the right face, mapped back exactly; a wrong un-flip would put it elsewhere.
        assert sum((box for box, _ in found), []) == pytest.approx([10.0, 5.0, 30.0, 25.0, 60.0, 15.0, 80.0, 35.0])
        # Fused by weighted box fusion: a face only one of the two passes found keeps half its score.
        assert [score for _, score in found] == pytest.approx([0.45, 0.45])


def test_tta_merges_the_same_face_found_twice():
    image = torch.zeros(3, 40, 100)
    image[:, 5:25, 42:56] = 1.0  # starts left of centre in both the image and its mirror: both passes see it
    result = detect(LeftHalfDetector(), [image], tta=True)[0]
    assert result["boxes"].reshape(-1).tolist() == pytest.approx([42.0, 5.0, 56.0, 25.0])  # found twice, one fused box
    assert result["scores"].tolist() == pytest.approx([0.9])


class RightBiasedDetector(LeftHalfDetector):
    """Places every box 2 px right of the rectangle: a left-right bias that the flipped pass mirrors."""

    def forward(self, images):
        outputs = super().forward(images)
        for output in outputs:
            output["boxes"] = output["boxes"] + torch.tensor([2.0, 0.0, 2.0, 0.0])
        return outputs


def test_tta_averages_the_two_passes_boxes():
    image = torch.zeros(3, 40, 100)
    image[:, 5:25, 42:56] = 1.0
    assert detect(RightBiasedDetector(), [image])[0]["boxes"].tolist() == [[44.0, 5.0, 58.0, 25.0]]
    # The flipped pass puts it 2 px to the left once mapped back; fusing the two (NMS would keep one of
    # them) averages the bias away.
    result = detect(RightBiasedDetector(), [image], tta=True)[0]
    assert result["boxes"].reshape(-1).tolist() == pytest.approx([42.0, 5.0, 56.0, 25.0])


def test_detect_applies_the_score_threshold():
    image = torch.zeros(3, 20, 20)
    image[:, 2:8, 2:8] = 1.0
    assert len(detect(LeftHalfDetector(), [image], score_threshold=0.95)[0]["boxes"]) == 0
    assert len(detect(LeftHalfDetector(), [image], score_threshold=0.5)[0]["boxes"]) == 1


@pytest.fixture(scope="module")
def untrained_detector():
    """An untrained detector at 128 px that keeps every box (score floor 0), so each image gets many."""
    from utils.detection.model import build_model

    torch.manual_seed(0)
    model = build_model(backbone="mobilenet_v2_fpn", weights="none", image_size=128).eval()
    model.roi_heads.score_thresh = 0.0
    return model


def test_an_images_detections_do_not_depend_on_its_batch_mates(untrained_detector):
    # torchvision pads a batch to its largest image and the first stage ranks proposals over the padding:
    # a landscape photo batched with a portrait one used to get other boxes and scores than alone, so
    # a figure merged from shards depended on how the photos were sharded.
    generator = torch.Generator().manual_seed(1)
    landscape, portrait = torch.rand(3, 90, 160, generator=generator), torch.rand(3, 160, 70, generator=generator)
    together = detect(untrained_detector, [landscape, portrait, landscape])
    for image, batched in zip([landscape, portrait, landscape], together):
        alone = detect(untrained_detector, [image])[0]
        assert len(alone["boxes"]) > 0
        # the same detections; two images of one size run together, whose scores may differ by float rounding
        # (3e-8 here), which reorders the untrained model's tied scores: compared as sets
        assert canonical(batched) == canonical(alone)


def test_evaluation_and_validation_detect_each_image_as_predict_does(untrained_detector):
    """engine.run_inference (evaluate, the validation choices, the estimators' rates) called the model on the loader's
    batch, padded to its largest image: a photo's detections there were not the ones predict counts."""
    from utils.detection.engine import run_inference

    generator = torch.Generator().manual_seed(1)
    landscape, portrait = torch.rand(3, 90, 160, generator=generator), torch.rand(3, 160, 70, generator=generator)
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    loader = [([landscape, portrait], [target, target])]  # one batch of two sizes, as a DataLoader yields it
    for tta in (False, True):
        predictions, _ = run_inference(untrained_detector, loader, torch.device("cpu"), tta=tta)
        for image, evaluated in zip([landscape, portrait], predictions):
            assert canonical(evaluated) == canonical(detect(untrained_detector, [image], tta=tta)[0])


def canonical(result: dict) -> list:
    return sorted((round(score, 4), label, [round(v, 1) for v in box]) for score, label, box in
                  zip(result["scores"].tolist(), result["labels"].tolist(), result["boxes"].tolist()))


def test_an_image_too_thin_for_the_model_is_a_listed_skip(untrained_detector, tmp_path):
    from utils.detection.inference import ImageItem, Skipped, detect_files, too_thin

    Image.new("RGB", (600, 1), (120, 80, 40)).save(tmp_path / "line.png")  # 1 px tall: 0.2 px at 128 px
    Image.new("RGB", (2, 3000), (120, 80, 40)).save(tmp_path / "post.png")
    Image.new("RGB", (160, 90), (120, 80, 40)).save(tmp_path / "photo.png")
    items = [ImageItem(name, tmp_path / name) for name in ("line.png", "photo.png", "post.png")]
    results = list(detect_files(untrained_detector, items, "cpu", batch_size=3, num_workers=0))
    assert [type(result).__name__ for result in results] == ["Skipped", "Detections", "Skipped"]
    for result in (results[0], results[2]):
        assert isinstance(result, Skipped) and "too thin for the detector" in result.reason
    assert "600x1 px" in results[0].reason
    assert too_thin(untrained_detector, 90, 160) is None and too_thin(untrained_detector, 4, 400) is None
    # called directly, the model gets no such image: no detections instead of an error for the batch
    assert len(detect(untrained_detector, [torch.rand(3, 1, 600)])[0]["boxes"]) == 0


def test_the_decoding_workers_and_their_prefetch_are_read_from_the_defaults_table(monkeypatch):
    import os

    from utils import defaults as D
    from utils.detection import inference

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(D, "DECODE_WORKERS_MAX", 3)
    monkeypatch.setattr(D, "DECODE_PREFETCH_BATCHES", 2)
    assert inference.default_num_workers() == 3  # half the 16 CPUs, capped by the table
    loader = inference.image_loader(inference.ImageFileDataset([]), num_workers=1)
    assert loader.prefetch_factor == 2
