#!/usr/bin/env python3
"""Compare finished runs: one row per run, the settings that differ between them, then the metrics.

    bin/compare_runs.py runs/a runs/b runs/c
    bin/compare_runs.py runs/* --sort-by compliance_error --ascending --output runs.csv
    bin/compare_runs.py runs/* --output runs.html --plot map_50.png --metric map_50

Settings: a structural diff of the runs' effective configurations (RUN_DIR/config.yml; for a
run without one, the parameters of its run records, and the output says which runs those
are), nested keys flattened (train_stages.0.lr), only the keys whose value differs. Metrics:
map, map_50, ap50_<class>, compliance_true (percent properly masked on the test set), estimate,
estimate_low, estimate_high, estimate_error (the headline estimate, its 95 % interval and its error in
points, as the run's summary line gives them), compliance_predicted and compliance_error (the plain
count of the boxes kept at the operating threshold, and its error), mae (per-image mean absolute error,
points), wall_time_s (statistics.json). Rows are sorted by --sort-by (descending unless
--ascending; runs without the value last). A Markdown table goes to stdout; --output writes
.csv, .md or .html (by extension); --plot writes a bar chart of --metric across the runs.
A missing or unfinished run folder is a one-line warning on stderr and its row says what it
lacks, or which result files it holds but cannot read ("unreadable evaluation.json"); a metric
its files hold as anything but a finite number (NaN, text) is missing there, with a warning;
a run given twice is compared once. Runs whose evaluations counted other test sets (images and
faces per class: another data set, split or label map) are compared, with a warning and a note
naming each run's counts. Exit 0 on success, 2 when no run is usable or a flag
is wrong (one line), 1 on a bug.
"""

import argparse
import sys
from pathlib import Path

from utils import defaults as D
from utils.atomic import write_text
from utils.cli import PLOT_FORMATS, plot_path, run_job
from utils.errors import InputError
from utils.reporting.compare import FORMATS, METRICS, compare_runs, to_markdown, write_plot


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="run folders to compare")
    parser.add_argument("--sort-by", default=D.COMPARE_SORT_BY,
                        help=f"column to sort by: a metric ({', '.join(METRICS)}) or a differing setting "
                             f"(default: {D.COMPARE_SORT_BY})")
    parser.add_argument("--ascending", action="store_true", help="smallest first (default: largest first)")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"also write the table to this file; the format follows its extension "
                             f"({', '.join(FORMATS)}) (default: stdout only)")
    parser.add_argument("--plot", type=plot_path, default=None,
                        help=f"bar chart of --metric across the runs ({', '.join(PLOT_FORMATS)}, by extension)")
    parser.add_argument("--metric", default=None,
                        help="metric of --plot (default: --sort-by when a metric, else map_50)")
    return parser


def main(args) -> int:
    if args.output is not None and args.output.suffix.lower() not in FORMATS:
        raise InputError(f"--output {args.output}: unknown format {args.output.suffix or '(no extension)'!r} "
                         f"(use {', '.join(FORMATS)})")
    metric = args.metric or (args.sort_by if args.sort_by in METRICS else "map_50")
    if metric not in METRICS:
        raise InputError(f"--metric {metric!r}: not a metric (one of {', '.join(METRICS)})")
    comparison = compare_runs(args.run_dirs, args.sort_by, args.ascending)
    for warning in comparison.warnings:
        print(f"compare_runs: warning: {warning}", file=sys.stderr)
    print(to_markdown(comparison), end="")
    if args.output is not None:
        write_text(args.output, FORMATS[args.output.suffix.lower()](comparison))
        print(f"table: {args.output}")
    if args.plot is not None:
        without = write_plot(comparison, metric, args.plot)
        print(f"plot of {metric}: {args.plot}" + (f" (no value: {', '.join(without)})" if without else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main, get_args_parser()))
