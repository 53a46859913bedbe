"""Explanations of detections: where in the picture the evidence for each box's class lies.

The maps come from the `grad-cam` package (pytorch_grad_cam), scoring each box with its
FasterRCNNBoxScoreTarget (IoU with the kept box + its class score):
- hirescam (default): gradient x activation element by element (HiResCAM). The box score's
  gradient reaches only the features RoIAlign sampled for that box, so the map stays on the
  evidence the box actually used: one map per detection.
- gradcam: channel weights from the spatially averaged gradient (Grad-CAM); the weighted
  channels light up wherever they fire in the picture, often outside the box.
- eigencam: the first principal component of the features; class-agnostic, one map shared by
  the boxes of an image, no backward pass (about 10x cheaper).
The maps read the FPN's 3x3 output convolutions, the detector's features at every pyramid
level: small faces are found on the finest level, so the levels' maps are upsampled to the
image and averaged, as grad-cam does for several target layers.

Each explanation is written as an overlay picture: a crop around the box (with context),
the heat map blended over it and the box outlined, so that a 20-pixel face is still
readable. A map holds the detail of the model's working size, not the photo's: it is kept at
the image's size up to EXPLAIN_MAP_MAX_SIDE px a side (or the model's frame's, when larger),
and a larger photo's map at that size, so that a 12 MP photo's maps (48 MB each at its own
size, three a box under flip TTA) cost what a 1 MP photo's do; a crop larger than that side
is shrunk to it before the blend. HiResCAM/Grad-CAM cost a forward and a backward pass per
detection (about 3x a plain prediction of the image), so callers bound how many images and
boxes they explain.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from .. import defaults as D
from ..classes import CLASS_COLOURS, NAME_OF
from .compliance import listed_score
from .inference import unflip_boxes

CROP_CONTEXT = D.EXPLAIN_CROP_CONTEXT
CROP_MIN_SIDE = D.EXPLAIN_CROP_MIN_SIDE
OVERLAY_SIDE = D.EXPLAIN_OVERLAY_SIDE
HEATMAP_WEIGHT = D.EXPLAIN_HEATMAP_WEIGHT


class ExplainError(RuntimeError):
    """The model cannot be explained (no FPN to read the features from)."""


class ExplainStopped(Exception):
    """*should_stop* said yes between two passes: nobody waits for the maps any more (a service client left)."""


def stop_point(should_stop) -> None:
    """Raise ExplainStopped when *should_stop* (a callable, or None: never) says so; called before each pass."""
    if should_stop is not None and should_stop():
        raise ExplainStopped("stopped between passes: nobody waits for this explanation")


@dataclass
class Explanation:
    """One detection's heat map over the whole image (float32 in [0, 1], at the image's size or, for an image
    over map_size's bound, smaller: *image_size* says the image's (height, width)) and its overlay crop."""

    index: int          # the detection's position in the image's detection list
    label: str
    score: float
    box: list[float]    # in the image's pixels
    heatmap: np.ndarray
    overlay: Image.Image
    image_size: tuple[int, int] | None = None  # (height, width) of the image; None: the map's own

    @property
    def evidence_in_box(self) -> float:
        """Share of the map's total heat inside the box: near 1 when the class evidence is the face itself."""
        return evidence_share(self.heatmap, map_box(self.box, self.image_size or self.heatmap.shape,
                                                    self.heatmap.shape))


def map_size(height: int, width: int, frame_side: int = 0) -> tuple[int, int]:
    """(height, width) of the heat maps of a *height* x *width* image that the model sees in a frame of
    *frame_side* px on its longer side: the image's own up to EXPLAIN_MAP_MAX_SIDE (or *frame_side*, when
    larger) on its longer side, else scaled down to that. The map's detail is the model's frame's, so more
    pixels add memory (4 bytes each, a map a box and pass), not detail."""
    side, longest = max(D.EXPLAIN_MAP_MAX_SIDE, frame_side), max(height, width)
    if longest <= side:
        return height, width
    return max(1, round(height * side / longest)), max(1, round(width * side / longest))


def map_box(box, image_size, map_shape) -> list[float]:
    """*box* (XYXY in the pixels of an image of *image_size* (height, width)) in the pixels of a map of
    *map_shape* (height, width) over the same picture."""
    (height, width), (map_height, map_width) = image_size[:2], map_shape[:2]
    sx, sy = map_width / width, map_height / height
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0 * sx, y0 * sy, x1 * sx, y1 * sy]


def feature_layers(model) -> list[torch.nn.Module]:
    """The FPN output convolutions of a torchvision detector (every backbone here has an FPN)."""
    fpn = getattr(getattr(model, "backbone", None), "fpn", None)
    blocks = getattr(fpn, "layer_blocks", None)
    if blocks is None or len(blocks) == 0:
        raise ExplainError("the model has no FPN (backbone.fpn.layer_blocks) to take the feature maps from")
    return list(blocks)


@contextlib.contextmanager
def _gradients_on(modules):
    """Gradients through the target layers even when training froze them; restored afterwards."""
    params = [p for module in modules for p in module.parameters()]
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)


def _cam(model, method: str):
    from pytorch_grad_cam import EigenCAM, GradCAM, HiResCAM

    if method not in D.EXPLAIN_METHODS:
        raise ValueError(f"explain method {method!r}: choose one of {', '.join(D.EXPLAIN_METHODS)}")
    cam_class = {"hirescam": HiResCAM, "gradcam": GradCAM, "eigencam": EigenCAM}[method]
    return cam_class(model=model, target_layers=feature_layers(model))


def heatmaps(model, image: torch.Tensor, boxes, labels, method: str = "hirescam",
             tta: bool = False, should_stop=None) -> list[np.ndarray]:
    """One map (float32 in [0, 1], of map_size: the image's size up to its bound) per detection *boxes*/*labels*
    of *image* (float CxHxW in [0, 1] on the model's device).

    *tta*: the boxes came from flip TTA, each fused from the plain and the mirrored image's passes
    (utils/detection/inference.py), so each map is the mean of both passes' evidence: the plain image's
    map and the mirrored image's map mirrored back, scaled to a peak of 1 again. A box one pass alone
    found gets that pass's map; a pass that finds no box of the label there adds a blank map (hirescam,
    gradcam: eigencam's map is the features' and does not depend on the box).

    *should_stop* (a callable) is asked before each pass: yes raises ExplainStopped, the passes left undone.
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if len(boxes) == 0:
        return []
    plain = _pass_heatmaps(model, image, boxes, labels, method, should_stop)
    if not tta:
        return plain
    # unflip_boxes maps boxes between an image and its mirror either way
    mirrored = _pass_heatmaps(model, image.flip(-1), unflip_boxes(boxes, image.shape[-1]), labels, method,
                              should_stop)
    fused = []
    for one, other in zip(plain, mirrored):
        mean = (one + other[:, ::-1]) / 2
        peak = float(mean.max())
        fused.append((mean / peak if peak > 0 else mean).astype(np.float32))
    return fused


def _model_frame(model, image: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
    """(height, width) of the batch the model's transform makes of *image* and of the image inside it: the
    transform resizes the image, then pads the batch's bottom and right to a multiple of size_divisible
    (32), so its feature maps cover more than the picture."""
    with torch.no_grad():
        batch = model.transform([image])[0]
    return tuple(batch.tensors.shape[-2:]), tuple(batch.image_sizes[0])


def _cam_in_image_frame(cam, model, image: torch.Tensor):
    """*cam*'s maps laid over *image*: grad-cam stretches each feature map, padding included, to the input's
    size, which shifted a map by up to the padding's share of the image (a 128x98 picture at size 128 is
    padded to 128 rows: a box near its bottom had 0.8 % of its map inside it, 58 % in this frame). The maps
    are made in the padded batch's frame, then the picture's part of them is cropped and resized to the
    image's map_size (min-max scaled, as grad-cam scales its maps)."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    (padded_h, padded_w), (inner_h, inner_w) = _model_frame(model, image)
    cam.get_target_width_height = lambda _input: (padded_w, padded_h)
    height, width = map_size(*image.shape[-2:], max(inner_h, inner_w))

    def run(batch, targets) -> np.ndarray:
        framed = cam(batch, targets=targets)[0][:inner_h, :inner_w]
        return scale_cam_image(framed[None], (width, height))[0].astype(np.float32)

    return run


def _box_score(labels: list[int], boxes: np.ndarray):
    """grad-cam's FasterRCNNBoxScoreTarget (IoU with the box + class score of the pass's best match), kept on the
    autograd graph: where the pass finds no box of the label at IoU > 0.5, grad-cam's score is a constant 0 and
    its backward() fails; plus 0 x the pass's scores it is a 0 that depends on them, and the map comes out blank.
    Each box is matched among the pass's detections of its own label: grad-cam takes the best IoU over every
    label, then scores 0 when that one's label differs, so a face the model also boxes as another class (two
    classes at one face, kept apart by the per-class NMS) lost its map whenever that other box overlapped
    more (under flip TTA, whose fused boxes are no pass's own)."""
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    targets = [(label, FasterRCNNBoxScoreTarget(labels=[label], bounding_boxes=box[None]))
               for label, box in zip(labels, boxes)]

    def score(outputs: dict) -> torch.Tensor:
        total = outputs["scores"].sum() * 0
        for label, target in targets:
            same = outputs["labels"] == label
            total = total + target({key: value[same] for key, value in outputs.items()})
        return total

    return score


def _pass_heatmaps(model, image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                   method: str, should_stop=None) -> list[np.ndarray]:
    """heatmaps of one pass of the model over *image* as given."""
    was_training = model.training
    model.eval()
    layers = feature_layers(model)
    cam = _cam(model, method)
    batch = image.unsqueeze(0)
    try:
        framed_cam = _cam_in_image_frame(cam, model, image)
        with _gradients_on(layers):
            if method == "eigencam":
                stop_point(should_stop)
                # class-agnostic: one map for the image, shown for each of its boxes
                return [framed_cam(batch, [_box_score(labels.tolist(), boxes.numpy())])] * len(boxes)
            maps = []
            for box, label in zip(boxes, labels):
                stop_point(should_stop)
                maps.append(framed_cam(batch, [_box_score([int(label)], box[None].numpy())]))
            return maps
    finally:
        cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def evidence_share(heatmap: np.ndarray, box) -> float:
    """Share of *heatmap*'s sum that lies inside *box* (XYXY pixels, a pixel at its edge counted for the part of it
    inside: a map smaller than its photo (map_size) has a small face's box a few pixels wide, and rounded to whole
    pixels, its share moved by up to 0.3); 0 for an all-zero map."""
    total = float(heatmap.sum())
    if total <= 0:
        return 0.0

    def inside(low: float, high: float, pixels: int) -> np.ndarray:  # each pixel's part in [low, high]
        starts = np.arange(pixels, dtype=np.float64)
        return np.clip(np.minimum(starts + 1, high) - np.maximum(starts, low), 0.0, 1.0)

    x0, y0, x1, y1 = (float(v) for v in box)
    rows, columns = inside(y0, y1, heatmap.shape[0]), inside(x0, x1, heatmap.shape[1])
    return float(rows @ heatmap.astype(np.float64) @ columns) / total


def crop_region(box, width: int, height: int) -> tuple[int, int, int, int]:
    """The box with CROP_CONTEXT of its size around it (at least CROP_MIN_SIDE), inside the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side_w = max((x1 - x0) * (1 + 2 * CROP_CONTEXT), CROP_MIN_SIDE)
    side_h = max((y1 - y0) * (1 + 2 * CROP_CONTEXT), CROP_MIN_SIDE)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(max(0, min(cx - side_w / 2, width - side_w)))
    top = int(max(0, min(cy - side_h / 2, height - side_h)))
    return left, top, int(min(width, left + side_w)), int(min(height, top + side_h))


def _blend_region(image_rgb: np.ndarray, heatmap: np.ndarray, region) -> tuple[np.ndarray, np.ndarray]:
    """(the photo, the map) over *region* (left, top, right, bottom in the photo's pixels) at the size they are
    blended at: the photo's own, or, for a region over EXPLAIN_MAP_MAX_SIDE a side (a face filling a 12 MP
    photo: each float copy of it 144 MB), shrunk to that; the map's part resized to it where the map is not at
    the photo's size (map_size)."""
    import cv2

    left, top, right, bottom = region
    crop = image_rgb[top:bottom, left:right]
    size = map_size(bottom - top, right - left)
    if size != crop.shape[:2]:  # read in place (rows of a C-ordered photo): no full-size copy of the crop
        crop = cv2.resize(crop, size[::-1], interpolation=cv2.INTER_AREA)
    if heatmap.shape == image_rgb.shape[:2]:
        part = heatmap[top:bottom, left:right]
        if part.shape != crop.shape[:2]:
            part = cv2.resize(part, size[::-1], interpolation=cv2.INTER_LINEAR)
    else:  # the map read at the region's place, between its pixels: cut at whole map pixels and stretched, its heat
        # moved up to half a map pixel (2 px of a 4096 px photo, 8 px of a small face's 256 px overlay)
        x0, y0, x1, y1 = map_box(region, image_rgb.shape, heatmap.shape)
        sx, sy = (x1 - x0) / size[1], (y1 - y0) / size[0]  # map pixels a crop pixel; centres to centres below
        to_map = np.array([[sx, 0, x0 + sx / 2 - 0.5], [0, sy, y0 + sy / 2 - 0.5]])
        part = cv2.warpAffine(heatmap, to_map, size[::-1], flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_REPLICATE)
    return crop.astype(np.float32) / 255.0, part


def overlay(image_rgb: np.ndarray, heatmap: np.ndarray, box, label: str) -> Image.Image:
    """The heat map (at the image's size, or smaller: map_size) blended over a crop around *box* (grad-cam's
    show_cam_on_image), box outlined."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    height, width = image_rgb.shape[:2]
    left, top, right, bottom = crop_region(box, width, height)
    crop, part = _blend_region(image_rgb, heatmap, (left, top, right, bottom))
    blended = show_cam_on_image(crop, part, use_rgb=True, image_weight=1.0 - HEATMAP_WEIGHT)
    picture = Image.fromarray(blended)
    scale = OVERLAY_SIDE / max(right - left, bottom - top)  # of the photo's pixels, whatever size it was blended at
    picture = picture.resize((max(1, round((right - left) * scale)), max(1, round((bottom - top) * scale))),
                             Image.Resampling.BICUBIC)
    x0, y0, x1, y1 = box
    outline = [(x0 - left) * scale, (y0 - top) * scale, (x1 - left) * scale, (y1 - top) * scale]
    ImageDraw.Draw(picture).rectangle(outline, outline=tuple(CLASS_COLOURS[label]), width=2)
    return picture


def explain_image(model, image_uint8: torch.Tensor, boxes, labels, scores, device, method: str = D.EXPLAIN_METHOD,
                  max_boxes: int = D.EXPLAIN_MAX_BOXES, tta: bool = False, should_stop=None,
                  picture: torch.Tensor | None = None) -> list[Explanation]:
    """Explanations of the *max_boxes* highest-scoring detections of one image (uint8 CxHxW, the model's input:
    the detections' own); *tta*: the detections came from flip TTA, so the maps hold both passes' evidence
    (:func:`heatmaps`); *should_stop*: asked before each pass (:func:`heatmaps`). *picture* (uint8 CxHxW, the same
    photo larger: predict decodes the model's input at its working size) is what the overlays are cut from, and
    the explanations' boxes are in its pixels; by default *image_uint8*."""
    scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
    order = torch.argsort(scores, descending=True)[: max(0, max_boxes)].tolist()
    if not order:
        return []
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    image = image_uint8.to(device).float().div(255.0)
    maps = heatmaps(model, image, boxes[order], labels[order], method, tta, should_stop)
    picture = image_uint8 if picture is None else picture
    rgb = picture.permute(1, 2, 0).contiguous().cpu().numpy()  # C order: a crop of it is read in place
    (height, width), (picture_height, picture_width) = image_uint8.shape[-2:], rgb.shape[:2]
    to_picture = torch.tensor([picture_width / width, picture_height / height] * 2)  # ones for the image itself
    explanations = []
    for index, heatmap in zip(order, maps):
        name = NAME_OF[int(labels[index])]
        box = [round(float(v), 2) for v in boxes[index] * to_picture]
        explanations.append(Explanation(index, name, listed_score(scores[index]), box, heatmap,
                                        overlay(rgb, heatmap, box, name), tuple(rgb.shape[:2])))
    return explanations
