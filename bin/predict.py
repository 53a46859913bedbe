#!/usr/bin/env python3
"""Detect faces and mask use in images; write annotated copies and the mask-compliance figure.

Inputs are image files, folders of images, or .tar archives of images (any size or
colour mode). Writes OUTPUT_DIR/predictions.json, predictions.csv (file, xmin, ymin,
xmax, ymax, label, score), compliance.json (faces kept per class and their percent
with_mask, overall and per image; the overall figure as an estimate with its 95 % bootstrap
interval and the images it rests on, by every estimator of utils/detection/quantify.py;
per folder when the images sit in two or more folders, drawn in compliance_by_folder.png (the 40 largest),
annotated images annotated_<stem>.jpg in --annotated-dir (at most 1280 px a side), and
predict_run.json (run record). Prints the compliance line with the interval. Folders are read with their
subfolders, symbolic links followed; an image's folder is its path below the folder given
or, when several folders are given, below the folder they are all in (in/siteA and
in/siteB/cam1 give siteA and siteB/cam1); an archive's images keep the folders inside it,
so the shards of bin/make_shards.py give the folder's figures. A file reached twice
(overlapping folders, a folder and a file in it, one archive twice) is read once, the
others listed as skipped; archives of one name are told apart by their folders
(a/shard-000000.tar:x.jpg). OUTPUT_DIR and the annotated folder are never inputs, and a
rerun replaces the last run's outputs there (no stale plot or annotated image is left);
all the outputs are written, or none.
Detections count from the model's operating score threshold (chosen by train on the
validation split and stored in the model file) unless --score-threshold is given.
A file that cannot be read is listed as skipped with its reason and the others
still run. With --output-tag TAG the files are predictions_TAG.json etc., for
bin/merge_predictions.py. Several --model files run as one ensemble (utils/detection/ensemble.py:
weighted box fusion; --tta adds each model's flipped pass to the fusion; threshold: the mean
of the models' own). With --explain, each annotated image also gets, for each of its
best --explain-max-boxes detections, explain_<stem>_<k>.jpg: the evidence for the box's
class (HiResCAM by default, grad-cam package) over a crop around the box; the image's
entry in predictions.json lists them (detection index k, evidence share inside the box).
A run stopped part way (Ctrl-C, SIGTERM, a kill) keeps the records of the images done in
OUTPUT_DIR/.predictions.json.progress.jsonl and their drawings beside it; run again with the same
model files, settings, batch size, packages, code and inputs it reads only the batches not done, and its
outputs are those of a run never stopped. Another model, setting or input set starts afresh. With --checkpoint
FILE that progress also goes into one file (a .tar, saved as the run goes and when it stops, emptied once the
outputs are written), which a run in a new folder (a pool's retry, which gets its checkpoint back but not its
sandbox) resumes from: utils/detection/prediction_checkpoint.py.
Exit 0 when at least one image was processed; 2 when none was or the model
cannot be loaded (one line naming the file); 143 after SIGTERM (what was not written yet
gets a stand-in, utils/stop.py); 130 after Ctrl-C; 1 on a bug.
"""

import argparse
import contextlib
import sys
from pathlib import Path

from tqdm import tqdm

from utils import defaults as D
from utils.cli import (add_model_run_args, check_distinct_outputs, check_model_run_args, check_output_tag,
                       non_negative_int, positive_int, print_skipped, require_model_files, run_job)
from utils.detection.prediction_checkpoint import PredictionCheckpoint
from utils.detection.prediction_progress import progress_path
from utils.errors import InputError
from utils.naming import output_names
from utils.provenance import code_version, file_sha256, package_versions, run_record
from utils.stop import declare_outputs, stop_on_sigterm


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", nargs="+", required=True,
                        help="image files, folders of images, or .tar archives of images")
    parser.add_argument("--model", nargs="+", required=True,
                        help="model file written by bin/train.py; several (e.g. the fold models of a cross-validation) "
                             "run as one ensemble, their boxes merged by weighted box fusion")
    parser.add_argument("--output-dir", required=True, help="folder for predictions and compliance files")
    parser.add_argument("--annotated-dir", default=None,
                        help="folder for annotated images; a run replaces the annotated_*.jpg and explain_*.jpg "
                             "there (default: OUTPUT_DIR/annotated)")
    parser.add_argument("--no-annotated", action="store_true", help="do not write annotated images")
    parser.add_argument("--annotate-max", type=non_negative_int, default=None,
                        help="draw at most N images, spread evenly over the inputs (default: all)")
    parser.add_argument("--annotated-tar", default=None,
                        help="pack the annotated images into this .tar instead of --annotated-dir")
    parser.add_argument("--output-tag", default=None,
                        help="name the outputs predictions_TAG.json, compliance_TAG.json, ... (one predict job "
                             "per shard of a workflow; bin/merge_predictions.py merges them) (default: none)")
    parser.add_argument("--explain", action="store_true",
                        help="write a heat map of the class evidence for the best detections of every annotated "
                             "image (a forward and backward pass per box: bound it with --annotate-max)")
    parser.add_argument("--explain-method", choices=D.EXPLAIN_METHODS, default=D.EXPLAIN_METHOD,
                        help="hirescam: per box, on the features the box used; gradcam: per box, channel-weighted; "
                             "eigencam: one class-agnostic map per image, no backward pass "
                             f"(default: {D.EXPLAIN_METHOD})")
    parser.add_argument("--explain-max-boxes", type=positive_int, default=D.EXPLAIN_MAX_BOXES,
                        help=f"highest-scoring detections explained per image (default: {D.EXPLAIN_MAX_BOXES})")
    parser.add_argument("--checkpoint", default=None,
                        help="also keep the progress of a stopped run in this one file, which a run in another "
                             "folder resumes from (the workflow's predict jobs: a pool retries a job in a new "
                             "folder); an empty or missing file: nothing to resume (default: none)")
    add_model_run_args(parser, "keep detections with at least this score")
    return parser


def main(args) -> int:
    stop_on_sigterm()  # SIGTERM stops after the image in hand; the rerun resumes from the progress file
    check_model_run_args(args)
    check_output_tag(args.output_tag)
    names = output_names("predict", args.output_tag)
    files = [Path(args.output_dir) / names[key] for key in ("predictions_json", "predictions_csv", "compliance_json",
                                                            "run_record")]
    # a checkpoint in place of an output would be replaced by it (and removed as the last run's output)
    check_distinct_outputs({**{f"--output-dir's {path.name}": path for path in files},
                            "--annotated-tar": args.annotated_tar, "--checkpoint": args.checkpoint},
                           {"--model": args.model, "--images": args.images})
    declare_outputs(*files, args.annotated_tar, checkpoints=[args.checkpoint])
    if args.explain and args.no_annotated:
        raise InputError("--explain explains the annotated images: drop --no-annotated "
                         "(bound them with --annotate-max)")
    if not any(Path(given).exists() for given in args.images):  # one missing among others is a listed skip
        others = f" (nor do the other {len(args.images) - 1} --images paths)" if len(args.images) > 1 else ""
        raise InputError(f"{args.images[0]}: no such file or folder{others}")
    if len(args.model) > 1 and args.explain:
        raise InputError("--explain explains one model's boxes: give one --model, not an ensemble")
    require_model_files(args.model)  # the model loader's own refusals, before torch's import
    # torch (the device, the model) is imported only now: a bad flag, a missing input or model file is refused in a
    # fraction of a second, not after the seconds that importing torch takes
    from utils.detection.device import resolve_device
    from utils.detection.ensemble import box_voting_said, load_models
    from utils.detection.prediction import predict_images, summary_line

    device = resolve_device(args.device)
    model, meta, score_threshold, source = load_models(args.model, device, args.score_threshold, args.image_size,
                                                       args.tta, args.box_voting)
    tta, tta_source = meta["tta"], meta["tta_source"]
    print(f"predict: score threshold {score_threshold:g} ({source}); working size {meta['working_size']} px "
          f"({meta['working_size_source']}); flip TTA {'on' if tta else 'off'} ({tta_source}); "
          f"{box_voting_said(meta)}")
    settings = {"model": str(args.model[0]) if len(args.model) == 1 else list(map(str, args.model)),
                "backbone": meta.get("backbone"), "image_size": meta.get("image_size"),
                "working_size": meta["working_size"], "score_threshold_source": source,
                "box_vote_iou": meta["box_vote_iou"]}
    model_sha256 = {Path(path): file_sha256(path) for path in args.model}  # the resume key's and the record's
    checkpoint = None
    if args.checkpoint is not None:
        progress = progress_path(Path(args.output_dir), names["predictions_json"])
        checkpoint = PredictionCheckpoint(args.checkpoint, progress)
        if restored := checkpoint.restore():
            print(f"predict: {restored}")
    with tqdm(desc="predict", unit="img", file=sys.stderr, disable=None) as bar:
        def advance(images: int) -> None:
            bar.update(images)
            if checkpoint is not None:
                checkpoint.advance(images)

        def make_record(run) -> dict:  # written with the outputs, as one set
            processed = [Path(path) for path in args.model] + run.inputs  # files and archives, folders' images
            return run_record("predict", {**vars(args), "device": str(device)}, processed,
                              {**model_sha256, **run.inputs_sha256})

        try:
            run = predict_images(model, args.images, args.output_dir, annotated_dir=args.annotated_dir,
                                 device=device, score_threshold=score_threshold, tta=tta, batch_size=args.batch_size,
                                 num_workers=None if args.workers < 0 else args.workers,
                                 annotate=not args.no_annotated, progress=advance, settings=settings,
                                 annotate_max=args.annotate_max, annotated_tar=args.annotated_tar,
                                 tag=args.output_tag, explain=args.explain_method if args.explain else None,
                                 explain_max_boxes=args.explain_max_boxes, calibration=meta.get("quantification"),
                                 resume={"models": [model_sha256[Path(path)] for path in args.model],
                                         "device": device.type, "packages": package_versions(),
                                         "box_vote_iou": meta["box_vote_iou"],
                                         "code": code_version()["sources_sha256"],
                                         # a checkpoint's inputs are new copies on the next try: keyed by content
                                         **({"inputs_by_content": True} if checkpoint is not None else {})},
                                 make_record=make_record)
        except BaseException:  # a stop (SIGTERM, Ctrl-C) or a failure: what was done goes with the checkpoint
            if checkpoint is not None:
                with contextlib.suppress(OSError):  # a full disk: the error to report is the run's (the last
                    checkpoint.save()               # checkpoint saved is whole: save() appends after it)
            raise
    if checkpoint is not None:
        checkpoint.clear()  # the outputs are written: nothing left to resume
    print_skipped(run.skipped, str(run.outputs["compliance_json"]))
    print(summary_line(run))
    print(f"{run.num_images} images processed, {len(run.skipped)} skipped; outputs in {args.output_dir}")
    if run.num_images == 0:
        raise InputError(f"{' '.join(map(str, args.images))}: no image could be processed (see the skipped list above)")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main, get_args_parser()))
