#!/usr/bin/env python3
"""The detections-per-image cap (utils/defaults.py: DETECTIONS_PER_IMAGE) on a trained model, measured as evaluate
measures.

For each --caps value, runs the evaluate job's code (box_voting.evaluate_once: the model at its working size, flip
TTA, box voting and threshold as the model file says) over a labelled set (--val; --test too, to report only), and
counts the images whose detections, or whose plain or flipped pass's, reach the cap (images_at_cap): a pass at the
cap cut boxes at or above the detection floor, which the score-sum estimators and the recall count.
Prints mAP, mAP@0.5, mAR@100, the compliance errors and those images; with --output the rows are saved as JSON.

  .venv/bin/python bench/detections_cap.py --model RUN/outputs/model.pt \\
      --val RUN/scratch/preprocess_val --test RUN/scratch/evaluate/test_set.tar \\
      --output bench/results/detections_cap.json

Exit 0; 2 (one line) on a bad flag, a model file or a set that cannot be read.
"""

import argparse
import contextlib
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from box_voting import evaluate_once, open_model_and_sets  # noqa: E402  (bench/ is the script's own folder, first on sys.path)


def caps_arg(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"expected whole numbers of at least 1 separated by commas, got {text!r}")
    return values


def images_at_cap(model, pairs, tta: bool, cap: int) -> list[dict]:
    """The images a cap of *cap* may have cut: those whose detections, or one of whose passes' (the plain and, with
    flip TTA, the flipped one, before weighted box fusion), reach it. Each: its index and file, labelled faces,
    detections and lowest kept score, each pass's detections, and whether boxes at or above the detection floor
    may have been cut (``cut_above_floor``): a pass at the cap always cut some, since the model emits no box under
    its score threshold (the floor); with TTA the fused boxes' lowest score alone cannot tell (a box one pass found
    scores about half its score), so it decides only where no pass reached the cap. The images are run one at a
    time (evaluate runs them in batches of one size: the same detections) so that each pass is the image's own."""
    import torch

    from utils import defaults as D
    from utils.detection.engine import run_inference
    from utils.detection.evaluation import evaluation_loader

    loader = evaluation_loader(pairs, batch_size=1, num_workers=0, device=torch.device("cpu"))
    passes: list[list[dict]] = []

    def one_at_a_time():  # each image's passes recorded apart: run_inference runs a batch before asking the next
        for batch in loader:
            passes.append([])
            yield batch

    hook = model.roi_heads.register_forward_hook(lambda _heads, _inputs, output: passes[-1].extend(output[0]))
    try:
        preds, targets = run_inference(model, one_at_a_time(), torch.device("cpu"), tta=tta)
    finally:
        hook.remove()
    rows = []
    for index, (pair, pred, target, ran) in enumerate(zip(pairs, preds, targets, passes, strict=True)):
        counts = [len(out["scores"]) for out in ran]
        if len(pred["scores"]) < cap and all(count < cap for count in counts):
            continue
        lowest = float(pred["scores"].min()) if len(pred["scores"]) else None
        rows.append({"image": index, "file": pair.image.name, "detections": len(pred["scores"]),
                     "faces": len(target["boxes"]), "lowest_score": None if lowest is None else round(lowest, 3),
                     "pass_detections": counts,
                     "cut_above_floor": any(count >= cap for count in counts)
                     or (len(pred["scores"]) >= cap and lowest >= D.DETECTION_FLOOR)})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="a model file written by bin/train.py")
    p.add_argument("--val", type=Path, required=True, help="its validation set (folder or .tar)")
    p.add_argument("--test", type=Path, default=None, help="its test set, reported only (default: none)")
    p.add_argument("--caps", type=caps_arg, default=[200, 1000],
                   help="the detections-per-image caps tried, comma-separated (default: 200,1000)")
    p.add_argument("--output", type=Path, default=None, help="JSON file for the rows (default: printed only)")
    args = p.parse_args()
    for path in (args.model, args.val, *([args.test] if args.test else [])):
        if not path.exists():
            p.error(f"{path}: not found")
    import torch

    from utils import defaults as D
    from utils.detection.metrics import fitness

    splits = [("validation", args.val)] + ([("test", args.test)] if args.test else [])
    with contextlib.ExitStack() as stack:
        model, meta, threshold, sets = open_model_and_sets(p, stack, args.model, splits)
        rows = []
        for split, pairs in sets:
            for cap in args.caps:
                model.roi_heads.detections_per_img = cap
                row = {"split": split, "cap": cap, **evaluate_once(model, meta, threshold, pairs),
                       "at_cap": images_at_cap(model, pairs, meta["tta"], cap)}
                row["fitness"] = fitness(row)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{args.model}: working size {meta['working_size']} px, flip TTA {'on' if meta['tta'] else 'off'}, "
          f"box voting {'on' if meta['box_voting'] else 'off'}, score threshold {threshold:g}, detection floor "
          f"{D.DETECTION_FLOOR:g}")
    print("| set | cap | mAP | mAP@0.5 | mAR@100 | cc error | headline error | "
          "images at the cap (lowest kept score; each pass's detections) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        capped = ", ".join(f"{entry['faces']} faces ({entry['lowest_score']}; passes "
                           f"{'/'.join(map(str, entry['pass_detections']))}"
                           f"{', cut above the floor' if entry['cut_above_floor'] else ''})"
                           for entry in row["at_cap"]) or "none"
        print(f"| {row['split']} ({row['images']}) | {row['cap']} | {row['map']:.3f} | {row['map_50']:.3f} | "
              f"{row['mar_100']:.3f} | {row['cc_error_points']:+.1f} | {row['headline_error_points']:+.1f} | "
              f"{capped} |")
    if args.output:
        from utils.atomic import write_json

        write_json(args.output, {"model": str(args.model), "working_size": meta["working_size"], "tta": meta["tta"],
                                 "box_voting": meta["box_voting"], "score_threshold": threshold,
                                 "detection_floor": D.DETECTION_FLOOR, "rows": rows, "torch": torch.__version__,
                                 "python": platform.python_version(), "threads": torch.get_num_threads()})
        print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
