"""Running a detector on image files: decoding in DataLoader workers, batching, flip TTA, box fusion.

The model is a torchvision detection model in eval mode: it takes a list of float
CxHxW images in [0, 1] of any size (its own transform resizes them) and returns one
dict of boxes, labels and scores per image, in the input image's pixel coordinates.

Decoding happens in DataLoader worker processes, which prefetch the next batches
while the model runs on the current one; an undecodable file becomes a "skipped"
item with its reason instead of an exception, so one bad file never stops a job.
Images travel from the workers as uint8 tensors (4x less to copy than float) and
are converted to float on the device.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as F

from .. import defaults as D
from ..data.images import ImageError, load_rgb_hashed, load_rgb_span


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
    """Detections for one image, in its pixel coordinates (boxes XYXY float, labels int64, scores float)."""

    item: ImageItem
    width: int
    height: int
    boxes: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor
    image: torch.Tensor | None = field(default=None, repr=False)  # uint8 CxHxW, kept when asked for (annotation)
    sha256: str | None = None  # of the file, from the read that decoded it (predict's run record)


@dataclass
class Skipped:
    item: ImageItem
    reason: str
    sha256: str | None = None  # of the file when it could be read: an input all the same


def default_num_workers() -> int:
    """Decoding workers: a share of the CPUs, leaving the rest to the model's own threads."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cpus // 2))


class ImageFileDataset(Dataset):
    """Items are (index, uint8 CxHxW tensor or None, problem or None, the file's sha256 or None)."""

    def __init__(self, items: list[ImageItem]):
        self.items = list(items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        item = self.items[index]
        if item.member is not None:  # the run record hashes its archive
            try:
                return index, F.pil_to_tensor(load_rgb_span(item.path, item.member.offset, item.member.size,
                                                            item.name)), None, None
            except ImageError as exc:
                return index, None, exc.problem, None
        pil, sha256, error = load_rgb_hashed(item.path)
        if error is not None:
            return index, None, error.problem, sha256
        return index, F.pil_to_tensor(pil), None, sha256


def _collate(batch):
    return list(batch)


def image_loader(items, batch_size: int = 4, num_workers: int | None = None, pin_memory: bool = False) -> DataLoader:
    num_workers = default_num_workers() if num_workers is None else num_workers
    return DataLoader(ImageFileDataset(items), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=_collate, pin_memory=pin_memory,
                      prefetch_factor=4 if num_workers > 0 else None, persistent_workers=False)


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


def detect_files(model, items, device, batch_size: int = 4, score_threshold: float = 0.0, tta: bool = False,
                 num_workers: int | None = None, keep_images: bool = False):
    """Yield a Detections or a Skipped for every item, in input order.

    Files are decoded by DataLoader workers ahead of the model. *keep_images* attaches
    the decoded uint8 image to each result (for drawing annotated copies).
    """
    device = torch.device(device)
    model.eval()
    loader = image_loader(items, batch_size=batch_size, num_workers=num_workers,
                          pin_memory=device.type == "cuda")
    for batch in loader:
        batch = [(index, image, problem or (image is not None and too_thin(model, *image.shape[-2:])) or None,
                  sha256) for index, image, problem, sha256 in batch]
        good = [(index, image) for index, image, problem, _ in batch if problem is None]
        inputs = [to_model_input(image, device) for _, image in good]
        outputs = iter(detect(model, inputs, tta=tta, score_threshold=score_threshold))
        for index, image, problem, sha256 in batch:
            item = loader.dataset.items[index]
            if problem is not None:
                yield Skipped(item, problem, sha256)
                continue
            out = next(outputs)
            yield Detections(item, int(image.shape[-1]), int(image.shape[-2]), out["boxes"], out["labels"],
                             out["scores"], image if keep_images else None, sha256)
