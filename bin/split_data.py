#!/usr/bin/env python3
"""Split a clean manifest into train/val/test: deterministic for a seed, duplicate groups
kept together, images with mask_weared_incorrect spread over all three splits.

Writes OUTPUT (split.csv: image, annotation, split) and a run record next to it
(<output stem>_run.json). Prints images and rare-class images per split.
Exit 0 on success, 2 on bad input (missing or malformed manifest or report, a manifest
listing no images, an unreadable annotation; one line naming the file), 1 on a bug.
"""

import argparse
import contextlib
import sys
from pathlib import Path

from utils import defaults as D
from utils.classes import LabelMap
from utils.cli import add_label_map_arg, fraction, random_seed, run_job
from utils.data.pairs import open_folder, read_pairs_csv, write_pairs_csv
from utils.data.split import SplitError, image_classes, read_duplicate_groups, split_pairs, split_summary
from utils.data.validation import csv_entry
from utils.provenance import write_run_record


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="clean_manifest.csv from validate_data.py")
    parser.add_argument("--report", default=None,
                        help="validation_report.json whose duplicate_groups must not straddle splits "
                             "(default: none, every image is its own group)")
    parser.add_argument("--output", default="split.csv", help="split CSV to write (default: split.csv)")
    parser.add_argument("--seed", type=random_seed, default=D.SEED, help=f"random seed (default: {D.SEED})")
    parser.add_argument("--fractions", type=fraction, nargs=3, default=list(D.SPLIT_FRACTIONS),
                        metavar=("TRAIN", "VAL", "TEST"),
                        help="split fractions, normalised to sum 1 (default: {} {} {})".format(*D.SPLIT_FRACTIONS))
    parser.add_argument("--images", default=None,
                        help="folder (or .tar) in which to find the manifest's images by name "
                             "(default: paths as written)")
    parser.add_argument("--annotations", default=None,
                        help="folder (or .tar) in which to find the manifest's annotations by name "
                             "(default: paths as written, relative to the manifest)")
    add_label_map_arg(parser)
    return parser


def _entry(path: Path, csv_folder: Path, by_name: bool) -> str:
    # Files from an archive or not present here (staged elsewhere) are named only; readers resolve by name.
    return csv_entry(path, csv_folder, by_name=by_name or not path.exists())


def main(args) -> int:
    label_map = LabelMap.parse(args.label_map)
    output = Path(args.output)
    groups = read_duplicate_groups(args.report) if args.report else []
    with contextlib.ExitStack() as stack:
        images_dir = stack.enter_context(open_folder(args.images)) if args.images else None
        annotations_dir = stack.enter_context(open_folder(args.annotations)) if args.annotations else None
        pairs = read_pairs_csv(args.manifest, images_dir, annotations_dir)
        if not pairs:
            raise SplitError(f"{args.manifest}: manifest lists no images")
        classes_of = image_classes(pairs, label_map)  # the rare class under any name the map gives it
        rows = split_pairs(pairs, groups, args.fractions, args.seed, classes_of=classes_of)
        images_by_name = bool(args.images) and not Path(args.images).is_dir()
        annotations_by_name = bool(args.annotations) and not Path(args.annotations).is_dir()
        output.parent.mkdir(parents=True, exist_ok=True)
        written = [{"image": _entry(r["image"], output.parent, images_by_name),
                    "annotation": _entry(r["annotation"], output.parent, annotations_by_name),
                    "split": r["split"]} for r in rows]
        write_pairs_csv(output, written, fields=("image", "annotation", "split"))
        write_run_record(output.with_name(f"{output.stem}_run.json"), "split_data", vars(args),
                         [Path(args.manifest)] + ([Path(args.report)] if args.report else []))
    for name, entry in split_summary(rows, classes_of).items():
        print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in entry.items()))
    print(f"split: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main, get_args_parser()))
