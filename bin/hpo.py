#!/usr/bin/env python3
"""Optuna hyperparameter search for the face-mask detector (one worker of K).

Each trial trains for --epochs epochs and is scored after every epoch on the
validation set in eval mode (fitness 0.1*mAP@0.5 + 0.9*mAP@0.5:0.95 by default);
a MedianPruner stops poor trials early. The study lives in an Optuna journal at
--checkpoint: rerunning continues it (trials left running by a killed job are
failed and their parameters enqueued again) and --n-trials is the total number
of finished trials wanted, not the number of new ones. With --num-workers K,
worker --worker-index I searches the I-th slice of the log learning-rate range
with sampler seed --seed + I (modulo 2**32); bin/hpo_merge.py combines the workers' results.
--tensorboard-dir writes each finished trial's objective and parameters as
TensorBoard events (scalars per trial number and the HPARAMS tab).
Exit 0 on success, 2 on bad input (one line naming the file or flag), 143 on SIGTERM (the
running trial stopped after its current step; a rerun runs its parameters again), 1 on a bug.
"""

import argparse
import logging
import sys
from pathlib import Path

from utils import defaults as D
from utils.atomic import write_json
from utils.classes import LabelMap
from utils.cli import (add_label_map_arg, check_distinct_outputs, check_tensorboard_flags, fraction_below_one,
                       image_size_px, non_negative_int, positive_float, positive_int, random_seed, require_set_inputs,
                       run_job, worker_count)
from utils.detection.params import PARAM_CHOICES, require_weight_file
from utils.detection.tensorboard_log import pack_events
from utils.detection.weights import BACKBONES, weights_file_given
from utils.errors import InputError
from utils.provenance import files_named, write_run_record
from utils.stop import declare_outputs, stop_on_sigterm


def _spaced(values) -> str:
    return " ".join(map(str, values))


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-images", required=True, help="training images: folder or .tar")
    p.add_argument("--train-annotations", required=True, help="training VOC annotations: folder or .tar")
    p.add_argument("--val-images", required=True, help="validation images: folder or .tar")
    p.add_argument("--val-annotations", required=True, help="validation VOC annotations: folder or .tar")
    add_label_map_arg(p)
    p.add_argument("--epochs", type=positive_int, default=D.HPO_EPOCHS,
                   help=f"epochs per trial (default: {D.HPO_EPOCHS})")
    p.add_argument("--image-size", type=image_size_px, default=D.IMAGE_SIZE,
                   help=f"longer image side in px (default: {D.IMAGE_SIZE})")
    p.add_argument("--n-trials", type=positive_int, default=D.HPO_TRIALS,
                   help="finished (complete + pruned) trials this worker's study should hold in total "
                        f"(default: {D.HPO_TRIALS})")
    p.add_argument("--seed", type=random_seed, default=D.SEED,
                   help=f"training seed; the sampler uses seed + worker index, modulo 2**32 (default: {D.SEED})")
    p.add_argument("--checkpoint", default="hpo.journal",
                   help="Optuna journal file; an existing one is continued (default: hpo.journal)")
    p.add_argument("--output", default="best.json", help="this worker's result (default: best.json)")
    p.add_argument("--worker-index", type=non_negative_int, default=0,
                   help="this worker's index I in 0..K-1 (default: 0)")
    p.add_argument("--num-workers", type=positive_int, default=D.HPO_NUM_WORKERS,
                   help=f"number of HPO workers K (default: {D.HPO_NUM_WORKERS})")
    p.add_argument("--backbone", choices=BACKBONES, default=D.BACKBONE,
                   help=f"detector backbone (default: {D.BACKBONE})")
    p.add_argument("--weights", default=D.WEIGHTS,
                   help=f"pretrained weights: none, imagenet, coco, widerface or a file PATH (default: {D.WEIGHTS}; "
                        "imagenet and widerface both mean retinaface_mnet025's WIDER FACE weights)")
    p.add_argument("--weights-file", default=None,
                   help="explicit pretrained weight file (default: torchvision's cache)")
    p.add_argument("--timeout", type=positive_float, default=None,
                   help="stop starting new trials after this many seconds (default: no limit)")
    p.add_argument("--study-name", default=None,
                   help="Optuna study name (default: mask-hpo-worker<I>of<K>)")
    p.add_argument("--device", default=D.DEVICE, help=f"auto, cpu or cuda (default: {D.DEVICE})")
    p.add_argument("--objective", choices=sorted(D.HPO_OBJECTIVES), default=D.HPO_OBJECTIVE,
                   help=f"fitness = 0.1*mAP50 + 0.9*mAP50-95, or map = mAP50-95 (default: {D.HPO_OBJECTIVE})")
    p.add_argument("--optimizer", choices=PARAM_CHOICES["optimizer"], default=D.OPTIMIZER,
                   help=f"optimizer of every trial (default: {D.OPTIMIZER})")
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=list(D.HPO_BATCH_SIZES),
                   help=f"batch size, or several to search among (default: {_spaced(D.HPO_BATCH_SIZES)})")
    p.add_argument("--workers", type=worker_count, default=D.LOADER_WORKERS,
                   help=f"data-loading worker processes; -1: none on a CPU, a few on a GPU "
                        f"(default: {D.LOADER_WORKERS})")
    p.add_argument("--warmup-iters", type=non_negative_int, default=D.HPO_WARMUP_ITERS,
                   help=f"learning-rate warm-up iterations per trial (default: {D.HPO_WARMUP_ITERS})")
    p.add_argument("--lr-range", type=positive_float, nargs=2, default=list(D.HPO_LR_RANGE), metavar=("MIN", "MAX"),
                   help=f"whole learning-rate range, log scale, split between workers "
                        f"(default: {_spaced(D.HPO_LR_RANGE)})")
    p.add_argument("--momentum-range", type=fraction_below_one, nargs=2, default=list(D.HPO_MOMENTUM_RANGE),
                   metavar=("MIN", "MAX"), help=f"momentum range (default: {_spaced(D.HPO_MOMENTUM_RANGE)})")
    p.add_argument("--weight-decay-range", type=positive_float, nargs=2, metavar=("MIN", "MAX"),
                   default=list(D.HPO_WEIGHT_DECAY_RANGE),
                   help=f"weight-decay range, log scale (default: {_spaced(D.HPO_WEIGHT_DECAY_RANGE)})")
    p.add_argument("--trainable-layers-range", type=non_negative_int, nargs=2, metavar=("MIN", "MAX"),
                   default=list(D.HPO_TRAINABLE_LAYERS_RANGE),
                   help=f"trainable backbone stages range (default: {_spaced(D.HPO_TRAINABLE_LAYERS_RANGE)})")
    p.add_argument("--default-trial", action=argparse.BooleanOptionalAction, default=D.HPO_DEFAULT_TRIAL,
                   help="a new study's first trial runs the training defaults (lr, momentum, weight decay, "
                        f"trainable layers), in the worker whose lr slice holds them (default: {D.HPO_DEFAULT_TRIAL})")
    p.add_argument("--pruner-startup-trials", type=non_negative_int, default=D.HPO_PRUNER_STARTUP_TRIALS,
                   help=f"completed trials before the MedianPruner prunes (default: {D.HPO_PRUNER_STARTUP_TRIALS})")
    p.add_argument("--pruner-warmup-epochs", type=non_negative_int, default=D.HPO_PRUNER_WARMUP_EPOCHS,
                   help=f"epochs of a trial before it can be pruned (default: {D.HPO_PRUNER_WARMUP_EPOCHS})")
    p.add_argument("--run-record", default=None,
                   help="run record JSON (default: <output stem>_run.json next to --output)")
    p.add_argument("--tensorboard-dir", default=D.TENSORBOARD_DIR,
                   help="write TensorBoard events here: per finished trial the objective, the parameters and "
                        "the per-epoch objective; a continued study appends (default: none, no events)")
    p.add_argument("--tensorboard-tar", default=None,
                   help="pack --tensorboard-dir into this .tar at the end, as tensorboard/<folder name>/... "
                        "(default: none)")
    return p


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("optuna").setLevel(logging.WARNING)
    stop_on_sigterm()  # a pool's SIGTERM stops the running trial, which is enqueued again for the retry
    for flag in ("lr_range", "momentum_range", "weight_decay_range", "trainable_layers_range"):
        low, high = getattr(args, flag)
        if low > high:
            raise InputError(f"--{flag.replace('_', '-')}: MIN {low:g} is above MAX {high:g}")
    label_map = LabelMap.parse(args.label_map)
    check_tensorboard_flags(args)
    output = Path(args.output)
    record = Path(args.run_record) if args.run_record else output.with_name(f"{output.stem}_run.json")
    check_distinct_outputs({"--output": output, "--checkpoint": args.checkpoint, "--run-record": record,
                            "--tensorboard-tar": args.tensorboard_tar, "--tensorboard-dir": args.tensorboard_dir})
    # stand-ins if SIGTERM stops it (utils/stop.py)
    declare_outputs(output, record, args.tensorboard_tar, checkpoints=[args.checkpoint])
    require_set_inputs(args.train_images, args.train_annotations)  # the study's own refusals of a missing set
    require_set_inputs(args.val_images, args.val_annotations)
    require_weight_file(args.weights, args.weights_file)  # the model builder's, not after the sets are paired
    # torch and Optuna (the device, the trials) are imported only now: a bad flag or a missing set is refused in a
    # fraction of a second, not after the seconds that importing torch takes
    from utils.detection.device import resolve_device
    from utils.detection.hpo import HpoConfig, SearchSpace, run_study

    space = SearchSpace(lr_min=args.lr_range[0], lr_max=args.lr_range[1],
                        momentum_min=args.momentum_range[0], momentum_max=args.momentum_range[1],
                        weight_decay_min=args.weight_decay_range[0], weight_decay_max=args.weight_decay_range[1],
                        trainable_layers_min=args.trainable_layers_range[0],
                        trainable_layers_max=args.trainable_layers_range[1], batch_sizes=tuple(args.batch_sizes))
    config = HpoConfig(epochs=args.epochs, image_size=args.image_size, backbone=args.backbone, weights=args.weights,
                       weights_file=args.weights_file, optimizer=args.optimizer, workers=args.workers,
                       warmup_iters=args.warmup_iters, objective=args.objective, seed=args.seed, label_map=label_map,
                       default_trial=args.default_trial)
    device = resolve_device(args.device)
    seen = {}  # the training and validation files' sha256 by path, as the study read them
    result = run_study(config, space, args.train_images, args.train_annotations, args.val_images,
                       args.val_annotations, journal=args.checkpoint, n_trials=args.n_trials, device=device,
                       study_name=args.study_name, worker_index=args.worker_index,
                       num_workers=args.num_workers, timeout=args.timeout,
                       pruner_startup_trials=args.pruner_startup_trials,
                       pruner_warmup_epochs=args.pruner_warmup_epochs, tensorboard_dir=args.tensorboard_dir,
                       inputs_seen=seen, skipped_listed_in=output)
    write_json(output, result)
    if args.tensorboard_tar:
        pack_events(args.tensorboard_dir, args.tensorboard_tar)
    write_run_record(record, "hpo", {**vars(args), "device": str(device),
                                     "trial_counts": result["trial_counts"], "best_value": result["best_value"],
                                     "trials_resumed": result["trials_resumed"],
                                     # trials a killed try left running, run again: a resumed run even at 0 finished
                                     "requeued_stale_trials": result["requeued_stale_trials"]},
                     [*seen, *files_named(weights_file_given(args.weights, args.weights_file))], seen)
    counts = result["trial_counts"]
    best = (f"best {result['objective']} {result['best_value']:.4f} with {result['best_params']}"
            if result["best_value"] is not None else "no completed trial")
    print(f"hpo: worker {args.worker_index}/{args.num_workers}: {counts['complete']} complete, "
          f"{counts['pruned']} pruned, {counts['fail']} failed; {best}; wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main, get_args_parser()))
