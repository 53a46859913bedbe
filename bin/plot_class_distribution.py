#!/usr/bin/env python3
"""Plot objects per class per split (a grouped bar chart, PNG by default) and write the counts as CSV.

Reads split.csv (image, annotation, split). Annotations that cannot be read are
skipped and listed in the run record (<output-csv stem>_run.json), the first 20 on stderr;
the job fails when no annotation could be read (then all are on stderr).
Exit 0 on success, 2 on bad input (no readable annotation, unreadable CSV; one line
naming the file), 1 on a bug.
"""

import argparse
import contextlib
import sys
from pathlib import Path

from utils.classes import LabelMap
from utils.cli import PLOT_FORMATS, add_label_map_arg, plot_path, print_skipped, run_job
from utils.data.class_distribution import count_objects, plot_counts, write_counts_csv
from utils.data.pairs import open_folder
from utils.errors import InputError
from utils.provenance import write_run_record


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split-csv", required=True, help="split.csv from split_data.py")
    parser.add_argument("--annotations", nargs="+", default=None,
                        help="folder (or .tar, or several .tar shards, of which only the .xml members are read) "
                             "in which to find the annotations by file name "
                             "(default: the paths written in the CSV, relative to it)")
    parser.add_argument("--output", type=plot_path, default="class_distribution.png",
                        help=f"bar chart ({', '.join(PLOT_FORMATS)}, by extension) (default: class_distribution.png)")
    parser.add_argument("--output-csv", default="class_distribution.csv",
                        help="CSV of counts: split, class, objects, images (default: class_distribution.csv)")
    add_label_map_arg(parser)
    return parser


def main(args) -> int:
    label_map = LabelMap.parse(args.label_map)
    with contextlib.ExitStack() as stack:
        annotations_dir = (stack.enter_context(open_folder(args.annotations, suffixes=(".xml",)))
                           if args.annotations else None)
        counts, problems = count_objects(args.split_csv, annotations_dir=annotations_dir, label_map=label_map)
    output_csv = Path(args.output_csv)
    record = output_csv.with_name(f"{output_csv.stem}_run.json")
    counted = sum(entry["images"] for entry in counts.values())
    print_skipped(problems, record if counted else None, reason_key="problem",
                  prefix="plot_class_distribution: warning:")
    if counted == 0:
        raise InputError(f"{args.split_csv}: no readable annotation listed")
    write_counts_csv(args.output_csv, counts)
    plot_counts(args.output, counts)
    write_run_record(record, "plot_class_distribution", {**vars(args), "problems": problems}, [Path(args.split_csv)])
    for split, entry in counts.items():
        print(f"{split}: {entry['images']} images, "
              + ", ".join(f"{name}={n}" for name, n in entry["objects"].items()))
    print(f"plot: {args.output}  table: {args.output_csv}")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main, get_args_parser()))
