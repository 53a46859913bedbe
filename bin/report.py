#!/usr/bin/env python3
"""Write one self-contained report page of a run: report.html.

    bin/report.py runs/sample                       # -> runs/sample/outputs/report.html
    bin/report.py runs/sample --output /tmp/sample.html
    bin/report.py . --run-name sample               # a flat folder of outputs, titled by the run's name

RUN_DIR is a run folder (workflow.py --local leaves RUN_DIR/outputs, statistics.json,
split.csv, config.yml) or a flat folder holding the outputs themselves (the workflow's
report job, whose inputs are staged side by side). The page shows the summary (mAP, per-class
AP, compliance true vs predicted and its error), the class distribution, the HPO history and
importances, the loss curve, the confusion matrix, the PR curves, for a --folds run the
cross-validation summary (aggregate_folds' text and plot), a grid of annotated
predictions worst first with their errors (evaluation_images.json), the job timings
(statistics.json when the run has finished, else the run records' times) and the provenance
(git commit, package versions, input hashes, the effective configuration). Figures are
embedded as data: URIs, the CSS is inline, there is no script and nothing is fetched.
What the run lacks is said on the page. Also writes report_run.json (run record) next to it.
Exit 0 on success, 2 when RUN_DIR is not a run folder (one line), 1 on a bug.
"""

import argparse
import sys
from pathlib import Path

from utils.atomic import write_text
from utils.cli import run_job
from utils.errors import InputError
from utils.provenance import write_run_record
from utils.reporting.html_report import build_report, project_commit
from utils.reporting.run_folder import is_report_input, read_run_folder

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run folder, or a flat folder of its outputs")
    parser.add_argument("--output", type=Path, default=None,
                        help="the page to write (default: report.html in RUN_DIR/outputs, or in RUN_DIR when flat)")
    parser.add_argument("--run-name", default=None,
                        help="the run's name, which titles the page (default: RUN_DIR's folder name; the workflow "
                             "passes its run folder's name, since its report job runs in a scratch folder)")
    parser.add_argument("--run-record", type=Path, default=None,
                        help="run record to write (default: report_run.json next to --output)")
    return parser


def main(args) -> int:
    run = read_run_folder(args.run_dir)
    output = args.output or run.outputs / "report.html"
    if args.run_name is not None and not args.run_name.strip():
        raise InputError("--run-name is empty; give the run's name or leave the flag out")
    page, unreadable = build_report(run, commit=project_commit(PROJECT_ROOT), run_name=args.run_name)
    write_text(output, page)
    inputs = [path for path in run.outputs.iterdir() if path.is_file() and is_report_input(path.name)]
    inputs += [path for path in (run.path / "statistics.json", run.path / "config.yml", run.path / "split.csv")
               if path.is_file() and path.parent != run.outputs]
    write_run_record(args.run_record or output.with_name("report_run.json"), "report", vars(args), inputs)
    for line in run.problems + unreadable:
        print(f"report: warning: {line}", file=sys.stderr)
    missing = ", ".join(run.missing) if run.missing else "none"
    print(f"report: {output} ({output.stat().st_size / 1024:.0f} KiB, {len(run.annotated)} annotated images found); "
          f"not in this run: {missing}")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main, get_args_parser()))
