#!/usr/bin/env python3
"""Detection quality under a fixed CPU budget: train on the train split, report test mAP and compliance error.

For each data set (the real face-mask data at --data, and synthetic sample data
made by utils.data.sample_data): validate it (utils.data.validation), split it 70/10/20 with
near-duplicates kept together (utils.data.split), train mobilenet_v2_fpn with ImageNet
weights on the train split only for --epochs epochs around --image-size (today's recipe: each image's
longer side drawn from 0.5 to 1.5 times it), then report
COCO mAP (0.5:0.95), mAP@0.5, mAP@0.75 and AP per class on the test split
(predictions in eval mode, torchmetrics/faster-coco-eval via utils.detection.metrics), and
the compliance error on the test split at the score threshold chosen on the validation
split as bin/train.py chooses it (utils.detection.compliance), with the wall time of each
phase. Whatever comes out is reported as it is; the test split is only reported on.

The budget is set by flags: --time-budget MINUTES fits the epochs to the minutes as
bin/train.py does (else --epochs), plus --image-size, --limit, --sample-images.
--ablation trains one model per row of ABLATION, each row adding one lever to the
levers of the rows kept so far, each in the same --time-budget, on the real data only,
and prints one table. A change is kept when it raises the validation F1 at the chosen
threshold (the test split is only reported on). --compare NAME trains one model per
row of COMPARISONS[NAME], each a change on the defaults it was measured with (not
cumulative), and adds mAR@100 and the training images/s to the table (--compare first-stage: the WIDER FACE
RetinaFace first stage against the ImageNet MobileNetV2 one). With --output, every
finished row is saved and a rerun continues after the last one. Run it in the background:
  nohup .venv/bin/python bench/quality.py --output runs/bench/quality.json > runs/bench/quality.log 2>&1 &
  nohup .venv/bin/python bench/quality.py --ablation --time-budget 12 --output runs/bench/ablation.json \
        > runs/bench/ablation.log 2>&1 &
  nohup .venv/bin/python bench/quality.py --compare first-stage --time-budget 15 \
        --output bench/results/first_stage.json > runs/bench/first_stage.log 2>&1 &
"""

import argparse
import contextlib
import io
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "face-mask"

# The ablation's rows: each adds one lever (TrainParams fields) to the row above it. The first row is
# the recipe before issue #9 (horizontal flips only); the levers are utils.detection.recipe's.
ABLATION = (
    ("baseline: flips only", {"photometric": 0.0, "multiscale": 0.0, "repeat_threshold": 0.0, "ema_decay": 0.0,
                              "roi_batch_size": None}),
    ("+ repeat-factor sampling t=0.3", {"repeat_threshold": 0.3}),
    ("+ photometric distortion p=0.5", {"photometric": 0.5}),
    ("+ multi-scale training ±25 %", {"multiscale": 0.25}),
    ("+ weight EMA 0.998", {"ema_decay": 0.998}),
    ("+ 128 RoIs/image in the box loss", {"roi_batch_size": 128}),
)

# Side-by-side comparisons (--compare NAME): each row is one TrainParams change on the defaults of the day it was
# measured, trained in the same --time-budget on the same split; unlike ABLATION's rows, none builds on another.
# They predate multi-scale training as a default (2026-12-05, bench/RESULTS.md "Multi-scale training at 60
# minutes"), so every row runs with it off (AS_MEASURED), as recorded.
AS_MEASURED = {"multiscale": 0.0}

COMPARISONS = {
    # Issue #21: a face-pretrained first stage (utils/detection/retinaface.py) against today's ImageNet backbone.
    "first-stage": (
        ("today: mobilenet_v2_fpn, ImageNet backbone", {"backbone": "mobilenet_v2_fpn", "weights": "imagenet"}),
        ("(a) retinaface_mnet025: WIDER FACE backbone + RPN", {"backbone": "retinaface_mnet025",
                                                               "weights": "widerface"}),
        ("(c) = (a), face trunk frozen for the first third", {
            "backbone": "retinaface_mnet025", "weights": "widerface",
            "stages": [{"epochs": 1, "trainable_layers": 0, "name": "frozen trunk"},
                       {"epochs": 2, "trainable_layers": 3, "name": "fine-tune"}]}),
    ),
    # The levers the ablation rejected with the ImageNet backbone, when 15 minutes trained 2-3 epochs: with the
    # face-pretrained first stage the same minutes train 12, where augmentation and averaging may pay.
    "recipe-levers": (
        ("retinaface_mnet025, today's recipe", {"backbone": "retinaface_mnet025", "weights": "widerface"}),
        ("+ multi-scale training ±25 %", {"backbone": "retinaface_mnet025", "weights": "widerface",
                                          "multiscale": 0.25}),
        ("+ weight EMA 0.998", {"backbone": "retinaface_mnet025", "weights": "widerface", "ema_decay": 0.998}),
    ),
    # Two more changes on the same recipe, measured after it (the baseline row is recipe-levers' first): the
    # whole tiny trunk trained, and a larger working size for the small faces.
    "trunk-and-size": (
        ("+ all 5 trunk stages trained", {"backbone": "retinaface_mnet025", "weights": "widerface",
                                          "trainable_layers": 5}),
        ("+ 640 px", {"backbone": "retinaface_mnet025", "weights": "widerface", "image_size": 640}),
    ),
    # Multi-scale training won at 60 minutes and became the default (2026-12-05); does it cost at a short budget,
    # where it lost before (±25 %, 12 minutes)?
    "multiscale": (
        ("one size", {"backbone": "retinaface_mnet025", "weights": "widerface", "multiscale": 0.0}),
        ("multi-scale ±50 % (the default)", {"backbone": "retinaface_mnet025", "weights": "widerface",
                                             "multiscale": 0.5}),
    ),
    # mAR@100 falls short by box placement above IoU 0.75 (bench/RESULTS.md, "Where mAR@100 is lost"): two ways
    # of training the box head for tighter boxes, on the default recipe (multiscale's second row, run again).
    "box-tightness": (
        ("the default recipe", {"backbone": "retinaface_mnet025", "weights": "widerface", "multiscale": 0.5}),
        ("+ GIoU box loss", {"backbone": "retinaface_mnet025", "weights": "widerface", "multiscale": 0.5,
                             "box_loss": "giou"}),
        ("+ box head trained from IoU 0.6", {"backbone": "retinaface_mnet025", "weights": "widerface",
                                             "multiscale": 0.5, "roi_fg_iou": 0.6}),
        # measured after the three above: Cascade R-CNN's IoU without making the 0.5-0.6 proposals background
        ("+ faces from IoU 0.6, background below 0.5", {"backbone": "retinaface_mnet025", "weights": "widerface",
                                                        "multiscale": 0.5, "roi_fg_iou": 0.6, "roi_bg_iou": 0.5}),
    ),
    # Photometric distortion was rejected at 15 minutes with the ImageNet backbone (2-3 epochs, docs/recipe-history.md),
    # as multi-scale training was before it won at 60 minutes. With the face-pretrained first stage a longer budget
    # trains 20+ epochs, where colour and lighting changes may pay for the steps they cost.
    "photometric": (
        ("the default recipe", {"backbone": "retinaface_mnet025", "weights": "widerface", "multiscale": 0.5}),
        ("+ photometric distortion p=0.5", {"backbone": "retinaface_mnet025", "weights": "widerface",
                                            "multiscale": 0.5, "photometric": 0.5}),
    ),
}


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help=f"real data folder with images/ and annotations/ (default: {DEFAULT_DATA})")
    p.add_argument("--sets", nargs="+", choices=["real", "sample"], default=["real", "sample"],
                   help="data sets to run (default: real sample)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N real pairs (default: all)")
    p.add_argument("--sample-images", type=int, default=200, help="synthetic images to make (default: 200)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs without --time-budget (default: 3)")
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="fit the epochs to this many minutes of training, as bin/train.py --time-budget "
                        "(default: none, --epochs)")
    p.add_argument("--ablation", action="store_true",
                   help="one row per cumulative recipe change (ABLATION), real data only (default: off)")
    p.add_argument("--compare", choices=sorted(COMPARISONS), default=None,
                   help="one row per setting of COMPARISONS[NAME], each on the defaults it was measured with, "
                        "real data only (default: none)")
    p.add_argument("--rows", type=int, default=None,
                   help="with --ablation: only the first N rows (default: all)")
    p.add_argument("--image-size", type=int, default=512, help="longer image side in px (default: 512)")
    p.add_argument("--batch-size", type=int, default=4, help="images per batch (default: 4)")
    p.add_argument("--workers", type=int, default=-1,
                   help="DataLoader workers; -1: as bin/train.py chooses, none on a CPU (default: -1)")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default: 0.01)")
    p.add_argument("--trainable-layers", type=int, default=3, help="trainable backbone stages (default: 3)")
    p.add_argument("--seed", type=int, default=42, help="split and training seed (default: 42)")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"),
                   help="the budget is a CPU budget (default: cpu)")
    p.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    return p


def split_folder(images, annotations, seed):
    """(train pairs, test pairs, validation summary) via the project's validation and split."""
    from utils.data.pairs import Pair
    from utils.data.split import split_pairs
    from utils.data.validation import validate_dataset

    result = validate_dataset(images, annotations, progress=False)
    rows = split_pairs(result.clean_pairs, result.duplicate_groups, seed=seed)
    by_split = {"train": [], "val": [], "test": []}
    for row in rows:
        by_split[row["split"]].append(Pair(Path(row["image"]), Path(row["annotation"])))
    report = result.report
    summary = {"images_total": report.get("images_total"), "images_usable": report.get("images_usable"),
               "duplicate_groups": len(result.duplicate_groups),
               **{f"{name}_images": len(pairs) for name, pairs in by_split.items()}}
    return by_split["train"], by_split["val"], by_split["test"], summary


def run_one(name, images, annotations, args, device, limit=None, recipe=None):
    import torch

    from utils.detection.compliance import choose_operating_threshold, compliance_error
    from utils.detection.engine import run_inference
    from utils.detection.metrics import coco_map
    from utils.detection.params import describe
    from utils.detection.params import TrainParams
    from utils.detection.recipe import make_loader
    from utils.detection.training import Trainer

    started = time.perf_counter()
    train, val, test, summary = split_folder(images, annotations, args.seed)
    if limit:
        # keep the split's proportions when only part of the data is used
        ratio = limit / max(summary["images_usable"] or 1, 1)
        train, val, test = (part[: max(1, round(len(part) * ratio))] for part in (train, val, test))
    summary["prepare_s"] = round(time.perf_counter() - started, 1)
    print(f"[{name}] {summary}", flush=True)

    # a row's change may set any TrainParams field, the flags' ones included (e.g. lr)
    params = TrainParams(**{"backbone": "mobilenet_v2_fpn", "weights": "imagenet", "image_size": args.image_size,
                            "epochs": args.epochs, "batch_size": args.batch_size, "workers": args.workers,
                            "lr": args.lr, "trainable_layers": args.trainable_layers, "seed": args.seed,
                            "time_budget": args.time_budget, **(recipe or {})})
    print(f"[{name}] recipe: {describe(params)}", flush=True)
    started = time.perf_counter()
    # No per-epoch validation here: the budget is all training (the threshold is chosen after it).
    trainer = Trainer(params, train, device, progress=False)
    epochs = []
    while not trainer.finished:  # a time budget fits the plan's epochs in the first one
        row = trainer.run_epoch()
        epochs.append({"epoch": row.epoch, "train_loss": round(row.train_loss, 4),
                       "images_per_s": round(row.images_per_s, 3), "seconds": round(row.seconds, 1)})
        print(f"[{name}] epoch {row.epoch}/{trainer.plan.epochs}: loss {row.train_loss:.4f}, "
              f"{row.images_per_s:.2f} images/s, {row.seconds:.0f} s", flush=True)
    train_s = time.perf_counter() - started
    model = trainer.eval_model
    steps = trainer.steps_done()  # optimizer steps taken, over every stage (each stage has its own scheduler)
    epochs_trained = steps / len(trainer.train_loader)

    started = time.perf_counter()
    workers = max(args.workers, 0)
    # the operating threshold comes from the validation split, as bin/train.py chooses it
    chosen = choose_operating_threshold(*run_inference(model, make_loader(val, args.batch_size, workers,
                                                                          shuffle=False), device))
    preds, targets = run_inference(model, make_loader(test, args.batch_size, workers, shuffle=False), device)
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = coco_map(preds, targets)
    compliance = compliance_error(preds, targets, chosen["score_threshold"])
    eval_s = time.perf_counter() - started
    per_class = {cls: {"ap": v.get("ap"), "ap_50": v.get("ap_50")} for cls, v in metrics["per_class"].items()}
    # images/s over the whole training time, validation excluded (there is none here)
    images_per_s = steps * params.batch_size / train_s if train_s else None
    result = {"data": name, "recipe": describe(params), "params": params.to_dict(), **summary,
              "train_images": len(train), "test_images": len(test),
              "epochs": epochs, "steps": steps, "epochs_trained": round(epochs_trained, 2),
              "train_s": round(train_s, 1), "eval_s": round(eval_s, 1), "images_per_s": images_per_s,
              "map": metrics["map"], "map_50": metrics["map_50"], "map_75": metrics["map_75"],
              "mar_100": metrics["mar_100"],
              "per_class": per_class, "val_images": len(val), "score_threshold": chosen["score_threshold"],
              "val_f1": chosen["f1"], "val_candidates": chosen["candidates"], "compliance": compliance,
              "weights": trainer.model.weights_report.message,
              "torch_threads": torch.get_num_threads()}
    return result


def fmt(value):
    return "n/a" if value is None else f"{value:.3f}"


def fmt_pct(summary):
    value = summary["percent_properly_masked"]
    return "n/a" if value is None else f"{value:.1f}%"


def fmt_points(value, signed: bool = True):
    return "n/a" if value is None else f"{value:+.1f} points" if signed else f"{value:.1f} points"


def ablation_table(rows) -> str:
    """A Markdown table: one row per cumulative recipe change, test-split figures."""
    classes = list(rows[0]["per_class"]) if rows else []
    header = ["change (on the kept rows above)", "kept (val F1)", "epochs", "mAP", "mAP@0.5",
              *[f"AP50 {c}" for c in classes], "threshold (val)", "compliance error", "per-image MAE", "train min"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        c = r["compliance"]
        cells = [r["row"], f"{'yes' if r['kept'] else 'no'} ({r['val_f1']:.3f})", f"{r['epochs_trained']:.1f}",
                 fmt(r["map"]), fmt(r["map_50"]),
                 *[fmt(r["per_class"][cls]["ap_50"]) for cls in classes], f"{r['score_threshold']:.2f}",
                 fmt_points(c["error_points"]), fmt_points(c["per_image_mae_points"], signed=False),
                 f"{r['train_s'] / 60:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kept_recipe(rows) -> dict:
    """The levers of the kept rows, in order: the recipe the next row adds its change to."""
    recipe = {}
    for row in rows:
        if row["kept"]:
            recipe.update(row["change"])
    return recipe


def comparison_table(rows) -> str:
    """A Markdown table: one row per setting, test-split figures, validation F1 and training speed."""
    classes = list(rows[0]["per_class"]) if rows else []
    header = ["setting", "val F1", "epochs", "mAP", "mAP@0.5", *[f"AP50 {c}" for c in classes], "mAR@100",
              "threshold (val)", "compliance error", "per-image MAE", "train images/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        c = r["compliance"]
        cells = [r["row"], f"{r['val_f1']:.3f}", f"{r['epochs_trained']:.1f}", fmt(r["map"]), fmt(r["map_50"]),
                 *[fmt(r["per_class"][cls]["ap_50"]) for cls in classes], fmt(r["mar_100"]),
                 f"{r['score_threshold']:.2f}", fmt_points(c["error_points"]),
                 fmt_points(c["per_image_mae_points"], signed=False), f"{r['images_per_s']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rows_budget(args, device, model: str) -> str:
    """The line that says what every row of an ablation or comparison was given."""
    return (f"{model}image size {args.image_size}, "
            + (f"time budget {args.time_budget:g} min" if args.time_budget else f"{args.epochs} epochs")
            + f" per row, batch {args.batch_size}, SGD lr {args.lr}, seed {args.seed}, device {device}, "
            f"host {platform.node()}")


def finished_rows(args, key: str) -> list:
    """The rows an interrupted run already saved in --output: a rerun continues after the last one."""
    if not (args.output and args.output.is_file()):
        return []
    rows = json.loads(args.output.read_text(encoding="utf-8")).get(key, [])
    print(f"quality: {len(rows)} row(s) already in {args.output}; continuing", flush=True)
    return rows


def run_comparison(args, device) -> int:
    """Train one model per row of COMPARISONS[args.compare], each on the defaults it was measured with
    (AS_MEASURED), on the real data."""
    from utils.atomic import write_json

    if not (args.data / "images").is_dir():
        print(f"quality: {args.data}/images is absent; the comparison needs the real data")
        return 2
    budget = rows_budget(args, device, "")
    rows = finished_rows(args, "comparison")
    for label, change in COMPARISONS[args.compare][len(rows): args.rows]:
        result = run_one("real", args.data / "images", args.data / "annotations", args, device, args.limit,
                         {**AS_MEASURED, **change})
        rows.append({"row": label, "change": change, **result})
        print(f"\n{comparison_table(rows)}\n", flush=True)
        if args.output:
            write_json(args.output, {"budget": budget, "compare": args.compare, "comparison": rows})
    print(f"quality comparison {args.compare}: {budget}; test split of {args.data}, threshold chosen on the "
          "validation split")
    print(comparison_table(rows))
    return 0


def run_ablation(args, device) -> int:
    """Train one model per ABLATION row (each adds one lever to the row above), on the real data."""
    from utils.atomic import write_json

    if not (args.data / "images").is_dir():
        print(f"quality: {args.data}/images is absent; the ablation needs the real data")
        return 2
    budget = rows_budget(args, device, "mobilenet_v2_fpn (ImageNet backbone), ")
    rows = finished_rows(args, "ablation")
    for label, change in ABLATION[len(rows): args.rows]:
        base = kept_recipe(rows)
        result = run_one("real", args.data / "images", args.data / "annotations", args, device, args.limit,
                         {**base, **change})
        best = max((r["val_f1"] for r in rows if r["kept"]), default=None)
        # Keep a change only when it improves the validation split (the test split is only reported on).
        rows.append({"row": label, "change": change, "kept": best is None or result["val_f1"] > best, **result})
        print(f"\n{ablation_table(rows)}\n", flush=True)
        if args.output:  # after every row: a long run keeps what it has measured
            write_json(args.output, {"budget": budget, "ablation": rows})
    print(f"quality ablation: {budget}; test split of {args.data}, threshold chosen on the validation split")
    print(ablation_table(rows))
    return 0


def main(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from utils.detection.device import resolve_device

    device = resolve_device(args.device)
    if args.ablation:
        return run_ablation(args, device)
    if args.compare:
        return run_comparison(args, device)
    results = []
    for name in args.sets:
        with contextlib.ExitStack() as stack:
            if name == "real":
                if not (args.data / "images").is_dir():
                    print(f"quality: real data skipped: {args.data}/images is absent")
                    continue
                images, annotations = args.data / "images", args.data / "annotations"
                limit = args.limit
            else:
                from utils.data.sample_data import make_sample_dataset

                folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_quality_")))
                make_sample_dataset(folder, num_images=args.sample_images, seed=args.seed)
                images, annotations, limit = folder / "images", folder / "annotations", None
            results.append(run_one(name, images, annotations, args, device, limit))

    budget = (f"mobilenet_v2_fpn (ImageNet backbone), image size {args.image_size}, {args.epochs} epochs, "
              f"batch {args.batch_size}, SGD lr {args.lr}, device {device}, host {platform.node()}")
    print(f"\nquality: {budget}")
    for r in results:
        per_class = ", ".join(f"{cls} {fmt(v['ap'])} (AP50 {fmt(v['ap_50'])})" for cls, v in r["per_class"].items())
        print(f"{r['data']}: train {r['train_images']} images, test {r['test_images']} images: "
              f"mAP {fmt(r['map'])}, mAP@0.5 {fmt(r['map_50'])}, mAP@0.75 {fmt(r['map_75'])}; AP per class: "
              f"{per_class}; training {r['train_s'] / 60:.1f} min, evaluation {r['eval_s']:.0f} s")
        c = r["compliance"]
        print(f"  compliance at the threshold chosen on {r['val_images']} validation images "
              f"({r['score_threshold']:.2f}, val F1 {r['val_f1']:.3f}): true {fmt_pct(c['true'])}, "
              f"predicted {fmt_pct(c['predicted'])}, error {fmt_points(c['error_points'])}, per-image MAE "
              f"{fmt_points(c['per_image_mae_points'], signed=False)} over {c['images_compared']} images")
    if args.output:
        from utils.atomic import write_json

        write_json(args.output, {"budget": budget, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
