#!/usr/bin/env python3
"""Train a Faster R-CNN face-mask detector on folders (or .tar archives) of VOC pairs.

By default the validation set is merged into the training set (--val-mode merge,
the predecessor's choice: the test split measures the final model); with
--val-mode monitor it is kept apart and its loss and mAP are logged every epoch.
The checkpoint is written atomically after every epoch and, if it exists at
start, training resumes from it. Hyperparameters: a flag given on the command
line wins over the --params file (best_hpo_params.json), which wins over the
defaults shown here.
"""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.detection.engine import CheckpointError, NonFiniteLossError, resolve_device  # noqa: E402
from utils.detection.model import BACKBONES, ModelError  # noqa: E402
from utils.detection.training import TrainingDataError, TrainParams, train_job  # noqa: E402

DEFAULTS = TrainParams()


def get_args_parser():
    p = __import__("argparse").ArgumentParser(description=__doc__,
                                             formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--images", required=True, help="training images: folder or .tar")
    data.add_argument("--annotations", required=True, help="training VOC annotations: folder or .tar "
                      "(may be the same path as --images)")
    data.add_argument("--val-images", default=None, help="validation images: folder or .tar (default: none)")
    data.add_argument("--val-annotations", default=None, help="validation annotations: folder or .tar")
    data.add_argument("--val-mode", choices=["merge", "monitor"], default="merge",
                      help="merge: train on train+val; monitor: train on train only, log val loss and mAP "
                           "every epoch (default: merge)")
    model = p.add_argument_group("model")
    model.add_argument("--backbone", choices=BACKBONES, default=None,
                       help=f"detector backbone (default: {DEFAULTS.backbone})")
    model.add_argument("--weights", default=None,
                       help=f"pretrained weights: none, imagenet, coco or a file PATH (default: {DEFAULTS.weights}); "
                            "falls back to what is available and says so")
    model.add_argument("--weights-file", default=None,
                       help="explicit pretrained weight file (ImageNet backbone or detector state dict); "
                            "workflow workers have no internet (default: torchvision's cache)")
    model.add_argument("--image-size", type=int, default=None,
                       help=f"longer image side after resizing, in px (default: {DEFAULTS.image_size})")
    model.add_argument("--trainable-layers", type=int, default=None,
                       help=f"trainable backbone stages counted from the top (default: {DEFAULTS.trainable_layers})")
    model.add_argument("--freeze-backbone-epochs", type=int, default=None,
                       help="two-stage schedule: backbone frozen for the first N epochs, then "
                            f"--trainable-layers (default: {DEFAULTS.freeze_backbone_epochs})")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--params", default=None, help="JSON file of hyperparameters, e.g. best_hpo_params.json "
                     "(default: none)")
    opt.add_argument("--epochs", type=int, default=None, help=f"epochs (default: {DEFAULTS.epochs})")
    opt.add_argument("--batch-size", type=int, default=None, help=f"images per batch (default: {DEFAULTS.batch_size})")
    opt.add_argument("--workers", type=int, default=None,
                     help="data-loading worker processes; -1: none on a CPU (decoding is <1%% of a CPU "
                          "training step), a few on a GPU (default: -1)")
    opt.add_argument("--optimizer", choices=["sgd", "adamw"], default=None,
                     help=f"optimizer (default: {DEFAULTS.optimizer})")
    opt.add_argument("--lr", type=float, default=None, help=f"base learning rate (default: {DEFAULTS.lr})")
    opt.add_argument("--momentum", type=float, default=None,
                     help=f"SGD momentum, AdamW beta1 (default: {DEFAULTS.momentum})")
    opt.add_argument("--weight-decay", type=float, default=None, help=f"weight decay (default: {DEFAULTS.weight_decay})")
    opt.add_argument("--lr-schedule", choices=["cosine", "step"], default=None,
                     help=f"decay after warm-up (default: {DEFAULTS.lr_schedule})")
    opt.add_argument("--warmup-iters", type=int, default=None,
                     help=f"linear warm-up iterations (default: {DEFAULTS.warmup_iters})")
    opt.add_argument("--clip-grad", type=float, default=None,
                     help=f"gradient-norm clipping, 0 disables (default: {DEFAULTS.clip_grad})")
    opt.add_argument("--hflip", type=float, default=None,
                     help=f"probability of a horizontal flip per training image (default: {DEFAULTS.hflip})")
    opt.add_argument("--no-amp", dest="amp", action="store_const", const=False, default=None,
                     help="disable mixed precision on CUDA (default: AMP on CUDA, never on CPU)")
    opt.add_argument("--seed", type=int, default=None, help=f"random seed (default: {DEFAULTS.seed})")
    opt.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    out = p.add_argument_group("outputs")
    out.add_argument("--checkpoint", default="checkpoint.pt",
                     help="training checkpoint, written every epoch and resumed from if present "
                          "(default: checkpoint.pt)")
    out.add_argument("--output", default="model.pt", help="final model file with metadata (default: model.pt)")
    out.add_argument("--metrics-csv", default=None,
                     help="per-epoch metrics CSV (default: training_metrics.csv next to --output)")
    out.add_argument("--loss-plot", default=None, help="loss-curve PNG (default: loss_curve.png next to --output)")
    out.add_argument("--run-record", default=None,
                     help="run record JSON (default: <output stem>_run.json next to --output)")
    out.add_argument("--no-progress", action="store_true", help="no tqdm progress bar (default: shown)")
    return p


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        device = resolve_device(args.device)
        summary = train_job(args, device)
    except (TrainingDataError, ModelError, CheckpointError, NonFiniteLossError,
            FileNotFoundError, NotADirectoryError, ValueError, RuntimeError) as error:
        print(f"train: error: {error}", file=sys.stderr)
        return 2
    print(f"train: {summary['epochs']} epochs, final loss {summary['final_train_loss']:.4f}, "
          f"{len(summary['skipped'])} inputs skipped; model written to {summary['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
