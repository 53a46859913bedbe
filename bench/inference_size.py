#!/usr/bin/env python3
"""A trained model at its training size against the working size chosen on validation (issue #21).

For each --model (a model file bin/train.py wrote, with its own held-out validation set and test set):
do what bin/train.py now does after training, on the validation images only: try the working sizes of
utils.detection.inference_size (1x-2x the training size), keep the smallest within the tolerance of the
best fitness, then at that size keep flip TTA if it beats the plain pass by more than the same tolerance
(--no-tta-choice: not tried, as before 2026-12-05), then box voting by the same rule (--no-box-voting-choice:
not tried, as before 2026-12-07), and choose the score threshold and the compliance estimators' rates again the
way the model will run.
With --checkpoint the run's last epoch is measured in place of the epoch the model file kept (--keep best);
its "as stored" row then runs with the kept epoch's stored threshold, rates, TTA and box voting setting.
Then evaluate the test images with the job's own code (utils.detection.evaluation.evaluate_model), once
as the model file was (its training size, its stored threshold, rates, TTA and box voting) and once as chosen, and print
one table: mAP, mAP@0.5, AP50 per class, mAR@100, the compliance error at the threshold, the headline
estimate with its interval and error, per-image MAE, and test images/s of the inference pass. The test
split is only reported on. With --output the rows are saved as JSON.

  .venv/bin/python bench/inference_size.py --model runs/real60_rf/outputs/model.pt \
      --val runs/real60_rf/scratch/preprocess_val/val_set.tar \
      --test runs/real60_rf/scratch/preprocess_test/test_set.tar --output bench/results/inference_size.json
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def evaluate(model, pairs, threshold, calibration, folder, tta=False):
    import torch

    from utils.detection.evaluation import evaluate_model

    started = time.perf_counter()
    result = evaluate_model(model, pairs, folder, device=torch.device("cpu"), score_threshold=threshold,
                            num_workers=0, calibration=calibration, tta=tta)
    seconds = time.perf_counter() - started
    report = result.report
    estimate = report["quantification"]["estimate"]
    return {"map": report["map"], "map_50": report["map_50"], "mar_100": report["mar_100"],
            "ap50_per_class": {name: entry["ap_50"] for name, entry in report["per_class"].items()},
            "score_threshold": threshold, "compliance_error_points": report["compliance"]["error_points"],
            "per_image_mae_points": report["compliance"]["per_image_mae_points"],
            "headline": {key: estimate.get(key) for key in ("method", "percent", "low", "high", "error_points",
                                                            "truth_inside", "units")},
            "evaluate_s": round(seconds, 1)}


def last_epoch_state(checkpoint: Path) -> tuple[dict, int]:
    """(the weights a model file of the checkpoint's last epoch would hold: the EMA's when it kept one, the epoch)."""
    from utils.detection.checkpoint import load_checkpoint

    payload = load_checkpoint(checkpoint)
    ema = (payload.get("extra") or {}).get("ema")
    if ema is not None:  # torch.optim.swa_utils.AveragedModel: the averaged copy under "module."
        state = {key[len("module."):]: value for key, value in ema.items() if key.startswith("module.")}
        return state, payload["epoch"]
    return payload["model"], payload["epoch"]


def measure(model_path: Path, val: Path, test: Path, tta_choice: bool = True, checkpoint: Path | None = None,
            voting_choice: bool = True) -> dict:
    import torch

    from utils import defaults as D
    from utils.data.pairs import open_folder
    from utils.detection.compliance import choose_operating_threshold
    from utils.detection.engine import run_inference
    from utils.detection.evaluation import evaluation_loader, labelled_pairs, load_trained_model
    from utils.detection.inference import set_box_voting
    from utils.detection.inference_size import choose_box_voting, choose_inference_size, choose_tta, set_inference_size
    from utils.detection.quantify import calibration_record

    device = torch.device("cpu")
    model, meta, stored_threshold, _ = load_trained_model(model_path, device, working_size=meta_size(model_path))
    trained_size = meta["image_size"]
    weights = f"kept epoch {meta.get('kept_weights', {}).get('epoch', 'last')}"
    if checkpoint is not None:  # the run's last epoch instead of the weights the model file kept
        state, epoch = last_epoch_state(checkpoint)
        model.load_state_dict(state)
        weights = f"last epoch {epoch} ({checkpoint.name})"
    with open_folder(val) as val_dir, open_folder(test) as test_dir, tempfile.TemporaryDirectory() as scratch:
        val_pairs, _ = labelled_pairs(val_dir, val_dir)
        test_pairs, _ = labelled_pairs(test_dir, test_dir)
        print(f"{model_path}, {weights}: trained at {trained_size} px; {len(val_pairs)} validation, "
              f"{len(test_pairs)} test images", flush=True)
        before = evaluate(model, test_pairs, stored_threshold, meta.get("quantification"), Path(scratch) / "before",
                          tta=meta["tta"])
        print(f"  as stored: {json.dumps(before)}", flush=True)
        set_box_voting(model, None)  # the choice starts from NMS alone, as train's: the stored voting is the row's
        val_loader = evaluation_loader(val_pairs, num_workers=0)
        started = time.perf_counter()
        size, (preds, targets) = choose_inference_size(model, lambda: run_inference(model, val_loader, device),
                                                       trained_size)
        if tta_choice:
            tta, (preds, targets) = choose_tta((preds, targets), run_inference(model, val_loader, device, tta=True))
            size = {**size, **tta}
        if voting_choice:
            set_box_voting(model, D.BOX_VOTE_IOU)
            voted = run_inference(model, val_loader, device, tta=size.get("tta", False))
            voting, (preds, targets) = choose_box_voting((preds, targets), voted)
            set_box_voting(model, D.BOX_VOTE_IOU if voting["box_voting"] else None)
            size = {**size, **voting}
        choice = choose_operating_threshold(preds, targets)
        calibration = calibration_record(preds, targets, choice["score_threshold"], tta=size.get("tta", False),
                                         working_size=size["image_size"])
        choose_s = time.perf_counter() - started
        print(f"  chosen on validation in {choose_s:.0f} s: {size['image_size']} px, flip TTA "
              f"{size.get('tta_fitness', 'not tried')}, box voting {size.get('box_voting_fitness', 'not tried')}, "
              f"threshold {choice['score_threshold']:g}; "
              f"{json.dumps(size['candidates'])}", flush=True)
        after = evaluate(model, test_pairs, choice["score_threshold"], calibration, Path(scratch) / "after",
                         tta=size.get("tta", False))
        print(f"  as chosen: {json.dumps(after)}", flush=True)
        set_inference_size(model, trained_size)
        set_box_voting(model, None)
    return {"model": str(model_path), "weights": weights, "trained_size": trained_size, "val_images": len(val_pairs),
            "test_images": len(test_pairs), "chosen": size, "threshold_choice": choice["score_threshold"],
            "choose_s": round(choose_s, 1), "stored": before, "chosen_on_validation": after}


def meta_size(model_path: Path) -> int:
    """The training size of a model file (older files hold no chosen working size: this is what they ran at)."""
    from utils.detection.model_file import read_model_payload
    from utils.detection.model import BACKBONES

    return read_model_payload(model_path, BACKBONES)[1]["image_size"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, nargs="+", required=True, help="model files written by bin/train.py")
    p.add_argument("--val", type=Path, nargs="+", required=True, help="each model's validation set (folder or .tar)")
    p.add_argument("--test", type=Path, nargs="+", required=True, help="each model's test set (folder or .tar)")
    p.add_argument("--checkpoint", type=Path, nargs="+", default=None,
                   help="per --model, its run's training checkpoint: measure the last epoch's weights (the EMA's "
                        "when kept) instead of those the model file kept, e.g. against --keep best (default: the "
                        "model file's)")
    p.add_argument("--output", type=Path, default=None, help="JSON file for the rows (default: printed only)")
    p.add_argument("--no-tta-choice", dest="tta_choice", action="store_false",
                   help="choose the working size only, as bin/train.py did before 2026-12-05 (what "
                        "bench/results/inference_size.json was written with) (default: the size, then flip TTA)")
    p.add_argument("--no-box-voting-choice", dest="voting_choice", action="store_false",
                   help="do not try box voting, as bin/train.py did before 2026-12-07 (default: try it after TTA)")
    args = p.parse_args()
    if not len(args.model) == len(args.val) == len(args.test):
        p.error("give one --val and one --test per --model")
    if args.checkpoint is not None and len(args.checkpoint) != len(args.model):
        p.error("give one --checkpoint per --model")
    import torch

    checkpoints = args.checkpoint or [None] * len(args.model)
    rows = [measure(model, val, test, args.tta_choice, checkpoint, args.voting_choice)
            for model, val, test, checkpoint in zip(args.model, args.val, args.test, checkpoints)]
    print("\n| model | working size | threshold | mAP | mAP@0.5 | AP50 with / without / incorrect | mAR@100 | "
          "compliance error | headline (interval) | per-image MAE |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        for label, figures, size in (("as stored", row["stored"], row["trained_size"]),
                                     ("chosen on validation", row["chosen_on_validation"],
                                      row["chosen"]["image_size"])):
            ap = figures["ap50_per_class"]
            head = figures["headline"]
            print(f"| {Path(row['model']).parent.parent.name} {row['weights']} {label} | {size} px | "
                  f"{figures['score_threshold']:g} | "
                  f"{figures['map']:.3f} | {figures['map_50']:.3f} | {ap['with_mask']:.3f} / "
                  f"{ap['without_mask']:.3f} / {ap['mask_weared_incorrect']:.3f} | {figures['mar_100']:.3f} | "
                  f"{figures['compliance_error_points']:+.1f} | {head['method']} {head['percent']:.1f} "
                  f"({head['low']:.1f}-{head['high']:.1f}), {head['error_points']:+.1f}, "
                  f"{'inside' if head['truth_inside'] else 'OUTSIDE'} | {figures['per_image_mae_points']:.1f} |")
    if args.output:
        from utils.atomic import write_json

        write_json(args.output, {"rows": rows, "torch": torch.__version__, "python": platform.python_version(),
                                 "cpus": torch.get_num_threads()})
        print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
