#!/usr/bin/env python3
"""Train a Faster R-CNN face-mask detector on folders (or .tar archives) of VOC pairs.

By default (--val-mode monitor) the validation set is held out: its loss and mAP
are logged every epoch, and after training the score threshold the model is used
at (best F1, then smallest compliance error, on the validation images) is chosen
and stored in the model file, where predict and evaluate read it. With --val-mode
merge the validation set is trained on too and the threshold stays the default.
The checkpoint is written atomically after every epoch and, if it exists at
start, training resumes from it (in the stage and epoch it stopped in). --stages
trains in stages, each with its own epochs, learning rate and trainable layers
(a fresh warm-up + cosine schedule and optimizer per stage). --tensorboard-dir
writes TensorBoard events (losses, lr, validation mAP/F1, annotated images).
Hyperparameters: a flag given on the command line wins over the --params file
(best_hpo_params.json), which wins over the defaults shown here (utils/defaults.py);
on CUDA what neither sets follows the GPU recipe instead (utils/detection/params.py:
8 images per batch with the learning rate scaled to it, 640 px, the architecture's own
RoIs per image, resnet50_fpn_v2 from COCO when its weights are in the torch cache).
Exit 0 on success, 2 on bad input (one line naming the file), 143 on SIGTERM (stopped
after the current step; a rerun resumes from the checkpoint), 1 on a bug.
"""

import argparse
import contextlib
import logging
import sys
from pathlib import Path

from utils import defaults as D
from utils.classes import LabelMap
from utils.cli import (PLOT_FORMATS, add_label_map_arg, check_distinct_outputs, check_tensorboard_flags, plot_path,
                       positive_float, positive_int, random_seed, run_job, worker_count)
from utils.detection.params import PARAM_CHOICES, PARAM_TYPES, check_budget_plan, check_training_inputs
from utils.detection.weights import BACKBONES
from utils.errors import InputError
from utils.stop import declare_outputs, stop_on_sigterm

log = logging.getLogger("train")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--images", required=True, help="training images: folder or .tar")
    data.add_argument("--annotations", required=True, help="training VOC annotations: folder or .tar "
                      "(may be the same path as --images)")
    data.add_argument("--val-images", default=None, help="validation images: folder or .tar (default: none)")
    data.add_argument("--val-annotations", default=None, help="validation annotations: folder or .tar")
    data.add_argument("--val-mode", choices=["merge", "monitor"], default=D.VAL_MODE,
                      help="monitor: train on train only, log val loss and mAP every epoch and choose the "
                           "score threshold on val; merge: train on train+val (default: "
                           f"{D.VAL_MODE})")
    data.add_argument("--keep", choices=["best", "last"], default=D.KEEP_WEIGHTS,
                      help="the weights the model file keeps: best, the epoch of the highest validation fitness "
                           "(0.1 mAP@0.5 + 0.9 mAP, measured every epoch with --val-mode monitor; the last epoch "
                           f"without validation images), or last (default: {D.KEEP_WEIGHTS})")
    add_label_map_arg(data)
    # Hyperparameter flags default to None ("not given") so that a --params file can set them; a flag the file may
    # also set takes its type from PARAM_TYPES, so both are refused alike.
    model = p.add_argument_group("model")
    model.add_argument("--backbone", choices=BACKBONES, default=None,
                       help=f"detector backbone (default: {D.BACKBONE})")
    model.add_argument("--weights", default=None,
                       help="pretrained weights: none, imagenet, coco, widerface or a file PATH "
                            f"(default: {D.WEIGHTS}; imagenet and widerface both mean retinaface_mnet025's WIDER "
                            "FACE weights); "
                            "falls back to what is available and says so")
    model.add_argument("--weights-file", default=None,
                       help="explicit pretrained weight file (ImageNet backbone, converted RetinaFace or detector "
                            "state dict); workflow workers have no internet (default: torchvision's cache)")
    model.add_argument("--image-size", type=PARAM_TYPES["image_size"], default=None,
                       help=f"longer image side after resizing, in px (default: {D.IMAGE_SIZE})")
    model.add_argument("--trainable-layers", type=PARAM_TYPES["trainable_layers"], default=None,
                       help=f"trainable backbone stages counted from the top (default: {D.TRAINABLE_LAYERS})")
    model.add_argument("--freeze-backbone-epochs", type=PARAM_TYPES["freeze_backbone_epochs"], default=None,
                       help="two-stage schedule: backbone frozen for the first N epochs, then "
                            f"--trainable-layers (default: {D.FREEZE_BACKBONE_EPOCHS})")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--params", default=None, help="JSON file of hyperparameters, e.g. best_hpo_params.json "
                     "(default: none)")
    opt.add_argument("--epochs", type=positive_int, default=None, help=f"epochs (default: {D.EPOCHS})")
    opt.add_argument("--batch-size", type=PARAM_TYPES["batch_size"], default=None,
                     help=f"images per batch (default: {D.BATCH_SIZE})")
    opt.add_argument("--workers", type=worker_count, default=None,
                     help="data-loading worker processes; -1: none on a CPU (decoding is <1%% of a CPU "
                          f"training step), a few on a GPU (default: {D.LOADER_WORKERS})")
    opt.add_argument("--optimizer", choices=PARAM_CHOICES["optimizer"], default=None,
                     help=f"optimizer (default: {D.OPTIMIZER})")
    opt.add_argument("--lr", type=PARAM_TYPES["lr"], default=None, help=f"base learning rate (default: {D.LR})")
    opt.add_argument("--momentum", type=PARAM_TYPES["momentum"], default=None,
                     help=f"SGD momentum, AdamW beta1 (default: {D.MOMENTUM})")
    opt.add_argument("--weight-decay", type=PARAM_TYPES["weight_decay"], default=None,
                     help=f"weight decay (default: {D.WEIGHT_DECAY})")
    opt.add_argument("--lr-schedule", choices=PARAM_CHOICES["lr_schedule"], default=None,
                     help=f"decay after warm-up (default: {D.LR_SCHEDULE})")
    opt.add_argument("--warmup-iters", type=PARAM_TYPES["warmup_iters"], default=None,
                     help=f"linear warm-up iterations (default: {D.WARMUP_ITERS})")
    opt.add_argument("--clip-grad", type=PARAM_TYPES["clip_grad"], default=None,
                     help=f"gradient-norm clipping, 0 disables (default: {D.CLIP_GRAD})")
    opt.add_argument("--hflip", type=PARAM_TYPES["hflip"], default=None,
                     help=f"probability of a horizontal flip per training image (default: {D.HFLIP})")
    opt.add_argument("--time-budget", type=positive_float, default=None, metavar="MINUTES",
                     help="fit the training steps (and so the epochs, the last one cut short) and the cosine "
                          "length to this many minutes of training and validation, after timing the first "
                          "steps; replaces --epochs (default: none, --epochs)")
    opt.add_argument("--stages", default=None, metavar="SPEC",
                     help="staged training: a JSON list, or a .json/.yml/.yaml file holding one, of stages "
                          "{epochs, lr, trainable_layers (0 = backbone frozen), name}, e.g. "
                          "'[{\"epochs\": 3, \"lr\": 0.02, \"trainable_layers\": 0}, {\"epochs\": 10, "
                          "\"lr\": 0.005, \"trainable_layers\": 5}]'; lr and trainable_layers default to the "
                          "run's; each stage gets a new optimizer and its own warm-up + cosine; replaces --epochs "
                          "(with --time-budget the stages' epochs are scaled to fit) "
                          "(default: one stage of --epochs)")
    opt.add_argument("--max-steps", type=positive_int, default=None,
                     help="training steps in all, the last epoch cut short where they end "
                          "(default: --epochs whole epochs)")
    opt.add_argument("--budget-plan", type=budget_plan_arg, default=None, metavar="FIRST,FINAL",
                     help="replay a --time-budget run: the steps it planned after timing its first steps and "
                          "after its first epoch, as its log's last line and the model file "
                          "(training.budget_plan) give them (FIRST may be 'none'); the same command with this "
                          "flag gives the same weights on a CPU, whatever the machine's speed "
                          "(default: the clock plans)")
    recipe = p.add_argument_group("recipe levers (bench/quality.py ablates them)")
    recipe.add_argument("--photometric", type=PARAM_TYPES["photometric"], default=None,
                        help=f"probability of a photometric distortion per training image (default: {D.PHOTOMETRIC})")
    recipe.add_argument("--multiscale", type=PARAM_TYPES["multiscale"], default=None,
                        help="multi-scale training: longer sides --image-size*(1 +- this) in 32 px steps; 0 off "
                             f"(default: {D.MULTISCALE})")
    recipe.add_argument("--repeat-threshold", type=PARAM_TYPES["repeat_threshold"], default=None,
                        help="repeat-factor sampling: images of classes present in fewer than this fraction of "
                             f"the images repeat sqrt(t/f) times per epoch; 0 off (default: {D.REPEAT_THRESHOLD})")
    recipe.add_argument("--ema-decay", type=PARAM_TYPES["ema_decay"], default=None,
                        help="exponential moving average of the weights, used for validation and the model "
                             f"file; 0 off (default: {D.EMA_DECAY})")
    recipe.add_argument("--roi-batch-size", type=PARAM_TYPES["roi_batch_size"], default=None,
                        help="region proposals sampled per image for the box head's loss (at most a quarter of "
                             f"them faces); fewer make a CPU step cheaper (default: {D.ROI_BATCH_SIZE} on a CPU, "
                             "the architecture's own on a GPU)")
    recipe.add_argument("--box-loss", choices=PARAM_CHOICES["box_loss"], default=None,
                        help="the box head's regression loss: smooth_l1 (torchvision's, on the encoded offsets) or "
                             f"giou (the generalised IoU of the decoded boxes) (default: {D.BOX_LOSS})")
    recipe.add_argument("--roi-fg-iou", type=PARAM_TYPES["roi_fg_iou"], default=None,
                        help="IoU with a face from which a sampled proposal trains the box head as that face, "
                             f"below it (or below --roi-bg-iou when given) as background (default: {D.ROI_FG_IOU})")
    recipe.add_argument("--roi-bg-iou", type=PARAM_TYPES["roi_bg_iou"], default=None,
                        help="IoU below which a sampled proposal trains the box head as background; those between "
                             "it and --roi-fg-iou are left out of the box head's loss (default: --roi-fg-iou)")
    opt.add_argument("--no-amp", dest="amp", action="store_const", const=False, default=None,
                     help="disable mixed precision on CUDA (default: AMP on CUDA, never on CPU)")
    opt.add_argument("--seed", type=random_seed, default=None, help=f"random seed (default: {D.SEED})")
    opt.add_argument("--device", default=D.DEVICE, help=f"auto, cpu or cuda (default: {D.DEVICE})")
    out = p.add_argument_group("outputs")
    out.add_argument("--checkpoint", default="checkpoint.pt",
                     help="training checkpoint, written every epoch and resumed from if present "
                          "(default: checkpoint.pt)")
    out.add_argument("--output", default="model.pt", help="final model file with metadata (default: model.pt)")
    out.add_argument("--metrics-csv", default=None,
                     help="per-epoch metrics CSV (default: training_metrics.csv next to --output)")
    out.add_argument("--loss-plot", type=plot_path, default=None,
                     help=f"loss-curve plot ({', '.join(PLOT_FORMATS)}, by extension) (default: loss_curve.png next to "
                          "--output)")
    out.add_argument("--run-record", default=None,
                     help="run record JSON (default: <output stem>_run.json next to --output)")
    out.add_argument("--tensorboard-dir", default=D.TENSORBOARD_DIR,
                     help="write TensorBoard events here: step losses and lr, per epoch validation loss, mAP, F1 "
                          "and a few validation images with their predicted boxes; a resumed run appends "
                          "(default: none, no events)")
    out.add_argument("--tensorboard-tar", default=None,
                     help="pack --tensorboard-dir into this .tar at the end, as tensorboard/<folder name>/... "
                          "(a workflow job's fixed output name) (default: none)")
    out.add_argument("--tensorboard-every", type=positive_int, default=D.TENSORBOARD_EVERY,
                     help=f"steps per written step loss (their mean) (default: {D.TENSORBOARD_EVERY})")
    out.add_argument("--no-progress", action="store_true", help="no tqdm progress bar (default: shown)")
    return p


def output_paths(args) -> dict:
    output = Path(args.output)
    return {
        "output": output,
        "checkpoint": Path(args.checkpoint),
        "metrics_csv": Path(args.metrics_csv or output.with_name("training_metrics.csv")),
        "loss_plot": Path(args.loss_plot or output.with_name("loss_curve.png")),
        "run_record": Path(args.run_record or output.with_name(f"{output.stem}_run.json")),
    }


def budget_plan_arg(text: str) -> list:
    """'1509,1402' or 'none,40' -> [first, final] (argparse type)."""
    try:
        first, final = (part.strip().lower() for part in text.split(","))
        plan = [None if first == "none" else int(first), int(final)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FIRST,FINAL steps (FIRST may be 'none'), got {text!r}") from None
    try:
        return check_budget_plan(plan, "--budget-plan")
    except InputError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = output_paths(args)
    check_distinct_outputs({"--output": paths["output"], "--checkpoint": paths["checkpoint"],
                            "--metrics-csv": paths["metrics_csv"], "--loss-plot": paths["loss_plot"],
                            "--run-record": paths["run_record"], "--tensorboard-tar": args.tensorboard_tar,
                            "--tensorboard-dir": args.tensorboard_dir})
    check_tensorboard_flags(args)
    label_map = LabelMap.parse(args.label_map)
    stop_on_sigterm()  # a pool's SIGTERM stops after the current step; the last epoch's checkpoint is kept
    params_file, stages = check_training_inputs(args)  # the data sets, --params and --stages: missing, unreadable
    # torch (the device, the model, the data loaders) is imported only now: a bad flag or a missing input is refused
    # in a fraction of a second, not after the seconds that importing torch takes
    from utils.detection.training import Trainer
    from utils.detection.training_run import (open_training_data, resolve_training, resume_and_watch, train_epochs,
                                              write_model_outputs)

    settings = resolve_training(args, params_file, stages, label_map)  # the other flags' checks, the schedule's
    declare_outputs(paths["output"], paths["metrics_csv"], paths["loss_plot"], paths["run_record"],
                    args.tensorboard_tar, checkpoints=[paths["checkpoint"]])  # stand-ins if SIGTERM stops it

    with contextlib.ExitStack() as stack:
        log.info("Loading data")
        data = stack.enter_context(open_training_data(args, settings, listed_in=paths["run_record"]))

        log.info("Creating model")
        trainer = Trainer(settings.params, data.train_pairs, settings.device, val_pairs=data.val_pairs or None,
                          plan=settings.plan, progress=not args.no_progress, label_map=settings.label_map,
                          keep=args.keep)
        resumed = resume_and_watch(trainer, paths["checkpoint"], args, stack, data.inputs_sha256)

        log.info("Start training")
        checkpoint_args = {"images": str(args.images), "annotations": str(args.annotations),
                           "val_images": str(args.val_images) if args.val_images else None,
                           "val_mode": args.val_mode, "inputs_sha256": data.inputs_sha256}
        record = train_epochs(trainer, paths, checkpoint_args, validate_map=bool(data.val_pairs))

        log.info("Writing the model")
        final_loss = write_model_outputs(trainer, record, data, args, paths, settings, resumed)
    if record.budget_plan is not None:
        first, final = record.budget_plan
        log.info("time budget plan: --budget-plan %s,%d replays it", "none" if first is None else first, final)
    print(f"train: {trainer.completed_epochs} epochs, final loss {final_loss:.4f}, weights of epoch "
          f"{record.kept['epoch']} kept ({record.kept['rule']}), {len(data.skipped)} inputs skipped; model written "
          f"to {paths['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main, get_args_parser()))
