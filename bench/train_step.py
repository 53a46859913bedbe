#!/usr/bin/env python3
"""Training throughput: the training loop fed by its DataLoader against pure forward+backward, in images/s.

Both measured in one run, on the same images, through the same function
(utils.detection.engine.train_one_epoch: forward, loss, backward, gradient clipping,
optimizer and scheduler step):
  pure        batches already decoded, converted and held as tensors in memory
              (what the model and hardware can do)
  end-to-end  the training DataLoader of utils.detection.training (decoding JPEGs, parsing VOC XML,
              random horizontal flip, collation) with --workers processes
The ratio end-to-end / pure is the share of the model's training speed the data
pipeline keeps (goal >= 0.95). --roi-batch-sizes times the pure path again at each
number of proposals per image in the box head's loss (bin/train.py --roi-batch-size), as
a ratio to the first, and --backbones times it for each backbone (the first stage of issue
#21 against today's), as a ratio to the first. After a warm-up pass the two paths are timed
alternately --repeats times and the fastest pass of each counts, so that load
from other processes on a shared machine hits both alike. As a cross-check that
does not depend on such load, the share of the end-to-end wall time spent waiting
for the next batch is reported too.

Data: the first --limit images of the real data set (--data), else synthetic sample
data (utils.data.sample_data) when --sample or when the real data is absent (said so).
"""

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "face-mask"


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help=f"folder with images/ and annotations/ (default: {DEFAULT_DATA})")
    p.add_argument("--sample", action="store_true", help="use synthetic sample data instead of --data")
    p.add_argument("--limit", type=int, default=24, help="images per pass (default: 24)")
    p.add_argument("--image-size", type=int, default=512, help="model input size (default: 512)")
    p.add_argument("--batch-size", type=int, default=4, help="images per batch (default: 4)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                   help="DataLoader worker counts to time, each against the same pure figure; bin/train.py uses "
                        "0 on a CPU (default: 0 2)")
    p.add_argument("--roi-batch-sizes", type=int, nargs="*", default=[256, 128],
                   help="proposals per image in the box loss (bin/train.py --roi-batch-size) to time on the pure "
                        "path, alternating; each is reported against the first; none: skip (default: 256 128)")
    p.add_argument("--backbones", nargs="*", default=["mobilenet_v2_fpn", "retinaface_mnet025"],
                   help="time the pure path of each backbone (pretrained as bin/train.py builds it), alternating, "
                        "as a ratio to the first (default: mobilenet_v2_fpn retinaface_mnet025)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed passes per path, alternating; the fastest counts (default: 3)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="(default: auto)")
    p.add_argument("--output", type=Path, default=None, help="also write the figures as JSON here")
    return p


class TimedLoader:
    """Iterates a loader and adds up the time spent waiting for each batch."""

    def __init__(self, loader):
        self.loader = loader
        self.wait_s = 0.0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        iterator = iter(self.loader)
        while True:
            started = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                self.wait_s += time.perf_counter() - started
                return
            self.wait_s += time.perf_counter() - started
            yield batch


def pick_pairs(args, stack):
    from utils.data.pairs import pair_folders

    if not args.sample and (args.data / "images").is_dir():
        pairs = pair_folders(args.data / "images", args.data / "annotations").pairs[: args.limit]
        return pairs, f"real data {args.data} (first {len(pairs)} pairs)"
    from utils.data.sample_data import make_sample_dataset

    reason = "--sample" if args.sample else f"{args.data} is absent"
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_train_")))
    make_sample_dataset(folder, num_images=args.limit, seed=7)
    pairs = pair_folders(folder / "images", folder / "annotations").pairs
    return pairs, f"synthetic sample data, {len(pairs)} images ({reason})"


def main(args) -> int:
    import contextlib
    import logging

    import torch

    from utils import defaults as D
    from utils.detection.device import resolve_device
    from utils.detection.engine import train_one_epoch
    from utils.detection.optim import build_optimizer
    from utils.detection.model import build_model
    from utils.detection.params import MIN_ROI_BATCH_SIZE
    from utils.detection.recipe import set_roi_batch_size
    from utils.detection.recipe import make_loader

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if any(size < MIN_ROI_BATCH_SIZE for size in args.roi_batch_sizes):
        print(f"train_step: --roi-batch-sizes must be at least {MIN_ROI_BATCH_SIZE} each, got {args.roi_batch_sizes}")
        return 2
    device = resolve_device(args.device)
    with contextlib.ExitStack() as stack:
        pairs, source = pick_pairs(args, stack)
        if not pairs:
            print(f"train_step: skipped: no image/annotation pairs in {args.data}")
            return 0
        print(f"train_step: {source}; image size {args.image_size}, batch {args.batch_size}, device {device}, "
              f"{torch.get_num_threads()} torch threads")
        model = build_model("mobilenet_v2_fpn", weights="imagenet", image_size=args.image_size).to(device)
        set_roi_batch_size(model, D.ROI_BATCH_SIZE)  # what bin/train.py trains with
        optimizer = build_optimizer(model, "sgd", lr=0.002, momentum=0.9, weight_decay=1e-4)

        # The pure path: the same images, decoded once by the same dataset, held as tensors.
        preload = make_loader(pairs, args.batch_size, workers=0, shuffle=False)
        batches = [(tuple(images), tuple(targets)) for images, targets in preload]
        if device.type == "cuda":
            batches = [(tuple(i.to(device) for i in images), targets) for images, targets in batches]
        loaders = {w: make_loader(pairs, args.batch_size, workers=w, shuffle=True, hflip=0.5,
                                  generator=torch.Generator().manual_seed(0), pin_memory=device.type == "cuda")
                   for w in args.workers}

        def timed(source_batches, timed_loader=None, model=model, optimizer=optimizer):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            stats = train_one_epoch(model, optimizer, timed_loader or source_batches, device, epoch=0,
                                    clip_grad=10.0, progress=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return stats["images"] / (time.perf_counter() - started)

        timed(batches[:1])  # warm-up: first-call allocations and kernel selection
        pure, e2e, wait_share = [], {w: [] for w in loaders}, {w: [] for w in loaders}
        for _ in range(args.repeats):
            pure.append(timed(batches))
            for workers, loader in loaders.items():
                timed_loader = TimedLoader(loader)
                started = time.perf_counter()
                e2e[workers].append(timed(None, timed_loader))
                wait_share[workers].append(timed_loader.wait_s / (time.perf_counter() - started))
        # The box head's share of a step: the pure path at each proposal count, alternating.
        by_roi = {size: [] for size in args.roi_batch_sizes}
        for _ in range(args.repeats):
            for size in by_roi:
                set_roi_batch_size(model, size)
                by_roi[size].append(timed(batches))
        # Each backbone's pure path, alternating, with the project's RoI default.
        detectors = {}
        for name in args.backbones:
            detector = build_model(name, weights=D.WEIGHTS, image_size=args.image_size).to(device)
            set_roi_batch_size(detector, D.ROI_BATCH_SIZE)
            detectors[name] = (detector, build_optimizer(detector, "sgd", lr=0.002, momentum=0.9, weight_decay=1e-4))
            timed(batches[:1], None, *detectors[name])
        by_backbone = {name: [] for name in detectors}
        for _ in range(args.repeats if detectors else 0):
            for name, (detector, detector_optimizer) in detectors.items():
                by_backbone[name].append(timed(batches, None, detector, detector_optimizer))

    best_pure = max(pure)
    result = {"source": source, "device": str(device), "host": platform.node(), "images": len(pairs),
              "image_size": args.image_size, "batch_size": args.batch_size, "repeats": args.repeats,
              "pure_images_per_s": best_pure, "pure_all": pure, "end_to_end": {}}
    print(f"pure forward+backward (tensors in memory): {best_pure:.3f} images/s  (passes: "
          f"{', '.join(f'{v:.3f}' for v in pure)})")
    for workers in loaders:
        best = max(e2e[workers])
        ratio = best / best_pure
        share = min(wait_share[workers])
        result["end_to_end"][str(workers)] = {"images_per_s": best, "all": e2e[workers], "ratio": ratio,
                                              "data_wait_share": share}
        verdict = "meets" if ratio >= 0.95 else "misses"
        print(f"end-to-end, {workers} workers: {best:.3f} images/s  (passes: "
              f"{', '.join(f'{v:.3f}' for v in e2e[workers])}); ratio {ratio:.3f} ({verdict} the 0.95 goal); "
              f"time waiting for data {100 * share:.1f}%")
    if by_roi:
        first = args.roi_batch_sizes[0]
        result["roi_batch_sizes"] = {str(size): {"images_per_s": max(v), "all": v,
                                                 "ratio_to_first": max(v) / max(by_roi[first])}
                                     for size, v in by_roi.items()}
        for size, values in by_roi.items():
            print(f"pure, {size} RoIs per image in the box loss: {max(values):.3f} images/s  (passes: "
                  f"{', '.join(f'{v:.3f}' for v in values)}); {max(values) / max(by_roi[first]):.2f}x the "
                  f"speed at {first}")
    if by_backbone:
        first = next(iter(by_backbone))
        result["backbones"] = {name: {"images_per_s": max(v), "all": v,
                                      "ratio_to_first": max(v) / max(by_backbone[first]),
                                      "built_as": detectors[name][0].architecture["backbone"]}
                               for name, v in by_backbone.items()}
        for name, values in by_backbone.items():
            print(f"pure, backbone {name} (built as {detectors[name][0].architecture['backbone']}): "
                  f"{max(values):.3f} images/s  (passes: {', '.join(f'{v:.3f}' for v in values)}); "
                  f"{max(values) / max(by_backbone[first]):.2f}x the speed of {first}")
    if args.output:
        from utils.atomic import write_json

        write_json(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
