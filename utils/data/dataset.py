"""A torch Dataset of VOC pairs returning torchvision detection targets."""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2 as T

from ..classes import CLASSES, LABEL_OF, NO_LABEL_MAP, LabelMap
from .images import load_rgb
from .voc import clean_objects, parse_voc_for_image


class VocDetectionDataset(torch.utils.data.Dataset):
    """Items are (image, target) as torchvision's detection models expect.

    image: float32 CxHxW in [0, 1]; target: boxes (tv_tensors.BoundingBoxes, XYXY,
    absolute pixels), labels (int64, 1..3), image_id, area, iscrowd. *transforms*
    receive (tv_tensors.Image uint8, target) so that torchvision.transforms.v2
    moves the boxes with the pixels. Objects dropped by cleaning (unknown class,
    out of bounds, zero area) are recorded in ``object_problems`` per file. Object names
    are read through *label_map* (another data set's names as classes).
    """

    def __init__(self, pairs, transforms=None, label_map: LabelMap = NO_LABEL_MAP):
        self.pairs = list(pairs)
        self.transforms = transforms
        self.label_map = label_map
        self.object_problems: dict[str, list[str]] = {}

    def __len__(self):
        return len(self.pairs)

    def load_target(self, index, width, height):
        pair = self.pairs[index]
        ann, _ = parse_voc_for_image(pair.annotation, pair.image, (width, height), self.label_map)
        objects, problems = clean_objects(ann, width, height, known_classes=CLASSES)
        if problems:
            self.object_problems[str(pair.annotation)] = problems
        boxes = torch.tensor([o.box for o in objects], dtype=torch.float32).reshape(-1, 4)
        return {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": torch.tensor([LABEL_OF[o.name] for o in objects], dtype=torch.int64),
            "image_id": index,
            "iscrowd": torch.zeros(len(objects), dtype=torch.int64),
        }

    def __getitem__(self, index):
        pair = self.pairs[index]
        pil = load_rgb(pair.image)
        image = tv_tensors.Image(T.functional.pil_to_tensor(pil))
        target = self.load_target(index, pil.width, pil.height)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        target["boxes"] = T.functional.clamp_bounding_boxes(target["boxes"])
        boxes = target["boxes"]
        target["area"] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        image = T.functional.to_dtype(image, torch.float32, scale=True).as_subclass(torch.Tensor)
        return image, target


def collate(batch):
    """Detection batches are tuples of lists: images differ in size."""
    return tuple(zip(*batch))
