"""predict's image loader decodes each photo at most at the size the model uses it at (and a drawn photo's copy at
most at the annotated copies' cap), while boxes, widths and heights stay in the photo's own pixels; evaluate (and the
validation choices) give the model the same input of the photo, so find the same detections.

With 4 decode workers prefetching 4 batches of 4, up to 64 photos wait decoded; each was held at its full size
(36 MB for a 12 MP photo: 2.3 GB) though the model's transform then shrank it to its working size."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.transforms.v2 import functional as F

from utils import defaults as D
from utils.classes import CLASS_COLOURS, NAME_OF

WIDTH, HEIGHT = 3000, 2000
SQUARE = (1000, 600, 1600, 1400)  # the bright square on the dark photo, XYXY in its pixels


class BrightSquareDetector(torch.nn.Module):
    """A detector whose one box is the bright part of the picture its transform makes: boxes go through
    torchvision's own resize and map back, as a trained detector's do, so where they land tells the coordinates
    apart from what a model has learnt."""

    def __init__(self, size: int):
        super().__init__()
        self.transform = GeneralizedRCNNTransform(size, size, [0.0] * 3, [1.0] * 3)
        self.seen: list[tuple[int, int]] = []  # (height, width) of each image given

    def forward(self, images):
        original = [tuple(image.shape[-2:]) for image in images]
        self.seen += original
        batch, _ = self.transform(images)
        found = []
        for tensor, (height, width) in zip(batch.tensors, batch.image_sizes):
            rows, columns = torch.nonzero(tensor[:, :height, :width].mean(0) > 0.5, as_tuple=True)
            box = [columns.min(), rows.min(), columns.max() + 1, rows.max() + 1]
            found.append({"boxes": torch.tensor([box], dtype=torch.float32), "labels": torch.tensor([1]),
                          "scores": torch.tensor([0.9])})
        return self.transform.postprocess(found, batch.image_sizes, original)


def photo(path, size=(WIDTH, HEIGHT), exif=None) -> Image.Image:
    """A dark photo with a bright square at SQUARE (scaled to *size*), a little noise on it so that JPEG has
    detail to keep, saved at *path* (JPEG or PNG by its suffix)."""
    width, height = size
    pixels = np.random.default_rng(3).integers(0, 40, (height, width, 3), dtype=np.uint8)
    x0, y0, x1, y1 = (round(v * s) for v, s in zip(SQUARE, (width / WIDTH, height / HEIGHT) * 2))
    pixels[y0:y1, x0:x1] += 200
    picture = Image.fromarray(pixels)
    picture.save(path, **({"quality": 90} if path.suffix == ".jpg" else {}), **({"exif": exif} if exif else {}))
    return picture


@pytest.fixture(scope="module")
def tiny_detector():
    from utils.detection.model import build_model

    torch.manual_seed(0)
    return build_model(backbone="mobilenet_v2_fpn", weights="none", image_size=128).eval()


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_a_large_photo_leaves_the_workers_at_the_size_the_model_uses(tiny_detector, tmp_path, suffix):
    from utils.data.images import SizeBound, load_rgb, reduced_to
    from utils.detection.ensemble import BoxFusionEnsemble
    from utils.detection.inference import ImageFileDataset, ImageItem, decode_bound
    from utils.detection.model import build_model

    path = tmp_path / f"photo{suffix}"
    photo(path)
    turned = tmp_path / f"turned{suffix}"
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter: 2000 wide, 3000 tall
    photo(turned, exif=exif)
    items = [ImageItem(p.name, p) for p in (path, turned)]
    decoded, upright = ImageFileDataset(items, decode_bound(tiny_detector), keep=[1])
    assert decoded.size == (WIDTH, HEIGHT) and tuple(decoded.image.shape) == (3, 86, 128)  # 85.3 rows, rounded up
    # the whole decode's pixels reduced, as evaluate reduces them: not a JPEG decoder's scaled (draft) pixels
    assert torch.equal(decoded.image, F.pil_to_tensor(reduced_to(load_rgb(path), decode_bound(tiny_detector))))
    assert decoded.copy is None  # not kept: no copy
    assert upright.size == (HEIGHT, WIDTH) and tuple(upright.image.shape) == (3, 128, 86)
    assert tuple(upright.copy.shape) == (3, WIDTH, HEIGHT)  # kept, with no cap: the whole photo

    larger = build_model(backbone="mobilenet_v2_fpn", weights="none", image_size=256).eval()
    cap = SizeBound(((D.ANNOTATED_MAX_SIDE, D.ANNOTATED_MAX_SIDE),))
    (member,) = ImageFileDataset(items[:1], decode_bound(BoxFusionEnsemble([tiny_detector, larger])), [0], cap)
    assert tuple(member.image.shape) == (3, 171, 256)  # the largest member's size
    assert tuple(member.copy.shape) == (3, 854, D.ANNOTATED_MAX_SIDE)
    (alone,) = ImageFileDataset(items[:1], decode_bound(BoxFusionEnsemble([tiny_detector, larger])))
    assert torch.equal(alone.image, member.image)  # the model's input does not depend on a copy being kept


def test_a_photo_at_or_below_the_model_size_is_decoded_as_before_pixel_for_pixel(tiny_detector, tmp_path):
    from utils.data.images import load_rgb
    from utils.detection.inference import ImageFileDataset, ImageItem, decode_bound

    for name, size in (("small.jpg", (128, 90)), ("small.png", (100, 128)), ("tiny.jpg", (40, 30))):
        photo(tmp_path / name, size)
        (decoded,) = ImageFileDataset([ImageItem(name, tmp_path / name)], decode_bound(tiny_detector), keep=[0])
        assert torch.equal(decoded.image, F.pil_to_tensor(load_rgb(tmp_path / name))) and decoded.size == size
        assert decoded.copy is decoded.image


def test_boxes_of_a_reduced_photo_are_in_its_own_pixels_as_from_the_whole_photo(tmp_path):
    from utils.data.images import load_rgb
    from utils.detection.inference import ImageItem, detect, detect_files, to_model_input

    photo(tmp_path / "photo.jpg")
    model = BrightSquareDetector(512)
    (result,) = detect_files(model, [ImageItem("photo.jpg", tmp_path / "photo.jpg")], "cpu", num_workers=0)
    assert model.seen == [(342, 512)]  # the model was given the photo at its size, not 3000x2000
    assert (result.width, result.height) == (WIDTH, HEIGHT) and result.image is None
    pixel = WIDTH / 512  # one pixel of the model's frame, in the photo's
    assert np.allclose(result.boxes[0].tolist(), SQUARE, atol=pixel)

    # the whole photo given to the model, as the loader gave it before (its own transform shrinking it)
    (full,) = detect(model, [to_model_input(F.pil_to_tensor(load_rgb(tmp_path / "photo.jpg")), "cpu")])
    assert model.seen[-1] == (HEIGHT, WIDTH)
    assert np.allclose(result.boxes[0].tolist(), full["boxes"][0].tolist(), atol=pixel)


def test_predict_draws_a_large_photo_at_the_cap_with_its_boxes_in_place(tmp_path):
    from utils.detection.prediction import predict_images

    photo(tmp_path / "photo.jpg")
    model = BrightSquareDetector(512)
    run = predict_images(model, [tmp_path / "photo.jpg"], tmp_path / "out", num_workers=0)
    (record,) = json.loads((tmp_path / "out" / "predictions.json").read_text())["images"]
    assert (record["width"], record["height"]) == (WIDTH, HEIGHT) and run.num_images == 1
    assert np.allclose(record["detections"][0]["box"], SQUARE, atol=WIDTH / 512)
    with Image.open(tmp_path / "out" / "annotated" / record["annotated"]) as drawn:
        assert max(drawn.size) == D.ANNOTATED_MAX_SIDE
        scale = drawn.width / WIDTH
        x0, y0, x1, y1 = (v * scale for v in record["detections"][0]["box"])
        colour = np.asarray(CLASS_COLOURS[NAME_OF[1]], dtype=float)
        # the outline at the middle of the box's left and bottom edges, in the drawing's pixels
        for x, y in ((x0 + 1, (y0 + y1) / 2), ((x0 + x1) / 2, y1 - 1)):
            assert np.abs(np.asarray(drawn.getpixel((round(x), round(y))), dtype=float) - colour).max() < 48


def test_predict_explains_a_large_photo_on_the_input_its_boxes_came_from(tiny_detector, tmp_path):
    """The explanations run the model again on the picture its boxes came from (the model's input, not the
    larger copy drawn on: there a box may match none the model finds, and its map is blank), and cut their
    overlays from the copy."""
    from utils.detection.prediction import predict_images

    photo(tmp_path / "photo.jpg")
    seen = []  # (height, width) of each picture the model is given
    hook = tiny_detector.register_forward_pre_hook(lambda _, args: seen.extend(tuple(i.shape[-2:]) for i in args[0]))
    tiny_detector.roi_heads.score_thresh = 0.0  # untrained: every box kept, so the photo has some to explain
    try:
        predict_images(tiny_detector, [tmp_path / "photo.jpg"], tmp_path / "out", score_threshold=0.0,
                       explain="hirescam", explain_max_boxes=2, num_workers=0)
    finally:
        tiny_detector.roi_heads.score_thresh = 0.05
        hook.remove()
    assert len(seen) == 3 and set(seen) == {(86, 128)}  # the detection pass, then one pass a box explained
    (record,) = json.loads((tmp_path / "out" / "predictions.json").read_text())["images"]
    assert len(record["explanations"]) == 2
    for entry in record["explanations"]:
        assert 0 < entry["evidence_in_box"] <= 1
        with Image.open(tmp_path / "out" / "annotated" / entry["file"]) as overlay:
            assert max(overlay.size) == 256


@pytest.mark.slow  # over 5 s on a quiet 2-core machine
def test_evaluate_gives_a_photo_the_detections_predict_counts_at_each_working_size(tiny_detector, tmp_path):
    """evaluate (engine.run_inference, as the validation choices and the estimators' rates) gave the model a large
    photo whole, its transform shrinking it bilinearly, where predict gives it the photo reduced: other boxes and
    scores. Now the same input, at the size the model runs at when called (choose_inference_size changes it); a
    photo at or below it is given as it always was."""
    from utils.data.pairs import Pair
    from utils.data.voc import VocAnnotation, VocObject, write_voc
    from utils.detection.engine import run_inference
    from utils.detection.evaluation import evaluation_loader
    from utils.detection.inference import ImageItem, detect, detect_files
    from utils.detection.inference_size import set_inference_size

    pairs = []
    for stem, (width, height) in (("large", (2400, 1600)), ("small", (120, 80))):
        photo(tmp_path / f"{stem}.jpg", (width, height))
        box = [round(v * s) for v, s in zip(SQUARE, (width / WIDTH, height / HEIGHT) * 2)]
        write_voc(tmp_path / f"{stem}.xml",
                  VocAnnotation(f"{stem}.jpg", width, height, objects=[VocObject("with_mask", *box)]))
        pairs.append(Pair(tmp_path / f"{stem}.jpg", tmp_path / f"{stem}.xml"))
    items = [ImageItem(pair.image.name, pair.image) for pair in pairs]
    loader = evaluation_loader(pairs, batch_size=2, num_workers=0)
    tiny_detector.roi_heads.score_thresh = 0.0  # untrained: every box kept, so each photo has many to compare
    try:
        for size, tta in ((128, False), (128, True), (192, False)):
            set_inference_size(tiny_detector, size)
            evaluated, targets = run_inference(tiny_detector, loader, torch.device("cpu"), tta=tta)
            predicted = list(detect_files(tiny_detector, items, "cpu", tta=tta, num_workers=0))
            assert [len(target["boxes"]) for target in targets] == [1, 1]
            for found, result in zip(evaluated, predicted):
                assert len(found["boxes"]) > 0
                for key in ("boxes", "labels", "scores"):
                    assert torch.equal(found[key], getattr(result, key)), (size, tta, result.item.name, key)
            # the small photo: the loader's image as it is, as before
            (small,) = detect(tiny_detector, [loader.dataset[1][0]], tta=tta)
            assert all(torch.equal(evaluated[1][key], small[key]) for key in ("boxes", "labels", "scores"))
    finally:
        set_inference_size(tiny_detector, 128)
        tiny_detector.roi_heads.score_thresh = 0.05


def test_the_service_and_predict_video_give_a_large_picture_the_detections_predict_counts(tiny_detector, tmp_path):
    """The service shrank an upload with torchvision's bilinear resize and predict_video gave the model each frame
    whole, where predict reduces the same picture (images.reduced_to): other boxes and scores for one picture.
    Now all three give the model the same input, and the boxes come back in the picture's own pixels."""
    from utils.detection.inference import ImageItem, detect_files
    from utils.service.uploads import detect_as_predict, model_sized_input

    picture = photo(tmp_path / "large.png", (1200, 800))  # PNG: a video frame's pixels, without JPEG's loss
    tensor = F.pil_to_tensor(picture)
    tiny_detector.roi_heads.score_thresh = 0.0  # untrained: every box kept, so there are many to compare
    try:
        (predicted,) = detect_files(tiny_detector, [ImageItem("large.png", tmp_path / "large.png")], "cpu",
                                    num_workers=0)
        served = detect_as_predict(tiny_detector, tensor, "cpu", False, 0.0)
        image, back = model_sized_input(tiny_detector, tensor, "cpu")
        assert back is not None and max(image.shape[-2:]) == 128  # the model's copy, not the 1200 px picture
        framed = video_detections(tiny_detector, picture, tmp_path)
    finally:
        tiny_detector.roi_heads.score_thresh = 0.05
    assert len(predicted.boxes) > 0
    for key in ("boxes", "labels", "scores"):
        assert torch.equal(served[key], getattr(predicted, key)), key
    for key in ("boxes", "labels", "scores"):
        assert torch.equal(framed[key], getattr(predicted, key)), ("video", key)


def video_detections(model, picture: Image.Image, tmp_path) -> dict:
    """The detections predict_video finds on the frame of a one-frame lossless video of *picture*, at threshold 0
    (as its progress journal receives them)."""
    import cv2

    from utils.detection.video import predict_video

    class Journal:  # video_progress.VideoProgress's calls
        def detections(self, index):
            return None

        def add(self, index, out, soft):
            self.out = out

        def close(self):
            pass

        def finish(self):
            pass

    path, journal = tmp_path / "one.avi", Journal()
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), 1.0, picture.size)
    writer.write(cv2.cvtColor(np.asarray(picture), cv2.COLOR_RGB2BGR))
    writer.release()
    predict_video(model, torch.device("cpu"), str(path), tmp_path / "video", score_threshold=0.0, journal=journal)
    return journal.out
