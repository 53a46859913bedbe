#!/usr/bin/env python3
"""Optuna hyperparameter search for the face-mask detector (one worker of K).

Each trial trains for --epochs epochs and is scored after every epoch on the
validation set in eval mode (fitness 0.1*mAP@0.5 + 0.9*mAP@0.5:0.95 by default);
a MedianPruner stops poor trials early. The study lives in an Optuna journal at
--checkpoint: rerunning continues it (trials left running by a killed job are
failed and their parameters enqueued again) and --n-trials is the total number
of finished trials wanted, not the number of new ones. With --num-workers K,
worker --worker-index I searches the I-th slice of the log learning-rate range
with sampler seed --seed + I; bin/hpo_merge.py combines the workers' results.
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.atomic import write_json  # noqa: E402
from utils.detection.engine import resolve_device  # noqa: E402
from utils.detection.hpo import OBJECTIVES, HpoConfig, HpoError, SearchSpace, run_study  # noqa: E402
from utils.detection.model import BACKBONES, ModelError  # noqa: E402
from utils.provenance import write_run_record  # noqa: E402

SPACE = SearchSpace()
CONFIG = HpoConfig()


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-images", required=True, help="training images: folder or .tar")
    p.add_argument("--train-annotations", required=True, help="training VOC annotations: folder or .tar")
    p.add_argument("--val-images", required=True, help="validation images: folder or .tar")
    p.add_argument("--val-annotations", required=True, help="validation VOC annotations: folder or .tar")
    p.add_argument("--epochs", type=int, default=CONFIG.epochs, help=f"epochs per trial (default: {CONFIG.epochs})")
    p.add_argument("--image-size", type=int, default=CONFIG.image_size,
                   help=f"longer image side in px (default: {CONFIG.image_size})")
    p.add_argument("--n-trials", type=int, default=10,
                   help="finished (complete + pruned) trials this worker's study should hold in total (default: 10)")
    p.add_argument("--seed", type=int, default=CONFIG.seed,
                   help="training seed; the sampler uses seed + worker index (default: 0)")
    p.add_argument("--checkpoint", default="hpo.journal",
                   help="Optuna journal file; an existing one is continued (default: hpo.journal)")
    p.add_argument("--output", default="best.json", help="this worker's result (default: best.json)")
    p.add_argument("--worker-index", type=int, default=0, help="this worker's index I in 0..K-1 (default: 0)")
    p.add_argument("--num-workers", type=int, default=1, help="number of HPO workers K (default: 1)")
    p.add_argument("--backbone", choices=BACKBONES, default=CONFIG.backbone,
                   help=f"detector backbone (default: {CONFIG.backbone})")
    p.add_argument("--weights", default=CONFIG.weights,
                   help="pretrained weights: none, imagenet, coco or a file PATH (default: imagenet)")
    p.add_argument("--weights-file", default=None,
                   help="explicit pretrained weight file (default: torchvision's cache)")
    p.add_argument("--timeout", type=float, default=None,
                   help="stop starting new trials after this many seconds (default: no limit)")
    p.add_argument("--study-name", default=None,
                   help="Optuna study name (default: mask-hpo-worker<I>of<K>)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--objective", choices=sorted(OBJECTIVES), default=CONFIG.objective,
                   help="fitness = 0.1*mAP50 + 0.9*mAP50-95, or map = mAP50-95 (default: fitness)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default=CONFIG.optimizer,
                   help="optimizer of every trial (default: sgd)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=list(SPACE.batch_sizes),
                   help="batch size, or several to search among (default: 4)")
    p.add_argument("--workers", type=int, default=CONFIG.workers,
                   help="data-loading worker processes; -1: none on a CPU, a few on a GPU (default: -1)")
    p.add_argument("--warmup-iters", type=int, default=CONFIG.warmup_iters,
                   help=f"learning-rate warm-up iterations per trial (default: {CONFIG.warmup_iters})")
    p.add_argument("--lr-range", type=float, nargs=2, default=[SPACE.lr_min, SPACE.lr_max], metavar=("MIN", "MAX"),
                   help=f"whole learning-rate range, log scale, split between workers "
                        f"(default: {SPACE.lr_min} {SPACE.lr_max})")
    p.add_argument("--momentum-range", type=float, nargs=2, default=[SPACE.momentum_min, SPACE.momentum_max],
                   metavar=("MIN", "MAX"), help="momentum range (default: 0.8 0.95)")
    p.add_argument("--weight-decay-range", type=float, nargs=2, metavar=("MIN", "MAX"),
                   default=[SPACE.weight_decay_min, SPACE.weight_decay_max],
                   help="weight-decay range, log scale (default: 1e-05 0.001)")
    p.add_argument("--trainable-layers-range", type=int, nargs=2, metavar=("MIN", "MAX"),
                   default=[SPACE.trainable_layers_min, SPACE.trainable_layers_max],
                   help="trainable backbone stages range (default: 1 5)")
    p.add_argument("--pruner-startup-trials", type=int, default=2,
                   help="completed trials before the MedianPruner prunes (default: 2)")
    p.add_argument("--pruner-warmup-epochs", type=int, default=0,
                   help="epochs of a trial before it can be pruned (default: 0)")
    p.add_argument("--run-record", default=None,
                   help="run record JSON (default: <output stem>_run.json next to --output)")
    return p


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("optuna").setLevel(logging.WARNING)
    space = SearchSpace(lr_min=args.lr_range[0], lr_max=args.lr_range[1],
                        momentum_min=args.momentum_range[0], momentum_max=args.momentum_range[1],
                        weight_decay_min=args.weight_decay_range[0], weight_decay_max=args.weight_decay_range[1],
                        trainable_layers_min=args.trainable_layers_range[0],
                        trainable_layers_max=args.trainable_layers_range[1], batch_sizes=tuple(args.batch_sizes))
    config = HpoConfig(epochs=args.epochs, image_size=args.image_size, backbone=args.backbone, weights=args.weights,
                       weights_file=args.weights_file, optimizer=args.optimizer, workers=args.workers,
                       warmup_iters=args.warmup_iters, objective=args.objective, seed=args.seed)
    try:
        device = resolve_device(args.device)
        result = run_study(config, space, args.train_images, args.train_annotations, args.val_images,
                           args.val_annotations, journal=args.checkpoint, n_trials=args.n_trials, device=device,
                           study_name=args.study_name, worker_index=args.worker_index,
                           num_workers=args.num_workers, timeout=args.timeout,
                           pruner_startup_trials=args.pruner_startup_trials,
                           pruner_warmup_epochs=args.pruner_warmup_epochs)
    except (HpoError, ModelError, FileNotFoundError, NotADirectoryError, ValueError, RuntimeError) as error:
        print(f"hpo: error: {error}", file=sys.stderr)
        return 2
    output = Path(args.output)
    write_json(output, result)
    record = Path(args.run_record) if args.run_record else output.with_name(f"{output.stem}_run.json")
    write_run_record(record, "hpo", {**vars(args), "device": str(device),
                                     "trial_counts": result["trial_counts"], "best_value": result["best_value"]})
    counts = result["trial_counts"]
    best = (f"best {result['objective']} {result['best_value']:.4f} with {result['best_params']}"
            if result["best_value"] is not None else "no completed trial")
    print(f"hpo: worker {args.worker_index}/{args.num_workers}: {counts['complete']} complete, "
          f"{counts['pruned']} pruned, {counts['fail']} failed; {best}; wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
