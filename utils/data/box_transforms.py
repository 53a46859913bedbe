"""Boxes as tv_tensors, so that torchvision.transforms.v2 moves them with the pixels.

The one part of preprocessing and augmentation that needs torch; utils.data.preprocess imports it only
when a photo is shrunk (--max-size), so that a set kept at its own size is written without torch.
"""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2 as T

from .voc import VocAnnotation, VocObject


def boxes_of(ann: VocAnnotation) -> tv_tensors.BoundingBoxes:
    data = torch.tensor([o.box for o in ann.objects], dtype=torch.float32).reshape(-1, 4)
    return tv_tensors.BoundingBoxes(data, format="XYXY", canvas_size=(ann.height, ann.width))


def objects_from(boxes, names, template: list[VocObject] | None = None) -> list[VocObject]:
    """VocObjects from transformed boxes; coordinates rounded to 0.01 px as written to XML."""
    objects = []
    for index, (box, name) in enumerate(zip(boxes.tolist(), names)):
        base = template[index] if template else None
        coords = [round(float(v), 2) for v in box]
        objects.append(VocObject(name, *coords, difficult=base.difficult if base else 0,
                                 truncated=base.truncated if base else 0,
                                 pose=base.pose if base else "Unspecified"))
    return objects


def resize_longest_side(image, ann: VocAnnotation, max_size: int | None):
    """Cap the longest side at *max_size* (never enlarge); boxes follow through transforms.v2.Resize."""
    if not max_size or max(image.size) <= max_size:
        return image, ann
    boxes = boxes_of(ann)
    image, boxes = T.Resize(size=None, max_size=int(max_size), antialias=True)(image, boxes)
    boxes = T.functional.clamp_bounding_boxes(boxes)
    objects = objects_from(boxes, [o.name for o in ann.objects], ann.objects)
    return image, VocAnnotation(filename=ann.filename, width=image.width, height=image.height, depth=3,
                                objects=objects, folder=ann.folder)
