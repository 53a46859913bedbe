#!/usr/bin/env python3
"""Test-time augmentation of a trained model, measured on its validation images (issue #21).

A model file bin/train.py wrote runs at its working size (chosen on validation). This bench runs it
over a labelled set (--val; --test too, to report only) in seven ways and prints COCO mAP, mAP@0.5
and mAR@100 with the seconds each took:

  plain                the model at its working size (what the jobs do without --tta)
  flip, NMS            + the image flipped left-right, boxes merged by per-class NMS at IoU 0.5
                       (what --tta did before 2026-12-05)
  two sizes, NMS       the working size and 4/3 of it (multiples of 32 px), NMS-merged
  two sizes + flip, NMS
  flip, WBF            the flip pass fused with weighted box fusion, as an ensemble's members are
                       (utils.detection.inference.fuse_boxes: what --tta does since 2026-12-05)
  two sizes, WBF       the model at both sizes as two members of one BoxFusionEnsemble
  two sizes + flip, WBF

No threshold is applied (COCO metrics read every detection above the model's floor), so none of the
rows depends on a threshold chosen without augmentation. With --output the rows are saved as JSON.

  .venv/bin/python bench/test_time_augmentation.py --model RUN/outputs/model.pt \
      --val RUN/scratch/preprocess_val/val_set.tar --test RUN/scratch/preprocess_test/test_set.tar \
      --output bench/results/test_time_augmentation.json
"""

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LARGER = 4 / 3  # the second size: a third larger, the step between the working sizes train.py tries
NMS_IOU = 0.5  # the NMS rows' merge: torchvision's Faster R-CNN uses the same value for its own per-class NMS


def at_size(model, size: int):
    """*model* at working size *size*, sharing its weights: a shallow copy with a transform of its own."""
    from utils.detection.inference_size import set_inference_size

    sized = copy.copy(model)
    sized._modules = dict(model._modules)
    sized._modules["transform"] = copy.deepcopy(model.transform)
    set_inference_size(sized, size)
    return sized.eval()


def nms_merged(models, flips: bool):
    """A detector (images -> outputs) running every model in *models* (and, with *flips*, each on the images
    flipped left-right too), all passes merged per class by NMS at IoU 0.5 (what --tta did before 2026-12-05)."""
    import torch
    from torchvision.ops import batched_nms

    from utils.detection.inference import detect, max_detections, unflip_boxes

    def run(images):
        passes = []
        for model in models:  # one batch of the images and their flips, as --tta ran them
            flipped = [torch.flip(image, dims=[-1]) for image in images] if flips else []
            outputs = detect(model, list(images) + flipped)
            passes.append(outputs[:len(images)])
            if flips:
                passes.append([{**out, "boxes": unflip_boxes(out["boxes"], image.shape[-1])}
                               for out, image in zip(outputs[len(images):], images)])
        if len(passes) == 1:
            return passes[0]
        merged = []
        for i in range(len(images)):
            boxes, scores, labels = (torch.cat([p[i][key] for p in passes]) for key in ("boxes", "scores", "labels"))
            keep = batched_nms(boxes, scores, labels, NMS_IOU)[: max_detections(models[0])]
            merged.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return merged

    return run


def wbf_fused(models, flips: bool):
    from utils.detection.ensemble import BoxFusionEnsemble

    ensemble = BoxFusionEnsemble(models)
    return ensemble.detect_with_flips if flips else ensemble


def measure(detector, loader) -> dict:
    import torch

    from utils.detection.metrics import coco_map

    predictions, targets = [], []
    started = time.perf_counter()
    with torch.inference_mode():
        for images, batch_targets in loader:
            predictions += [{key: out[key].cpu() for key in ("boxes", "scores", "labels")} for out in detector(images)]
            targets += [{"boxes": t["boxes"].as_subclass(torch.Tensor), "labels": t["labels"]} for t in batch_targets]
    seconds = time.perf_counter() - started
    summary = coco_map(predictions, targets)
    return {"map": summary["map"], "map_50": summary["map_50"], "mar_100": summary["mar_100"],
            "ap50_per_class": {name: entry["ap_50"] for name, entry in summary["per_class"].items()},
            "seconds": round(seconds, 1), "images": len(targets)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="a model file written by bin/train.py")
    p.add_argument("--val", type=Path, required=True, help="its validation set (folder or .tar)")
    p.add_argument("--test", type=Path, default=None, help="its test set, reported only (default: none)")
    p.add_argument("--output", type=Path, default=None, help="JSON file for the rows (default: printed only)")
    args = p.parse_args()
    import torch

    from utils.data.pairs import open_folder
    from utils.detection.evaluation import evaluation_loader, labelled_pairs, load_trained_model
    from utils.detection.metrics import fitness

    device = torch.device("cpu")
    model, meta, _, _ = load_trained_model(args.model, device)
    size = int(meta["working_size"])
    larger = int(round(size * LARGER / 32)) * 32
    sizes = {"one size": [size], "two sizes": [size, larger]}
    ways = [("plain", nms_merged, "one size", False), ("flip, NMS", nms_merged, "one size", True),
            ("two sizes, NMS", nms_merged, "two sizes", False),
            ("two sizes + flip, NMS", nms_merged, "two sizes", True),
            ("flip, WBF", wbf_fused, "one size", True), ("two sizes, WBF", wbf_fused, "two sizes", False),
            ("two sizes + flip, WBF", wbf_fused, "two sizes", True)]
    rows = []
    sets = [("validation", args.val)] + ([("test", args.test)] if args.test else [])
    for split, path in sets:
        with open_folder(path) as folder:
            pairs, _ = labelled_pairs(folder, folder)
            loader = evaluation_loader(pairs, num_workers=0)
            for way, merge, size_key, flips in ways:
                row = {"split": split, "way": way, "sizes": sizes[size_key], "flip": flips,
                       **measure(merge([at_size(model, s) for s in sizes[size_key]], flips), loader)}
                row["fitness"] = fitness(row)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{args.model}: working size {size} px, second size {larger} px")
    print("| set | way | mAP | mAP@0.5 | AP50 with / without / incorrect | mAR@100 | fitness | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        ap = row["ap50_per_class"]
        print(f"| {row['split']} ({row['images']}) | {row['way']} | {row['map']:.3f} | {row['map_50']:.3f} | "
              f"{ap['with_mask']:.3f} / {ap['without_mask']:.3f} / {ap['mask_weared_incorrect']:.3f} | "
              f"{row['mar_100']:.3f} | {row['fitness']:.4f} | {row['seconds']:.1f} |")
    if args.output:
        from utils.atomic import write_json

        write_json(args.output, {"model": str(args.model), "working_size": size, "second_size": larger, "rows": rows,
                                 "torch": torch.__version__, "python": platform.python_version(),
                                 "cpus": torch.get_num_threads()})
        print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
