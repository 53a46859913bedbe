#!/usr/bin/env python3
"""Evaluate a trained detector on a labelled set (the test split).

Writes OUTPUT_DIR/evaluation.json (map, map_50, map_75, mar_100, per_class {class:
{ap, ap_50, ap_75, recall}}, recall_by_iou {per_class, any_class: the share of the faces
found at each IoU threshold 0.5-0.95, mAR@100 being a row's mean; any_class counts a face
found whatever class its box says, at up to 100 boxes per image and class as the class
rows}, confusion_matrix {labels, matrix}, num_images,
test_loss, compliance {true, predicted, error_points, per_image_mae_points, ...},
quantification {estimate, estimates {cc, pcc, acc, pacc, pacc2: percent, low, high (95 % bootstrap
interval), units, error_points, truth_inside}, true_percent, ...},
...), evaluation.txt (the same for people), confusion_matrix.png and
.csv (rows = true class, columns = predicted, with a background row and column),
pr_curves.png, evaluation_images.json (per image, worst first: correct, confused, missed
and false boxes at the threshold, true and predicted (kept) percent with_mask; the run
report's grid reads it) and evaluate_run.json (run record). mAP comes from torchmetrics'
MeanAveragePrecision (faster-coco-eval backend). The model file carries its
classes, backbone, image size and operating score threshold (chosen by train on the
validation split), so no model flags are needed; the confusion matrix and the
compliance error use that threshold unless --score-threshold is given.
With --output-tag TAG every file name carries the tag (evaluation_TAG.json, ...,
evaluate_TAG_run.json): one evaluate job per cross-validation fold.
An image that does not decode (empty, truncated) or an XML that does not parse is skipped,
listed with its reason in evaluation.json and .txt, as are labelled faces left out (unknown
class, box outside the image: "objects_dropped"). Exit 0 on success, 2 when no pair can be
read or the model cannot be (one line naming the file), 1 on a bug.
"""

import argparse
import contextlib
import sys
from pathlib import Path

from utils.classes import LabelMap
from utils.cli import (add_label_map_arg, add_model_run_args, check_model_run_args, check_output_tag,
                       require_model_files, require_set_inputs, run_job)
from utils.data.pairs import open_folder
from utils.errors import InputError
from utils.provenance import run_record


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="folder (or flat .tar) of test images")
    parser.add_argument("--annotations", required=True,
                        help="folder (or flat .tar) of their VOC .xml files; may be the same path as --images")
    parser.add_argument("--model", required=True, help="model file written by bin/train.py")
    parser.add_argument("--output-dir", required=True, help="folder for the evaluation files")
    parser.add_argument("--output-tag", default=None,
                        help="name the outputs evaluation_TAG.json, pr_curves_TAG.png, evaluate_TAG_run.json, ... "
                             "(one evaluate job per cross-validation fold of a workflow) (default: none)")
    add_model_run_args(parser, "detections at or above this score enter the confusion matrix and the "
                               "compliance error; mAP uses all")
    add_label_map_arg(parser)
    return parser


def main(args) -> int:
    check_model_run_args(args)
    check_output_tag(args.output_tag)
    label_map = LabelMap.parse(args.label_map)
    output_dir = Path(args.output_dir)
    if blocking := next((p for p in (output_dir, *output_dir.parents) if p.exists() and not p.is_dir()), None):
        # said now, not after every image has run
        raise InputError(f"{blocking}: a file, not a folder (--output-dir {output_dir})")
    require_model_files([args.model])  # the model loader's own refusals, before torch's import
    require_set_inputs(args.images, args.annotations)  # open_folder's, said now, not after the model's load
    # torch (the device, the model, the metrics) is imported only now: a bad flag, a missing model file or set is
    # refused in a fraction of a second, not after the seconds that importing torch takes
    from utils.detection.device import resolve_device
    from utils.detection.ensemble import box_voting_said
    from utils.detection.evaluation import evaluate_model, format_report, labelled_pairs, load_trained_model

    device = resolve_device(args.device)
    model, meta, score_threshold, source = load_trained_model(args.model, device, args.score_threshold,
                                                              args.image_size, args.tta, args.box_voting)
    print(f"evaluate: score threshold {score_threshold:g} ({source}); working size {meta['working_size']} px "
          f"({meta['working_size_source']}); flip TTA {'on' if meta['tta'] else 'off'} ({meta['tta_source']}); "
          f"{box_voting_said(meta)}")
    with contextlib.ExitStack() as stack:
        images_dir = stack.enter_context(open_folder(args.images))
        same = Path(args.images).resolve() == Path(args.annotations).resolve()
        annotations_dir = images_dir if same else stack.enter_context(open_folder(args.annotations))
        pairs, skipped = labelled_pairs(images_dir, annotations_dir)
        settings = {"model": str(args.model), "backbone": meta.get("backbone"),
                    "image_size": meta.get("image_size"), "working_size": meta["working_size"],
                    "working_size_source": meta["working_size_source"], "tta": meta["tta"],
                    "tta_source": meta["tta_source"], "box_voting": meta["box_voting"],
                    "box_vote_iou": meta["box_vote_iou"], "box_voting_source": meta["box_voting_source"],
                    "images": str(args.images),
                    "annotations": str(args.annotations)}
        inputs = [p.image for p in pairs] + [p.annotation for p in pairs] + [Path(args.model)]

        def record():  # written with the evaluation's files, as one set
            return run_record("evaluate", {**vars(args), "device": str(device)}, inputs,
                              {pair.image: pair.image_sha256 for pair in pairs})  # hashed by the read that checked

        evaluation = evaluate_model(model, pairs, output_dir, device=device,
                                    score_threshold=score_threshold, batch_size=args.batch_size,
                                    num_workers=None if args.workers < 0 else args.workers,
                                    skipped=skipped, settings=settings, progress=sys.stderr.isatty(),
                                    label_map=label_map, tag=args.output_tag,
                                    calibration=meta.get("quantification"), tta=meta["tta"], record=record)
    print(format_report(evaluation.report, listed_in=evaluation.outputs["evaluation_txt"]), end="")
    print(f"outputs in {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main, get_args_parser()))
