"""Running a detector on image files: decoding in DataLoader workers, batching, flip TTA.

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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import batched_nms
from torchvision.transforms.v2 import functional as F

from ..data.images import ImageError, load_rgb

# Boxes from the plain and the flipped pass that overlap more than this are one face;
# torchvision's Faster R-CNN uses the same value for its own per-class NMS.
TTA_NMS_IOU = 0.5


@dataclass
class ImageItem:
    """One input file: the name shown in outputs, the path read, and the folder it sits in below the
    folder or archive given ("" at its top or when the file was named itself): compliance per folder."""

    name: str
    path: Path
    folder: str = ""


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


@dataclass
class Skipped:
    item: ImageItem
    reason: str


def default_num_workers() -> int:
    """Decoding workers: a share of the CPUs, leaving the rest to the model's own threads."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cpus // 2))


class ImageFileDataset(Dataset):
    """Items are (index, uint8 CxHxW tensor or None, problem or None)."""

    def __init__(self, items: list[ImageItem]):
        self.items = list(items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        item = self.items[index]
        try:
            pil = load_rgb(item.path)
        except ImageError as exc:
            return index, None, exc.problem
        return index, F.pil_to_tensor(pil), None


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


def max_detections(model) -> int:
    roi_heads = getattr(model, "roi_heads", None)
    return int(getattr(roi_heads, "detections_per_img", 100))


@torch.inference_mode()
def detect(model, images: list[torch.Tensor], tta: bool = False, score_threshold: float = 0.0) -> list[dict]:
    """Run *model* on float images already on its device; returns CPU dicts of boxes, labels, scores.

    With *tta*, each image is also run flipped left-right (in the same batch); both
    sets of boxes are mapped to the original frame and merged with per-class NMS
    (torchvision.ops.batched_nms at IoU 0.5), keeping the model's detections-per-image cap.
    Detections below *score_threshold* are dropped after merging.
    """
    if not images:
        return []
    if tta and hasattr(model, "detect_with_flips"):
        # An ensemble (utils.detection.ensemble) fuses the flipped passes with its own box fusion.
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
            width = image.shape[-1]
            boxes = torch.cat([out["boxes"], unflip_boxes(flipped["boxes"].detach(), width)])
            scores = torch.cat([out["scores"], flipped["scores"].detach()])
            labels = torch.cat([out["labels"], flipped["labels"].detach()])
            keep = batched_nms(boxes, scores, labels, TTA_NMS_IOU)[: max_detections(model)]
            out = {"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]}
        keep = out["scores"] >= score_threshold
        results.append({k: v[keep].cpu() for k, v in out.items()})
    return results


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
        good = [(index, image) for index, image, problem in batch if problem is None]
        inputs = [to_model_input(image, device) for _, image in good]
        outputs = iter(detect(model, inputs, tta=tta, score_threshold=score_threshold))
        for index, image, problem in batch:
            item = loader.dataset.items[index]
            if problem is not None:
                yield Skipped(item, problem)
                continue
            out = next(outputs)
            yield Detections(item, int(image.shape[-1]), int(image.shape[-2]), out["boxes"], out["labels"],
                             out["scores"], image if keep_images else None)
