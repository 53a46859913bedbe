"""Augmentation of the training set with torchvision.transforms.v2 (boxes move with the pixels).

Each input is written once as it is (``train_<stem>``: the photo's own file where
preprocess --format source would keep it, else lossless PNG; cleaned annotation) and
then ``--copies`` times transformed (``aug<k>_<stem>``, k from 1),
plus ``--rare-factor`` further copies when it contains the rare class
``mask_weared_incorrect``. A copy is: horizontal flip, scale jitter (zoom out onto a
filled canvas or an IoU-constrained crop, then back to the original longest side),
colour jitter and the predecessor's Gaussian pixel noise, followed by
SanitizeBoundingBoxes, which drops boxes that became degenerate.

Every copy draws from torch's RNG seeded by (seed, stem, k), so the output is
reproducible and a file's copies do not depend on which other files are in the set.
A copy that lost all its boxes is redrawn with the next attempt number; if every
attempt loses them, the copy is left out and listed in the report.
"""

from __future__ import annotations

import contextlib
import time
import zlib
from pathlib import Path

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2 as T
from tqdm import tqdm

from .. import defaults as D
from ..classes import LABEL_OF, NAME_OF, NO_LABEL_MAP, RARE_CLASS, LabelMap
from ..errors import InputError
from ..stop import check_stop
from .box_transforms import boxes_of, objects_from
from .preprocess import (SOURCE, STOPPED, JobLog, NothingProcessedError, check_output_dir, default_report_path,
                         display_paths, finish_report, load_pair, open_inputs, output_folder, write_pair, write_photo)
from .voc import VocAnnotation

ATTEMPTS_PER_COPY = D.AUGMENT_ATTEMPTS
# Grey fill for zoomed-out borders: neutral, and unlike any face or mask colour.
ZOOM_OUT_FILL = (124, 116, 104)


def build_transform(noise_std: float = D.NOISE_STD, flip_p: float = D.AUGMENT_FLIP,
                    zoom_out_p: float = D.AUGMENT_ZOOM_OUT, crop_p: float = D.AUGMENT_CROP,
                    colour_p: float = D.AUGMENT_COLOUR) -> T.Compose:
    """The per-copy pipeline over (tv_tensors.Image uint8, {"boxes", "labels"}).

    *noise_std* is in 8-bit pixel units (0-255), as the predecessor's noise was.
    """
    steps = [
        T.RandomHorizontalFlip(p=flip_p),
        T.RandomZoomOut(fill={tv_tensors.Image: ZOOM_OUT_FILL, "others": 0}, side_range=(1.0, 1.6), p=zoom_out_p),
        # IoU crop keeps objects whose centres stay inside; Sanitize below drops the rest.
        T.RandomApply([T.RandomIoUCrop(min_scale=0.5, max_scale=1.0, min_aspect_ratio=0.6, max_aspect_ratio=1.6)],
                      p=crop_p),
        T.RandomApply([T.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03)], p=colour_p),
    ]
    if noise_std > 0:
        steps += [T.ToDtype(torch.float32, scale=True), T.GaussianNoise(mean=0.0, sigma=noise_std / 255.0, clip=True),
                  T.ToDtype(torch.uint8, scale=True)]
    steps.append(T.SanitizeBoundingBoxes(min_size=2.0))
    return T.Compose(steps)


def copy_seed(seed: int, stem: str, copy_index: int, attempt: int = 0) -> int:
    """A 63-bit seed for one copy, independent of the other files in the set."""
    return (int(seed) * 1_000_003 + zlib.crc32(f"{stem}/{copy_index}/{attempt}".encode())) & ((1 << 63) - 1)


def augment_copy(image: Image.Image, ann: VocAnnotation, transform, seed: int):
    """Apply *transform* under a fixed torch seed; return (PIL image, VocAnnotation). Global RNG untouched."""
    pixels = tv_tensors.Image(T.functional.pil_to_tensor(image))
    target = {"boxes": boxes_of(ann), "labels": torch.tensor([LABEL_OF[o.name] for o in ann.objects],
                                                             dtype=torch.int64)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pixels, target = transform(pixels, target)
        # Back to the input's longest side: crops are enlarged, zoom-outs shrunk (scale jitter).
        longest = max(image.size)
        if max(pixels.shape[-2:]) != longest:
            pixels, target = T.Resize(size=None, max_size=longest, antialias=True)(pixels, target)
    boxes = T.functional.clamp_bounding_boxes(target["boxes"])
    names = [NAME_OF[int(label)] for label in target["labels"]]
    out = T.functional.to_pil_image(pixels.as_subclass(torch.Tensor))
    objects = objects_from(boxes, names)
    return out, VocAnnotation(filename=ann.filename, width=out.width, height=out.height, depth=3, objects=objects,
                              folder=ann.folder)


@contextlib.contextmanager
def torch_threads(count: int):
    """Run with *count* intra-op threads, restoring the previous setting.

    Each copy is a handful of ops on one small image: with several threads the
    synchronisation costs more than the work (on a busy 2-core machine a 160x120
    multiply took 10 ms with 2 threads and 10 us with 1), and the workflow runs
    jobs side by side anyway.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def augment_set(images, annotations, copies: int, rare_factor: int = 0, noise_std: float = D.NOISE_STD,
                seed: int = D.SEED, output_dir=None, output_tar=None, split_csv=None, split=None,
                quality: int = D.JPEG_QUALITY, report=None,
                progress: bool = True, original_prefix: str = "train_", label_map: LabelMap = NO_LABEL_MAP) -> dict:
    """Write originals and augmented copies of one set; return the report (also written to *report*).

    Object names are read through *label_map* and written as the class names.
    """
    if copies < 0 or rare_factor < 0:
        raise InputError(f"--copies and --rare-factor must not be negative, got {copies} and {rare_factor}")
    if noise_std < 0:
        raise InputError(f"--noise-std must not be negative, got {noise_std}")
    check_output_dir(output_dir, images, annotations)
    started = time.perf_counter()
    report = Path(report) if report else default_report_path(output_dir, output_tar)
    params = {"images": images, "annotations": annotations, "split_csv": split_csv, "split": split,
              "copies": copies, "rare_factor": rare_factor, "noise_std": noise_std, "seed": seed,
              "quality": quality, "output_dir": output_dir, "output_tar": output_tar, "label_map": str(label_map)}
    transform = build_transform(noise_std)
    log = JobLog()
    log.extra = {"originals": 0, "copies": 0, "rare_images": 0, "rare_extra_copies": 0, "copies_redrawn": [],
                 "copies_without_boxes": [], "objects_removed_by_transforms": 0}
    used_inputs, produced = [], set()
    with open_inputs(images, annotations, split_csv, split, log) as pairs, torch_threads(1):
        with output_folder(output_dir, output_tar, job="augment") as folder:
            for pair in tqdm(pairs, desc="augment", unit="img", disable=not progress):
                check_stop(STOPPED)
                if pair.stem in produced:
                    log.skip(pair.image.name, f"another input already produced {original_prefix}{pair.stem} "
                                              "(two images with the same stem)")
                    continue
                loaded = load_pair(pair, log, label_map)
                if loaded is None:
                    continue
                produced.add(pair.stem)
                image, ann = loaded.image, loaded.annotation
                # the photo as it is where it can be (write_photo): a k-fold's held-out fold is cut from these
                log.written += write_photo(folder, f"{original_prefix}{pair.stem}", loaded, image, ann, SOURCE)
                log.extra["originals"] += 1
                log.processed += 1
                used_inputs += [pair.image, pair.annotation]
                rare = any(o.name == RARE_CLASS for o in ann.objects)
                log.extra["rare_images"] += int(rare)
                n_copies = copies + (rare_factor if rare else 0)
                for k in range(1, n_copies + 1):
                    name = f"aug{k}_{pair.stem}"
                    for attempt in range(ATTEMPTS_PER_COPY):
                        out, out_ann = augment_copy(image, ann, transform, copy_seed(seed, pair.stem, k, attempt))
                        if out_ann.objects or not ann.objects:
                            break
                        if attempt + 1 < ATTEMPTS_PER_COPY:
                            log.extra["copies_redrawn"].append(
                                {"file": name, "problem": f"attempt {attempt} lost all {len(ann.objects)} boxes, "
                                                          "redrawn"})
                    else:
                        log.extra["copies_without_boxes"].append(
                            {"file": name, "problem": f"all {ATTEMPTS_PER_COPY} attempts lost every box; "
                                                      "copy left out"})
                        continue
                    log.extra["objects_removed_by_transforms"] += len(ann.objects) - len(out_ann.objects)
                    log.written += write_pair(folder, name, out, out_ann, "jpg", quality)
                    log.extra["copies"] += 1
                    if k > copies:
                        log.extra["rare_extra_copies"] += 1
            if log.processed == 0:
                finish_report(log, "augment", params, used_inputs, report, started)
                raise NothingProcessedError(f"{display_paths(images)}: no image could be processed "
                                            f"({len(log.skipped)} skipped; see {report})")
        return finish_report(log, "augment", params, used_inputs, report, started)
