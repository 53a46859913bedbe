#!/usr/bin/env python3
"""Box voting (utils/detection/inference.py: VotingRoIHeads) on a trained model, measured as evaluate measures.

Runs the evaluate job's code (evaluation.evaluate_model: the model at its working size, flip TTA and threshold as
the model file says) over a labelled set (--val; --test too, to report only) without box voting and with it at
each --ious value, and prints mAP, mAP@0.5, mAP@0.75, mAR@100, the share of faces found at IoU 0.5 / 0.75 / 0.9
(any class), the compliance error of the count at the threshold (cc) and of the headline estimate, and the
seconds each pass took. With --output the rows are saved as JSON.

  .venv/bin/python bench/box_voting.py --model RUN/outputs/model.pt \\
      --val RUN/scratch/preprocess_val --test RUN/scratch/evaluate/test_set.tar \\
      --output bench/results/box_voting.json

Exit 0; 2 (one line) on a bad flag, a model file or a set that cannot be read.
"""

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def vote_ious(text: str) -> list[float]:
    values = [float(part) for part in text.split(",") if part.strip()]
    if not values or any(not 0.0 < value <= 1.0 for value in values):
        raise argparse.ArgumentTypeError(f"expected IoUs in (0, 1] separated by commas, got {text!r}")
    return values


def evaluate_once(model, meta: dict, threshold: float, pairs) -> dict:
    """One evaluation of *model* on *pairs*, as bin/evaluate.py runs it; the row's figures."""
    from utils.detection.evaluation import evaluate_model

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        report = evaluate_model(model, pairs, Path(folder), device="cpu", score_threshold=threshold, num_workers=0,
                                calibration=meta.get("quantification"), tta=meta["tta"]).report
    seconds = time.perf_counter() - started
    found = dict(zip(report["recall_by_iou"]["iou_thresholds"], report["recall_by_iou"]["any_class"]))
    quantification = report["quantification"]
    headline = quantification["estimates"][quantification["estimate"]["method"]]
    return {"map": report["map"], "map_50": report["map_50"], "map_75": report["map_75"],
            "mar_100": report["mar_100"],
            "ap50_per_class": {name: entry["ap_50"] for name, entry in report["per_class"].items()},
            "found_at_iou": {iou: found[iou] for iou in (0.5, 0.75, 0.9)},
            "cc_error_points": quantification["estimates"]["cc"].get("error_points"),
            "headline": quantification["estimate"]["method"], "headline_percent": headline.get("percent"),
            "headline_error_points": headline.get("error_points"), "true_percent": quantification["true_percent"],
            "images": report["num_images"], "seconds": round(seconds, 1)}


def open_model_and_sets(parser, stack, model_path: Path, splits, **load_options):
    """(model, meta, threshold, [(split, pairs)]) on the CPU, each set opened in *stack* (a .tar unpacked while its
    rows run); a model or a set that cannot be used is said in one line (parser.error) before any pass runs, not
    after the validation rows. *load_options* go to evaluation.load_trained_model (e.g. box_voting=False)."""
    import torch

    from utils.cli import error_message
    from utils.data.pairs import open_folder
    from utils.detection.evaluation import labelled_pairs, load_trained_model

    try:
        model, meta, threshold, _ = load_trained_model(model_path, torch.device("cpu"), **load_options)
        sets = []
        for split, path in splits:
            folder = stack.enter_context(open_folder(path))
            sets.append((split, labelled_pairs(folder, folder)[0]))
    except (ValueError, OSError) as error:  # InputError is a ValueError: a model file or set it cannot read
        parser.error(error_message(error))
    return model, meta, threshold, sets


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="a model file written by bin/train.py")
    p.add_argument("--val", type=Path, required=True, help="its validation set (folder or .tar)")
    p.add_argument("--test", type=Path, default=None, help="its test set, reported only (default: none)")
    p.add_argument("--ious", type=vote_ious, default=[0.6, 0.7, 0.8],
                   help="the vote IoUs tried, comma-separated (default: 0.6,0.7,0.8)")
    p.add_argument("--output", type=Path, default=None, help="JSON file for the rows (default: printed only)")
    args = p.parse_args()
    for path in (args.model, args.val, *([args.test] if args.test else [])):
        if not path.exists():
            p.error(f"{path}: not found")
    import torch

    from utils.detection.inference import set_box_voting
    from utils.detection.metrics import fitness

    splits = [("validation", args.val)] + ([("test", args.test)] if args.test else [])
    with contextlib.ExitStack() as stack:
        model, meta, threshold, sets = open_model_and_sets(p, stack, args.model, splits, box_voting=False)
        rows = []
        for split, pairs in sets:
            for vote_iou in [None, *args.ious]:
                set_box_voting(model, vote_iou)
                row = {"split": split, "box_vote_iou": vote_iou, **evaluate_once(model, meta, threshold, pairs)}
                row["fitness"] = fitness(row)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{args.model}: working size {meta['working_size']} px, flip TTA {'on' if meta['tta'] else 'off'}, "
          f"score threshold {threshold:g}")
    print("| set | box voting | mAP | mAP@0.5 | mAP@0.75 | mAR@100 | found at IoU 0.5 / 0.75 / 0.9 | fitness | "
          "cc error | headline error | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        found = row["found_at_iou"]
        print(f"| {row['split']} ({row['images']}) | {row['box_vote_iou'] or 'none'} | {row['map']:.3f} | "
              f"{row['map_50']:.3f} | {row['map_75']:.3f} | {row['mar_100']:.3f} | {found[0.5]:.3f} / "
              f"{found[0.75]:.3f} / {found[0.9]:.3f} | {row['fitness']:.4f} | {row['cc_error_points']:+.1f} | "
              f"{row['headline_error_points']:+.1f} | {row['seconds']:.1f} |")
    if args.output:
        from utils.atomic import write_json

        write_json(args.output, {"model": str(args.model), "working_size": meta["working_size"], "tta": meta["tta"],
                                 "score_threshold": threshold, "rows": rows, "torch": torch.__version__,
                                 "python": platform.python_version(), "threads": torch.get_num_threads()})
        print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
