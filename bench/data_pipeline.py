#!/usr/bin/env python3
"""Throughput of the data jobs on the real face-mask data, in images per second.

Stages, all on the same files in one run:
  decode      plain PIL decode + convert("RGB") of every image (the reference)
  validate    utils.data.validation.validate_dataset (decode, checks, content and perceptual hashes)
  preprocess  utils.data.preprocess.preprocess_set as the workflow runs it (--format source; optionally --max-size)
  augment     utils.data.augment.augment_set with --copies copies per image (input images per second;
              output images per second printed alongside)
  dataset     iterating utils.data.dataset.VocDetectionDataset (decode + XML + tensors), in this process,
              with torch's default intra-op threads and again with one thread
  dataloader  the same through a torch DataLoader with --workers worker processes

Each stage's rate is also given as a ratio of the plain decode rate. Outputs go to a
temporary folder. Skips with a message (exit 0) when the data folder is absent.
"""

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "face-mask"


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help=f"folder with images/ and annotations/ (default: {DEFAULT_DATA})")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N pairs (default: all)")
    parser.add_argument("--copies", type=int, default=1, help="augmented copies per image (default: 1)")
    parser.add_argument("--max-size", type=int, default=None,
                        help="longest-side cap for the preprocess stage (default: none)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default: 2)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs per stage; the fastest is reported (default: 2)")
    parser.add_argument("--output", type=Path, default=None,
                        help="also write the figures as JSON here, e.g. bench/results/data_pipeline.json "
                             "(default: print only)")
    return parser


REPEATS = 1  # set from --repeats in main()


def timed(function):
    """(best seconds over REPEATS runs, result of the last run): the best run is the least disturbed one."""
    best, result = float("inf"), None
    for _ in range(REPEATS):
        started = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - started)
    return best, result


def subset_folder(pairs, folder: Path) -> Path:
    """A flat folder of symbolic links to the chosen pairs (no copy of the data)."""
    folder.mkdir(parents=True, exist_ok=True)
    for pair in pairs:
        for path in (pair.image, pair.annotation):
            (folder / path.name).symlink_to(path.resolve())
    return folder


def main(args) -> int:
    global REPEATS
    REPEATS = max(1, args.repeats)
    images_dir, annotations_dir = args.data / "images", args.data / "annotations"
    if not images_dir.is_dir() or not annotations_dir.is_dir():
        print(f"data_pipeline: skipped, {args.data} has no images/ and annotations/ folders "
              "(give the face-mask data with --data)")
        return 0

    import torch
    from PIL import Image

    from utils.data.augment import augment_set, torch_threads
    from utils.data.dataset import VocDetectionDataset, collate
    from utils.data.pairs import pair_folders
    from utils.data.preprocess import preprocess_set
    from utils.atomic import write_json

    try:
        from utils.data.validation import validate_dataset
    except ImportError:
        validate_dataset = None

    pairs = pair_folders(images_dir, annotations_dir).pairs
    if args.limit:
        pairs = pairs[: args.limit]
    if not pairs:
        print(f"data_pipeline: skipped, no image/annotation pairs in {args.data}")
        return 0
    count = len(pairs)
    rows = []

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        tmp = Path(tmp)
        source = subset_folder(pairs, tmp / "input")
        source_pairs = pair_folders(source, source).pairs

        def decode_all():
            for pair in source_pairs:
                with Image.open(pair.image) as img:
                    img.convert("RGB")

        decode_all()  # warm the page cache so that every stage reads from memory
        seconds, _ = timed(decode_all)
        rows.append(("decode", count, seconds, None))

        if validate_dataset is not None:
            seconds, result = timed(lambda: validate_dataset(source, source, progress=False))
            rows.append(("validate", result.report.get("images_total", count), seconds, None))
        else:
            print("data_pipeline: utils.data.validation is not available; validate stage left out")

        seconds, report = timed(lambda: preprocess_set(source, source, "val_", output_dir=tmp / "val",
                                                       max_size=args.max_size, progress=False))
        rows.append(("preprocess", report["images_processed"], seconds, None))

        seconds, report = timed(lambda: augment_set(source, source, copies=args.copies, rare_factor=0,
                                                    noise_std=8.0, seed=0, output_dir=tmp / "train",
                                                    progress=False))
        rows.append(("augment", report["originals"], seconds, report["originals"] + report["copies"]))

        dataset = VocDetectionDataset(source_pairs)

        def iterate_dataset():
            for index in range(len(dataset)):
                dataset[index]

        seconds, _ = timed(iterate_dataset)
        rows.append(("dataset", count, seconds, None))
        # Small per-image tensor ops suffer from intra-op threading on a busy machine; DataLoader
        # workers run with one thread each, so the one-thread figure is the fair in-process one.
        with torch_threads(1):
            seconds, _ = timed(iterate_dataset)
        rows.append(("dataset 1 thread", count, seconds, None))

        loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=args.workers, collate_fn=collate)

        def iterate_loader():
            for _batch in loader:
                pass

        seconds, _ = timed(iterate_loader)
        rows.append((f"dataloader x{args.workers}", count, seconds, None))

    decode_rate = rows[0][1] / rows[0][2]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"data_pipeline: {count} images from {args.data}; {os.cpu_count()} CPUs, load average {load:.1f}, "
          f"torch threads {torch.get_num_threads()}, best of {REPEATS} runs per stage, "
          f"{platform.python_implementation()} "
          f"{platform.python_version()}")
    header = f"{'stage':<16}{'images':>8}{'seconds':>10}{'images/s':>11}{'x decode':>10}"
    print(header)
    print("-" * len(header))
    figures = []
    for stage, images, seconds, outputs in rows:
        rate = images / seconds
        note = f"   ({outputs / seconds:.1f} output images/s)" if outputs else ""
        print(f"{stage:<16}{images:>8}{seconds:>10.2f}{rate:>11.1f}{rate / decode_rate:>10.2f}{note}")
        figures.append({"stage": stage, "images": images, "seconds": round(seconds, 4),
                        "images_per_second": round(rate, 2), "ratio_to_decode": round(rate / decode_rate, 4),
                        "output_images": outputs})
    dataset_row = next(f for f in figures if f["stage"] == "dataset")
    single_row = next(f for f in figures if f["stage"] == "dataset 1 thread")
    print(f"Dataset loading runs at {dataset_row['ratio_to_decode']:.2f}x plain PIL decode in one process "
          f"({single_row['ratio_to_decode']:.2f}x with one torch thread); through the DataLoader with "
          f"{args.workers} workers at {figures[-1]['ratio_to_decode']:.2f}x.")
    if args.output:
        write_json(args.output, {"data": str(args.data), "images": count, "cpus": os.cpu_count(),
                                 "load_average": load, "copies": args.copies, "repeats": REPEATS,
                                 "max_size": args.max_size,
                                 "workers": args.workers, "stages": figures})
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
