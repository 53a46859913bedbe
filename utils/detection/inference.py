"""Running a detector on image files: decoding in DataLoader workers, batching, flip TTA, box fusion.

The model is a torchvision detection model in eval mode: it takes a list of float
CxHxW images in [0, 1] of any size (its own transform resizes them) and returns one
dict of boxes, labels and scores per image, in the input image's pixel coordinates.

Decoding happens in DataLoader worker processes, which prefetch the next batches
while the model runs on the current one; an undecodable file becomes a "skipped"
item with its reason instead of an exception, so one bad file never stops a job.
Images travel from the workers as uint8 tensors (4x less to copy than float) and
are converted to float on the device. Each worker decodes a photo whole (one at a time) and queues it
reduced to the size the model uses it at (decode_bound: the largest its transforms, or an ensemble's,
resize it to; images.reduced_to), never above its own: with 4 workers prefetching 4 batches of 4, 64
full-size 12 MP photos held 2.3 GB where the model used 896 px of each. A photo kept for drawing comes
with a copy at most at the drawings' size. Boxes, widths and heights stay in the photo's own pixels.
evaluate's images (engine.run_inference) get the same reduction (model_input_at_size), so a photo is
the same model input, and has the same detections, in both jobs.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import batched_nms, box_iou
from torchvision.transforms.v2 import functional as F

from .. import defaults as D
from ..data.images import ImageError, SizeBound, load_photo_hashed, load_photo_span, reduced_to


@dataclass
class ImageItem:
    """One input file: the name shown in outputs, the path read, and the folder it sits in below the
    folder or archive given ("" at its top or when the file was named itself): compliance per folder."""

    name: str
    path: Path
    folder: str = ""
    member: object = None  # a .tar member read where it lies (utils.data.pairs.TarMember): *path* is the archive

    @property
    def file_name(self) -> str:
        return posixpath.basename(self.member.relative) if self.member is not None else Path(self.path).name


@dataclass
class Detections:
    """Detections for one image, in its own pixel coordinates (boxes XYXY float, labels int64, scores float), of
    *width* x *height* px. *image*, kept when asked for (annotation), is the photo as decoded for it: uint8 CxHxW,
    at most at the drawings' size, so smaller than width x height for a large photo: image_boxes() gives the
    boxes in its pixels. *model_input*, kept with it, is the uint8 picture the model ran on (explanations run it
    again on that), input_boxes() the boxes in its pixels."""

    item: ImageItem
    width: int
    height: int
    boxes: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor
    image: torch.Tensor | None = field(default=None, repr=False)
    sha256: str | None = None  # of the file, from the read that decoded it (predict's run record)
    model_input: torch.Tensor | None = field(default=None, repr=False)

    def image_boxes(self) -> torch.Tensor:
        """The boxes in the pixels of *image* (drawn on it)."""
        return rescaled_boxes(self.boxes, (self.height, self.width), tuple(self.image.shape[-2:]))

    def input_boxes(self) -> torch.Tensor:
        """The boxes in the pixels of *model_input* (explained on it)."""
        return rescaled_boxes(self.boxes, (self.height, self.width), tuple(self.model_input.shape[-2:]))


@dataclass
class Skipped:
    item: ImageItem
    reason: str
    sha256: str | None = None  # of the file when it could be read: an input all the same


def default_num_workers() -> int:
    """Decoding workers: a share of the CPUs, leaving the rest to the model's own threads."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(D.DECODE_WORKERS_MAX, cpus // 2))


class DecodedItem(NamedTuple):
    index: int
    image: torch.Tensor | None  # uint8 CxHxW, reduced to the dataset's bound (images.reduced_to)
    problem: str | None
    sha256: str | None  # of the file (None for an archive's member: the run record hashes the archive)
    size: tuple[int, int] | None = None  # the photo's own (width, height), before any reduction
    copy: torch.Tensor | None = None  # the kept copy (uint8 CxHxW) of an item in *keep*; *image* when of its size


class ImageFileDataset(Dataset):
    """Items are DecodedItem: each file decoded whole, then reduced to *bound*'s size (None: its own); the items
    whose index is in *keep* also with a copy at most at *copy_bound*'s size (None: the decode's)."""

    def __init__(self, items: list[ImageItem], bound: SizeBound | None = None, keep=(),
                 copy_bound: SizeBound | None = None):
        self.items = list(items)
        self.bound, self.keep, self.copy_bound = bound, frozenset(keep), copy_bound

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index) -> DecodedItem:
        item = self.items[index]
        # the bound of a copy that is not capped: the decode's own size
        copy_bound = (self.copy_bound or SizeBound(((float("inf"), float("inf")),))) if index in self.keep else None
        sha256 = None  # an archive's member: the run record hashes the archive
        try:
            if item.member is not None:
                photo = load_photo_span(item.path, item.member.offset, item.member.size, item.name, self.bound,
                                        copy_bound)
            else:
                photo, sha256, error = load_photo_hashed(item.path, self.bound, copy_bound)
                if error is not None:
                    raise error
        except ImageError as exc:
            return DecodedItem(index, None, exc.problem, sha256)
        image = F.pil_to_tensor(photo.image)
        copy = None if photo.copy is None else image if photo.copy is photo.image else F.pil_to_tensor(photo.copy)
        return DecodedItem(index, image, None, sha256, photo.size, copy)


def _collate(batch):
    return list(batch)


def image_loader(dataset: ImageFileDataset, batch_size: int = D.INFERENCE_BATCH_SIZE, num_workers: int | None = None,
                 pin_memory: bool = False) -> DataLoader:
    num_workers = default_num_workers() if num_workers is None else num_workers
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=_collate, pin_memory=pin_memory,
                      prefetch_factor=D.DECODE_PREFETCH_BATCHES if num_workers > 0 else None, persistent_workers=False)


def decode_bound(model) -> SizeBound | None:
    """The largest size *model* uses a photo at: each of its transforms (an ensemble's members') resizes it to fit
    (min_size, max_size). None for a model without torchvision's transform: the size it uses is not known, so
    photos are given to it whole."""
    transforms = _transforms(model)
    if not transforms or not all(hasattr(t, "min_size") and hasattr(t, "max_size") for t in transforms):
        return None
    return SizeBound(tuple((float(t.min_size[-1]), float(t.max_size)) for t in transforms))


def pixels_for_model(model, pixels: torch.Tensor, bound: SizeBound | None) -> torch.Tensor:
    """*pixels* (a decoded picture, uint8 CxHxW) as predict's decode workers give them to *model*: above *bound*'s
    size (decode_bound(model)), reduced by images.reduced_to; else *pixels* themselves (a picture at or below the
    size, or one too thin for the model at its own size: predict skips it, and the model finds nothing on it).
    The one reduction of evaluate (model_input_at_size), the service and predict_video, so that a picture has
    the detections predict counts on it whichever of them runs the model."""
    height, width = (int(side) for side in pixels.shape[-2:])
    if bound is None or bound.size(width, height) == (width, height) or too_thin(model, height, width):
        return pixels
    picture = Image.fromarray(pixels.permute(1, 2, 0).contiguous().cpu().numpy())
    return F.pil_to_tensor(reduced_to(picture, bound))


def model_input_at_size(model, image: torch.Tensor, bound: SizeBound | None, device) -> torch.Tensor:
    """*image* (float CxHxW, a decoded photo's 8-bit levels scaled to [0, 1], as VocDetectionDataset yields it), on
    *device*, as predict gives the photo to *model* (pixels_for_model on its 8-bit pixels, recovered exactly;
    *bound* read when the caller starts: a working size chosen on validation changes it between calls), so that
    evaluate, the validation choices and the estimators' rates see the detections predict counts. An image whose
    values are no 8-bit levels is no decoded photo (there is no predict input to match): given as it is."""
    height, width = (int(side) for side in image.shape[-2:])
    if bound is None or bound.size(width, height) == (width, height):  # no 8-bit copy of a photo kept as it is
        return image.to(device, non_blocking=True)
    pixels = F.to_dtype(image, torch.uint8, scale=True)
    reduced = pixels_for_model(model, pixels, bound)
    if reduced is pixels or not torch.equal(F.to_dtype(pixels, image.dtype, scale=True), image):
        return image.to(device, non_blocking=True)
    return to_model_input(reduced, device)


def rescaled_boxes(boxes: torch.Tensor, size: tuple[int, int], new_size: tuple[int, int]) -> torch.Tensor:
    """XYXY *boxes* in the pixels of an image of *size* (height, width), in those of the same picture at
    *new_size* (height, width), each axis scaled by its own ratio (as torchvision's transform maps boxes back);
    the same tensor when the sizes are equal."""
    if tuple(size) == tuple(new_size):
        return boxes
    (height, width), (new_height, new_width) = size, new_size
    factors = torch.tensor([new_width / width, new_height / height] * 2, dtype=boxes.dtype, device=boxes.device)
    return boxes * factors


def unflip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Boxes found on a horizontally flipped image, mapped back to the original."""
    unflipped = boxes.clone()
    unflipped[:, 0] = width - boxes[:, 2]
    unflipped[:, 2] = width - boxes[:, 0]
    return unflipped


def _transforms(model) -> list:
    """The resizing transforms *model* runs images through: its own, or each ensemble member's."""
    return [member.transform for member in getattr(model, "models", [model]) if hasattr(member, "transform")]


def shrunk_shorter_side(height: int, width: int, min_size: float, max_size: float) -> float | None:
    """The shorter side of an image of this shape after a detector's transform scales both sides by
    min(min_size / shorter, max_size / longer) and floors them, when that leaves no pixel row at all (a very thin
    image, 600x1 px at 512 px), which torchvision refuses for the whole batch; else None."""
    shorter, longer = min(height, width), max(height, width)
    shrunk = shorter * min(float(min_size) / shorter, float(max_size) / longer)
    return shrunk if int(shrunk) < 1 else None


def too_thin(model, height: int, width: int) -> str | None:
    """Why *model* cannot run on an image of this shape (:func:`shrunk_shorter_side`), or None."""
    for transform in _transforms(model):
        if not (hasattr(transform, "min_size") and hasattr(transform, "max_size")):
            continue  # not torchvision's transform: the size it resizes to is not known (decode_bound)
        shrunk = shrunk_shorter_side(height, width, transform.min_size[-1], transform.max_size)
        if shrunk is not None:
            return (f"{width}x{height} px is too thin for the detector: at its working size "
                    f"({int(transform.max_size)} px) the shorter side would shrink to {shrunk:.2g} px")
    return None


def _same_size_groups(images: list[torch.Tensor]) -> list[list[int]]:
    """Indices of *images* grouped by (height, width), in first-seen order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault((int(image.shape[-2]), int(image.shape[-1])), []).append(index)
    return list(groups.values())


def _no_detections() -> dict:
    return {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}


def max_detections(model) -> int:
    roi_heads = getattr(model, "roi_heads", None)
    return int(getattr(roi_heads, "detections_per_img", 100))


def fuse_boxes(members: list[dict], width: int, height: int, device, limit: int, iou_threshold: float = D.WBF_IOU,
               skip_score: float = 0.0) -> dict:
    """One image's boxes from several passes (models, or the plain and the flipped pass) fused per class with
    weighted box fusion (``ensemble_boxes.weighted_boxes_fusion``, Solovyev et al. 2021): boxes of one face
    overlapping more than *iou_threshold* are averaged, weighted by score, instead of one being kept and
    the rest dropped as NMS does. ``conf_type="avg"``: a fused box scores the mean of its cluster, scaled
    down when fewer passes found it (a face found by one pass in K scores about 1/K of its score). At
    most *limit* boxes, best first."""
    from ensemble_boxes import weighted_boxes_fusion

    scale = np.array([width, height, width, height], dtype=np.float64)
    boxes = [np.clip(m["boxes"].detach().cpu().double().numpy() / scale, 0.0, 1.0) for m in members]
    scores = [m["scores"].detach().cpu().double().numpy() for m in members]
    labels = [m["labels"].detach().cpu().numpy() for m in members]
    if sum(len(s) for s in scores) == 0:
        return {"boxes": torch.zeros((0, 4), device=device),
                "labels": torch.zeros(0, dtype=torch.int64, device=device), "scores": torch.zeros(0, device=device)}
    fused_boxes, fused_scores, fused_labels = weighted_boxes_fusion(
        boxes, scores, labels, iou_thr=iou_threshold, skip_box_thr=skip_score, conf_type="avg")
    order = np.argsort(-fused_scores, kind="stable")[:limit]
    return {"boxes": torch.as_tensor(fused_boxes[order] * scale, dtype=torch.float32, device=device),
            "labels": torch.as_tensor(fused_labels[order].astype(np.int64), device=device),
            "scores": torch.as_tensor(fused_scores[order], dtype=torch.float32, device=device)}


class VotingRoIHeads(RoIHeads):
    """torchvision's RoI heads with box voting (Gidaris and Komodakis 2015, section 5): NMS keeps the same boxes with
    the same scores and labels, and each kept box moves to the score-weighted mean of every box of its class that
    overlapped it by at least ``vote_iou`` before NMS (itself among them). The box head's neighbouring proposals
    place a face's edges better together than the best-scoring one alone: on the real data's validation images the
    60-minute model's mAP went from 0.418 to 0.430 and mAP@0.75 from 0.452 to 0.491 (on its test split mAP stayed
    0.437 and mAR@100 went from 0.555 to 0.563: bench/RESULTS.md, "Box voting"). On the
    synthetic sample, whose boxes are drawn exactly, it lowered mAP, so train chooses it on the validation images
    (utils/detection/inference_size.py) and ``set_box_voting`` applies the choice. Under flip TTA (``detect``) the
    voted boxes of the two passes fuse into other clusters than NMS's alone, so there the fused scores, and the
    counts at a threshold, can differ too (9 of 20 real validation images' scores did, 2 counted a face fewer)."""

    vote_iou = D.BOX_VOTE_IOU

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        # torchvision's own post-processing (decode, clip, background and faint boxes dropped), run with NMS off
        # and no cap on a view of these heads: a model that threads share is never changed mid-call
        unsuppressed = SimpleNamespace(box_coder=self.box_coder, score_thresh=self.score_thresh, nms_thresh=1.0,
                                       detections_per_img=None)
        every = RoIHeads.postprocess_detections(unsuppressed, class_logits, box_regression, proposals, image_shapes)
        kept_boxes, kept_scores, kept_labels = [], [], []
        for boxes, scores, labels in zip(*every):
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            voters = (box_iou(boxes[keep], boxes) >= self.vote_iou) & (labels[keep, None] == labels[None, :])
            weights = voters * scores  # a kept box votes for itself, so no row sums to 0
            kept_boxes.append(weights @ boxes / weights.sum(dim=1, keepdim=True))
            kept_scores.append(scores[keep])
            kept_labels.append(labels[keep])
        return kept_boxes, kept_scores, kept_labels


def set_box_voting(model, vote_iou: float | None) -> None:
    """Run *model* with box voting at *vote_iou* (VotingRoIHeads), or with torchvision's NMS alone (None).

    Heads whose class changes only training (``training_only = True``: recipe.GIoURoIHeads, the GIoU box loss)
    are replaced too: the choice is made on a trained model, whose inference is torchvision's either way."""
    heads = model.roi_heads
    if type(heads) not in (RoIHeads, VotingRoIHeads) and not getattr(type(heads), "training_only", False):
        raise TypeError(f"box voting needs torchvision's RoIHeads, not {type(heads).__name__}")
    # FasterRCNN builds its RoIHeads itself; swapping the class keeps its modules, settings and state dict
    heads.__class__ = RoIHeads if vote_iou is None else VotingRoIHeads
    if vote_iou is None:
        heads.__dict__.pop("vote_iou", None)
    else:
        heads.vote_iou = float(vote_iou)


def box_voting(model) -> float | None:
    """The IoU *model*'s boxes vote at, None without box voting."""
    heads = getattr(model, "roi_heads", None)
    return heads.vote_iou if isinstance(heads, VotingRoIHeads) else None


@torch.inference_mode()
def detect(model, images: list[torch.Tensor], tta: bool = False, score_threshold: float = 0.0) -> list[dict]:
    """Run *model* on float images already on its device; returns CPU dicts of boxes, labels, scores.

    With *tta*, each image is also run flipped left-right (in the same batch); both passes' boxes, in
    the original frame, are fused with weighted box fusion (:func:`fuse_boxes`), keeping the model's
    detections-per-image cap: on the real data's validation split that raised a 60-minute model's
    mAP from 0.357 to 0.372, where merging the passes with NMS gave 0.363 (bench/RESULTS.md).
    Detections below *score_threshold* are dropped after fusing.

    Images of different sizes run in separate calls: torchvision pads a batch to its largest image, and the
    first stage then ranks proposals over the padding too, so an image's boxes and scores would depend on
    which photos shared its batch (and a figure merged from shards on how the photos were sharded). An image
    too thin for the model's transform (:func:`too_thin`) gets no detections instead of failing the batch.
    """
    if not images:
        return []
    groups = _same_size_groups(images)
    if len(groups) > 1:
        results: list[dict] = [{} for _ in images]
        for indices in groups:
            for index, result in zip(indices, detect(model, [images[i] for i in indices], tta, score_threshold)):
                results[index] = result
        return results
    if too_thin(model, int(images[0].shape[-2]), int(images[0].shape[-1])):
        return [_no_detections() for _ in images]
    if tta and hasattr(model, "detect_with_flips"):
        # An ensemble (utils.detection.ensemble) fuses the flipped passes with its members'.
        outputs, tta = model.detect_with_flips(images), False
    else:
        batch = list(images)
        if tta:
            batch += [torch.flip(image, dims=[-1]) for image in images]
        outputs = model(batch)
    results = []
    for i, image in enumerate(images):
        out = {k: outputs[i][k].detach() for k in ("boxes", "labels", "scores")}
        if tta:
            flipped = outputs[len(images) + i]
            height, width = int(image.shape[-2]), int(image.shape[-1])
            out = fuse_boxes([out, {**flipped, "boxes": unflip_boxes(flipped["boxes"].detach(), width)}], width,
                             height, image.device, limit=max_detections(model))
        results.append({k: v.cpu() for k, v in above(out, score_threshold).items()})
    return results


def detection_floor(score_threshold: float) -> float:
    """The lowest score a job keeps (D.DETECTION_FLOOR: the probabilistic counts' floor, and the service's boxes),
    or *score_threshold* when lower, so that every job counts the detections at a threshold under the floor
    (flip TTA's and an ensemble's fused boxes can score under it) as predict does."""
    return min(D.DETECTION_FLOOR, score_threshold)


def above(out: dict, floor: float) -> dict:
    """*out* (boxes, labels, scores) less its detections scoring under *floor*."""
    keep = out["scores"] >= floor
    return {key: value[keep] for key, value in out.items()}


def to_model_input(image_uint8: torch.Tensor, device) -> torch.Tensor:
    return F.to_dtype(image_uint8.to(device, non_blocking=True), torch.float32, scale=True)


def detect_files(model, items, device, batch_size: int = D.INFERENCE_BATCH_SIZE, score_threshold: float = 0.0,
                 tta: bool = False, num_workers: int | None = None, keep_images=False, image_side: int | None = None):
    """Yield a Detections or a Skipped for every item, in input order.

    Files are decoded by DataLoader workers ahead of the model, each at most at the size the model uses it at
    (decode_bound). *keep_images* (True: every item; else the names of those to keep) attaches a uint8 copy of
    the photo to those results (for drawing annotated copies), at most *image_side* px a side (None: its own
    size); the model's input is made as for a photo not kept, so its detections do not depend on keeping it.
    """
    device = torch.device(device)
    model.eval()
    keep = range(len(items)) if keep_images is True else [i for i, item in enumerate(items)
                                                           if keep_images and item.name in keep_images]
    copy_bound = SizeBound(((float(image_side), float(image_side)),)) if image_side is not None else None
    loader = image_loader(ImageFileDataset(items, decode_bound(model), keep, copy_bound), batch_size=batch_size,
                          num_workers=num_workers, pin_memory=device.type == "cuda")
    for batch in loader:
        # too thin at the photo's own size, as its reduced copy may not look (its shorter side rounded up)
        batch = [decoded._replace(problem=decoded.problem or too_thin(model, *decoded.size[::-1]))
                 if decoded.image is not None else decoded for decoded in batch]
        inputs = [to_model_input(decoded.image, device) for decoded in batch if decoded.problem is None]
        outputs = iter(detect(model, inputs, tta=tta, score_threshold=score_threshold))
        for decoded in batch:
            item = loader.dataset.items[decoded.index]
            if decoded.problem is not None:
                yield Skipped(item, decoded.problem, decoded.sha256)
                continue
            out = next(outputs)
            width, height = decoded.size
            boxes = rescaled_boxes(out["boxes"], tuple(decoded.image.shape[-2:]), (height, width))
            yield Detections(item, width, height, boxes, out["labels"], out["scores"], decoded.copy, decoded.sha256,
                             decoded.image if decoded.copy is not None else None)
