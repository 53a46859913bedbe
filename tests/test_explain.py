"""Explanations of detections (utils/detection/explain.py, grad-cam package): the maps, predict --explain,
and the service's explain endpoints. The page's click-to-explain is in tests/test_service.py's browser test."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("pytorch_grad_cam", reason="grad-cam not installed (make setup installs it)")

from helpers import run_script  # noqa: E402
from utils.detection.evaluation import load_trained_model  # noqa: E402
from utils.detection.explain import crop_region, evidence_share, explain_image  # noqa: E402
from utils.detection.inference import detect, to_model_input  # noqa: E402


@pytest.fixture(scope="module")
def model_and_image(tiny_model_file, sample_dir):
    from PIL import Image

    model, *_ = load_trained_model(tiny_model_file, "cpu")
    path = sorted((sample_dir / "images").glob("*.jpg"))[0]
    image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    out = detect(model, [to_model_input(image, "cpu")], score_threshold=0.05)[0]
    assert len(out["boxes"]) >= 2, "the untrained tiny model gives many low-score boxes"
    return model, image, out


@pytest.mark.slow
def test_hirescam_maps_are_per_box_and_stay_on_the_box(model_and_image):
    model, image, out = model_and_image
    explanations = explain_image(model, image, out["boxes"], out["labels"], out["scores"], "cpu", "hirescam", 3)
    assert [e.index for e in explanations] == torch.argsort(out["scores"], descending=True)[:3].tolist()
    height, width = image.shape[-2:]
    for e in explanations:
        assert e.heatmap.shape == (height, width) and e.heatmap.dtype == np.float32
        assert 0.0 <= e.heatmap.min() and e.heatmap.max() <= 1.0 + 1e-6 and e.heatmap.max() > 0.5
        x0, y0, x1, y1 = e.box
        area_share = (x1 - x0) * (y1 - y0) / (width * height)
        # the box score's gradient reaches only the features RoIAlign sampled for the box
        assert e.evidence_in_box > max(2 * area_share, 0.2), (e.evidence_in_box, area_share)
        assert max(e.overlay.size) == 256 and e.overlay.mode == "RGB"
    assert not np.allclose(explanations[0].heatmap, explanations[1].heatmap)  # one map per detection
    # the model is left as it was: eval mode, the frozen layers still frozen, no gradients kept
    assert not model.training and all(p.grad is None for p in model.parameters())


@pytest.mark.slow
def test_under_flip_tta_a_map_holds_both_passes_evidence(model_and_image):
    """Flip TTA fuses each box from the plain and the mirrored image's passes, so its map is the mean of both
    passes' evidence: the same picture mirrored then gives the same maps mirrored, which one pass does not."""
    from utils.detection.explain import heatmaps
    from utils.detection.inference import unflip_boxes

    model, image, out = model_and_image
    order = torch.argsort(out["scores"], descending=True)[:2]
    # on quarter pixels, so that mirrored twice (width - x) a box is itself to the bit: a box a hair off can match
    # another of the untrained model's many near-equal detections, and its map is then that one's
    boxes, labels = out["boxes"][order].mul(4).round().div(4), out["labels"][order]
    picture, width = image.float().div(255.0), image.shape[-1]
    fused = heatmaps(model, picture, boxes, labels, "hirescam", tta=True)
    of_mirror = heatmaps(model, picture.flip(-1), unflip_boxes(boxes, width), labels, "hirescam", tta=True)
    plain = heatmaps(model, picture, boxes, labels, "hirescam")
    plain_of_mirror = heatmaps(model, picture.flip(-1), unflip_boxes(boxes, width), labels, "hirescam")
    for one, mirrored, alone, alone_mirrored in zip(fused, of_mirror, plain, plain_of_mirror):
        assert one.shape == alone.shape and one.dtype == np.float32
        assert one.min() >= 0 and one.max() == pytest.approx(1.0)
        np.testing.assert_allclose(one, mirrored[:, ::-1], atol=1e-4)
        assert not np.allclose(alone, alone_mirrored[:, ::-1], atol=1e-2)  # one pass alone is not symmetric
    # explain_image passes tta on
    explained = explain_image(model, image, boxes, labels, out["scores"][order], "cpu", "hirescam", 2, tta=True)
    np.testing.assert_allclose(explained[0].heatmap, fused[0], atol=1e-6)


@pytest.mark.slow
def test_a_box_one_pass_alone_found_gets_that_pass_map_and_no_error(model_and_image):
    """Where a pass finds no box of the label at IoU > 0.5, grad-cam's target scores a constant 0: the map of that
    pass is blank (not a backward() error), and under flip TTA the box keeps the other pass's map."""
    from torchvision.ops import box_iou

    from utils.detection.explain import heatmaps
    from utils.detection.inference import unflip_boxes

    model, image, _ = model_and_image
    picture, width = image.float().div(255.0), image.shape[-1]
    with torch.no_grad():
        plain, mirrored = model([picture])[0], model([picture.flip(-1)])[0]
    found = unflip_boxes(mirrored["boxes"], width)
    matched = (box_iou(found, plain["boxes"]) > 0.5) & (mirrored["labels"][:, None] == plain["labels"][None, :])
    alone = (~matched.any(dim=1)).nonzero().flatten()
    assert len(alone), "the untrained tiny model finds some boxes in the mirrored pass only"
    box, label = found[alone[:1]], mirrored["labels"][alone[:1]]
    (blank,) = heatmaps(model, picture, box, label)
    assert not blank.any()
    (mirror_map,) = heatmaps(model, picture.flip(-1), unflip_boxes(box, width), label)
    assert mirror_map.max() > 0.5
    (fused,) = heatmaps(model, picture, box, label, tta=True)
    np.testing.assert_allclose(fused, mirror_map[:, ::-1] / mirror_map.max(), atol=1e-5)


def test_a_pass_that_finds_no_box_at_all_gives_blank_maps_not_an_error(tiny_model_file, sample_dir):
    from PIL import Image

    from utils.detection.explain import heatmaps

    model, *_ = load_trained_model(tiny_model_file, "cpu")
    model.roi_heads.score_thresh = 1.01  # no detection passes: the target finds nothing to score
    path = sorted((sample_dir / "images").glob("*.jpg"))[0]
    picture = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float().div(255.0)
    box, label = torch.tensor([[10.0, 10.0, 60.0, 70.0]]), torch.tensor([1])
    for tta in (False, True):
        for method in ("hirescam", "gradcam"):
            (blank,) = heatmaps(model, picture, box, label, method, tta=tta)
            assert blank.shape == picture.shape[-2:] and not blank.any()


def test_eigencam_shares_one_map_between_the_boxes_of_an_image(model_and_image):
    model, image, out = model_and_image
    explanations = explain_image(model, image, out["boxes"], out["labels"], out["scores"], "cpu", "eigencam", 2)
    assert len(explanations) == 2 and np.array_equal(explanations[0].heatmap, explanations[1].heatmap)


def test_no_detections_no_explanations(model_and_image):
    model, image, _ = model_and_image
    assert explain_image(model, image, torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0), "cpu") == []


def test_evidence_share_and_crop_region():
    heatmap = np.zeros((100, 200), np.float32)
    heatmap[10:20, 30:40] = 1.0
    heatmap[90, 190] = 100.0
    assert evidence_share(heatmap, [30, 10, 40, 20]) == pytest.approx(100 / 200)
    assert evidence_share(np.zeros((4, 4)), [0, 0, 2, 2]) == 0.0
    # a box with one box size of context each side; a tiny box gets the minimum crop; crops stay inside
    assert crop_region([50, 30, 80, 60], 200, 100) == (20, 0, 110, 90)
    left, top, right, bottom = crop_region([0, 0, 4, 4], 200, 100)
    assert (left, top) == (0, 0) and right - left == 64 and bottom - top == 64
    assert crop_region([180, 80, 199, 99], 200, 100)[2:] == (200, 100)


@pytest.mark.slow
def test_predict_explain_writes_overlays_listed_in_predictions_json(root, tiny_model_file, sample_dir, tmp_path,
                                                                    capsys):
    # the job run in-process (as its __main__ does): a process of its own added only the seconds of importing torch
    images = sorted((sample_dir / "images").glob("*.jpg"))[:2]
    out = tmp_path / "out"
    code = run_script(root, "predict", ["--images", *images, "--model", tiny_model_file, "--output-dir", out,
                                        "--score-threshold", "0.05", "--explain", "--explain-max-boxes", "2",
                                        "--workers", "0"])
    assert code == 0, capsys.readouterr().err
    records = json.loads((out / "predictions.json").read_text())["images"]
    for record in records:
        listed = record["explanations"]
        assert len(listed) == min(2, len(record["detections"])) and listed
        for entry in listed:
            detection = record["detections"][entry["detection"]]
            assert (entry["label"], entry["score"]) == (detection["label"], detection["score"])
            assert entry["method"] == "hirescam" and 0 < entry["evidence_in_box"] <= 1
            assert (out / "annotated" / entry["file"]).stat().st_size > 1000


@pytest.mark.slow
def test_predict_explain_needs_annotated_images(root, tiny_model_file, sample_dir, tmp_path, capsys):
    image = sorted((sample_dir / "images").glob("*.jpg"))[0]
    code = run_script(root, "predict", ["--images", image, "--model", tiny_model_file, "--output-dir", tmp_path,
                                        "--explain", "--no-annotated"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "predict: error: --explain explains the annotated images: drop --no-annotated (bound them with "
        "--annotate-max)")


# ----------------------------------------------------------------------------- the service

@pytest.fixture(scope="module")
def client(tiny_model_file):
    from fastapi.testclient import TestClient

    from utils.service.app import ServiceConfig, create_app

    with TestClient(create_app(ServiceConfig(model_path=tiny_model_file, explain_max_boxes=2))) as c:
        yield c


def _upload(sample_dir, field="files"):
    path = sorted((sample_dir / "images").glob("*.jpg"))[0]
    return [(field, (path.name, path.read_bytes(), "image/jpeg"))]


def test_service_predict_with_explain_and_explain_one_box(client, sample_dir):
    body = client.post("/api/predict?explain=true&score_threshold=0.05", files=_upload(sample_dir)).json()
    detections = body["images"][0]["detections"]
    explained = [d for d in detections if "explanation" in d]
    assert len(explained) == 2  # explain_max_boxes, the best-scoring ones
    assert {d["score"] for d in explained} == set(sorted((d["score"] for d in detections), reverse=True)[:2])
    assert explained[0]["explanation"]["overlay"].startswith("data:image/jpeg;base64,")
    target = detections[-1]
    answer = client.post("/api/explain", params={"box": ",".join(map(str, target["box"])), "label": target["label"]},
                         files=_upload(sample_dir, "file"))
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["label"] == target["label"] and result["method"] == "hirescam"
    assert result["score"] == pytest.approx(target["score"], abs=1e-3)
    assert result["overlay"].startswith("data:image/jpeg;base64,") and 0 < result["evidence_in_box"] <= 1


@pytest.mark.parametrize("params, reason", [
    ({"box": "1,2,3", "label": "with_mask"}, "box '1,2,3': expected x1,y1,x2,y2"),
    ({"box": "10,10,5,20", "label": "with_mask"}, "with x2 > x1 and y2 > y1"),
    ({"box": "1,2,30,40", "label": "beard"}, "label 'beard': not one of with_mask"),
    ({"box": "1,2,30,40", "label": "with_mask", "method": "magic"}, "method 'magic': not one of hirescam"),
])
def test_service_explain_refuses_bad_requests_with_a_reason(client, sample_dir, params, reason):
    answer = client.post("/api/explain", params=params, files=_upload(sample_dir, "file"))
    assert answer.status_code == 422 and reason in answer.json()["detail"]


def test_service_explain_of_a_box_the_model_did_not_find_is_422(client, sample_dir):
    answer = client.post("/api/explain", params={"box": "0,0,1,1", "label": "mask_weared_incorrect"},
                         files=_upload(sample_dir, "file"))
    assert answer.status_code == 422
    assert "finds no mask_weared_incorrect detection overlapping box 0,0,1,1" in answer.json()["detail"]


@pytest.mark.slow  # over 5 s on a quiet 2-core machine
def test_a_model_that_chose_tta_is_run_with_it_and_its_boxes_explained(tiny_model_file, sample_dir, tmp_path):
    """The service follows the model's flip TTA choice (a request's tta overrides it), and /api/explain finds
    each box /api/predict returned, fused ones included."""
    from fastapi.testclient import TestClient

    from utils.detection.model import load_model_file, save_model_file
    from utils.service.app import ServiceConfig, create_app

    model, meta = load_model_file(tiny_model_file)
    chose = save_model_file(tmp_path / "chose.pt", model, {
        **meta, "inference_size": {"image_size": meta["image_size"], "chosen_on": "validation", "tta": True}})
    with TestClient(create_app(ServiceConfig(model_path=chose))) as client:
        assert client.get("/api/model").json()["tta"] is True
        body = client.post("/api/predict?score_threshold=0.05", files=_upload(sample_dir)).json()
        assert body["tta"] is True
        assert client.post("/api/predict?tta=false", files=_upload(sample_dir)).json()["tta"] is False
        for target in body["images"][0]["detections"][:3]:
            answer = client.post("/api/explain", files=_upload(sample_dir, "file"),
                                 params={"box": ",".join(map(str, target["box"])), "label": target["label"]})
            assert answer.status_code == 200, answer.text
            assert answer.json()["box"] == pytest.approx(target["box"], abs=0.06)  # predict rounds to 0.1 px


def test_an_explanation_stops_before_its_next_pass_when_told(model_and_image):
    """The service's explain=true runs an explanation as one job on the model's thread (a forward and a backward
    pass per box, twice under TTA): when its client leaves, should_stop says so and no further pass begins."""
    from utils.detection.explain import ExplainStopped, heatmaps

    model, image, out = model_and_image
    asked = []

    def stop_after_the_first_pass():
        asked.append(1)
        return len(asked) > 1

    picture = image.float().div(255.0)
    with pytest.raises(ExplainStopped):
        heatmaps(model, picture, out["boxes"][:1], out["labels"][:1], "hirescam", tta=True,
                 should_stop=stop_after_the_first_pass)
    assert len(asked) == 2  # asked before the plain pass and before the mirrored one, which never ran
    assert not model.training and all(p.grad is None for p in model.parameters())  # left as it was


@pytest.mark.parametrize("method", ["eigencam", pytest.param("hirescam", marks=pytest.mark.slow)])
def test_a_map_lies_over_the_picture_not_over_the_models_padded_batch(tiny_model_file, method):
    """The model pads a 128x98 picture (at size 128) to 128 rows: its feature maps hold 30 rows of padding,
    which grad-cam stretched over the picture (a box near the bottom had 0.8 % of its map inside it). The
    picture padded by hand with the model's mean colour (0 once normalised, as the model pads) gives the same
    features with no padding to stretch: its map's top 98 rows are the picture's map."""
    from utils.detection.explain import heatmaps

    model, *_ = load_trained_model(tiny_model_file, "cpu")
    picture = torch.rand((3, 98, 128), generator=torch.Generator().manual_seed(1))
    padded = torch.tensor(model.transform.image_mean)[:, None, None].expand(3, 128, 128).clone()
    padded[:, :98] = picture
    with torch.no_grad():
        out = model([picture])[0]
    lowest = int(torch.argmax(out["boxes"][:, 1] * (out["boxes"][:, 3] < 96)))  # low, clear of the bottom edge
    box, label = out["boxes"][lowest:lowest + 1], out["labels"][lowest:lowest + 1]
    (of_picture,) = heatmaps(model, picture, box, label, method)
    (of_padded,) = heatmaps(model, padded, box, label, method)
    reference = of_padded[:98] - of_padded[:98].min()  # min-max scaled, as the picture's own map is
    reference = reference / reference.max()
    assert of_picture.shape == (98, 128)
    np.testing.assert_allclose(of_picture, reference, atol=1e-3)
    if method == "hirescam":
        assert evidence_share(of_picture, box[0]) == pytest.approx(evidence_share(reference, box[0]), abs=1e-3)


def test_a_box_is_scored_on_the_passs_detection_of_its_own_label():
    """Faster R-CNN's NMS is per class, so a face can be boxed as two classes; grad-cam's target took the best IoU
    over every label and scored 0 when that box's label differed, so the map of a box whose other-class twin
    overlapped it more (under flip TTA: a fused box is no pass's own) came out blank."""
    from utils.detection.explain import _box_score

    scores = torch.tensor([0.6, 0.3], requires_grad=True)
    outputs = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0], [12.0, 12.0, 52.0, 52.0]]),
               "labels": torch.tensor([1, 2]), "scores": scores}
    wanted = np.array([[11.0, 11.0, 51.0, 51.0]], dtype=np.float32)  # IoU 0.905 with each box
    wanted_nearer_the_other = np.array([[11.5, 11.5, 51.5, 51.5]], dtype=np.float32)
    score = _box_score([1], wanted_nearer_the_other)(outputs)
    assert float(score) == pytest.approx(0.6 + float(torchvision_iou(wanted_nearer_the_other, outputs["boxes"][:1])))
    score.backward()
    assert scores.grad.tolist() == [1.0, 0.0]  # the evidence is the label-1 box's
    assert float(_box_score([2], wanted)(outputs)) == pytest.approx(0.3 + float(torchvision_iou(wanted,
                                                                                                outputs["boxes"][1:])))
    assert float(_box_score([3], wanted)(outputs)) == 0.0  # no box of the label there: a blank map


def torchvision_iou(box: np.ndarray, other: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import box_iou

    return box_iou(torch.as_tensor(box), other)[0, 0]


@pytest.mark.slow  # over 5 s on 2 cores (pyproject.toml)
def test_a_large_photos_maps_cost_what_a_smaller_ones_do(model_and_image):
    """The model sees a photo at its working size, but each map was kept at the photo's own size: a 12 MP
    photo's held 48 MB apiece, three a box under flip TTA (~720 MB for 5 boxes), and a crop around a big face
    was blended at its own size too. Maps now stop at EXPLAIN_MAP_MAX_SIDE a side and big crops are shrunk to it
    first, so explaining 4 times the pixels (3200x2400 against 1600x1200) takes no more memory (tracemalloc
    sees numpy's arrays; the model's tensors are torch's, and as large as for detection alone)."""
    import tracemalloc

    from utils import defaults as D

    model, image, out = model_and_image
    areas = (out["boxes"][:, 2] - out["boxes"][:, 0]) * (out["boxes"][:, 3] - out["boxes"][:, 1])
    biggest = torch.argsort(areas, descending=True)[:2]  # crops over the bound at both sizes

    def explained(factor: int):
        large = image.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
        tracemalloc.start()
        try:
            found = explain_image(model, large, out["boxes"][biggest] * factor, out["labels"][biggest],
                                  out["scores"][biggest], "cpu", "hirescam", 2, tta=True)
            return found, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    (smaller, smaller_peak), (larger, larger_peak) = explained(10), explained(20)
    for explanation in larger:
        assert explanation.image_size == (120 * 20, 160 * 20)
        assert max(explanation.heatmap.shape) == D.EXPLAIN_MAP_MAX_SIDE and max(explanation.overlay.size) == 256
        assert 0 <= explanation.evidence_in_box <= 1
    assert larger_peak < 2 * smaller_peak, (smaller_peak, larger_peak)  # at the photo's size: ~4 times
    for one, other in zip(smaller, larger):  # the same picture, the same maps
        assert one.evidence_in_box == pytest.approx(other.evidence_in_box, abs=0.05)


def test_a_smaller_maps_heat_is_read_where_the_box_lies_in_the_photo():
    """A map smaller than its photo (map_size) is read in its own pixels: the share of heat in a box and the
    overlay's crop are those of the box's place in the photo."""
    from utils.detection.explain import Explanation, map_box, map_size, overlay

    height, width = 3000, 4000
    shape = map_size(height, width)
    assert shape == (768, 1024) and map_size(120, 160, 128) == (120, 160) and map_size(3000, 4000, 2048) == (1536, 2048)
    box = [2000.0, 1000.0, 2500.0, 1500.0]  # whole pixels of the map: 512, 256, 640, 384
    heatmap = np.zeros(shape, np.float32)
    x0, y0, x1, y1 = (int(round(v)) for v in map_box(box, (height, width), shape))
    heatmap[y0:y1, x0:x1] = 1.0
    explanation = Explanation(0, "with_mask", 0.9, box, heatmap, None, (height, width))
    assert explanation.evidence_in_box == pytest.approx(1.0)
    photo = np.zeros((height, width, 3), np.uint8)
    picture = np.asarray(overlay(photo, heatmap, box, "with_mask")).astype(int)
    # the crop holds the box with one box size around it: its middle third is hot (red in the jet colour map)
    middle = picture[picture.shape[0] // 3 + 8:2 * picture.shape[0] // 3 - 8, picture.shape[1] // 3 + 8:
                     2 * picture.shape[1] // 3 - 8]
    corner = picture[:20, :20]
    assert middle[..., 0].mean() > 100 > corner[..., 0].mean()


def test_a_smaller_maps_heat_is_blended_where_it_lies_in_the_photo():
    """A map smaller than its photo was cut at whole map pixels around the crop, then stretched to it: the heat
    moved up to half a map pixel (2 px of a 4096 px photo, 8 px of the 256 px overlay of a face's 64 px crop; 1 px
    here). It is read between the map's pixels: the heat's centre in the crop is the photo's, at its edge too."""
    from utils.detection.explain import _blend_region, crop_region, map_size

    height, width = 3072, 4096
    photo = np.broadcast_to(np.zeros(3, np.uint8), (height, width, 3))  # its pixels are not what is looked at
    rows, columns = np.indices(map_size(height, width))  # 768 x 1024: a map pixel is 4 px of the photo
    for cx, cy in ((1001.0, 2003.0), (2502.5, 1498.7), (3070.3, 605.9), (17.9, 3050.1)):
        heat = np.exp(-(((columns + 0.5) * 4 - cx) ** 2 + ((rows + 0.5) * 4 - cy) ** 2) / (2 * 8.0 ** 2))
        left, top, right, bottom = region = crop_region([cx - 12, cy - 12, cx + 12, cy + 12], width, height)
        part = _blend_region(photo, heat.astype(np.float32), region)[1]
        ys, xs = np.indices(part.shape)
        centre = (left + float(((xs + 0.5) * part).sum() / part.sum()) * (right - left) / part.shape[1],
                  top + float(((ys + 0.5) * part).sum() / part.sum()) * (bottom - top) / part.shape[0])
        assert centre == pytest.approx((cx, cy), abs=0.5), (cx, cy)


def test_a_small_faces_share_of_heat_is_read_from_a_smaller_map_as_from_the_photos():
    """A small face's box is a few pixels of a map smaller than its photo (map_size): rounded to whole map pixels,
    its share of the heat moved by up to 0.16 from the share in the map at the photo's size (grad-cam's resize of
    the same map). Pixels at the box's edge now count for their part inside."""
    import cv2

    from utils.detection.explain import Explanation, map_size

    height, width = 3000, 4000
    map_height, map_width = map_size(height, width)
    rows, columns = (np.arange(map_height)[:, None] + 0.5) * height / map_height, \
        (np.arange(map_width)[None, :] + 0.5) * width / map_width  # the map's pixel centres in the photo
    for cx, cy, side in ((1001.3, 2001.7, 6.7), (2999.6, 1210.2, 10.6), (400.5, 300.5, 13.9)):
        spread = 2 * max(side / 2, 4) ** 2
        smaller = np.exp(-((columns - cx) ** 2 + (rows - cy) ** 2) / spread).astype(np.float32)
        box = [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]
        expected = evidence_share(cv2.resize(smaller, (width, height), interpolation=cv2.INTER_LINEAR), box)
        assert Explanation(0, "with_mask", 0.9, box, smaller, None, (height, width)).evidence_in_box == \
            pytest.approx(expected, abs=0.03), (cx, cy, side)
