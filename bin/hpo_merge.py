#!/usr/bin/env python3
"""Merge the HPO workers' results: the best trial over all workers, and plots.

Writes best_hpo_params.json ({"params": {...}, "value", ...}, read by
bin/train.py --params), the human-readable best_hpo_params.txt, and
optimization_history.png (one line per worker) and param_importances.png (all
workers' trials together; a note instead when fewer than two completed trials
with differing parameters exist). Trials are read from the journals when given,
else from the trial lists inside each best.json.
Exit 0 on success, 2 on bad input (one line naming the file), 1 on a bug.
"""

import argparse
import logging
import sys
from pathlib import Path

from utils.atomic import write_json, write_text
from utils.cli import run_job
from utils.detection.hpo_results import HpoError, merge_results, merged_text, read_worker_results
from utils.detection.plots import write_hpo_plots
from utils.provenance import write_run_record


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", required=True, help="the workers' best.json files")
    p.add_argument("--journals", nargs="*", default=[],
                   help="the workers' Optuna journals, for the plots: one per --inputs file, in the same order "
                        "(default: the trials inside --inputs)")
    p.add_argument("--output", default="best_hpo_params.json", help="merged result (default: best_hpo_params.json)")
    p.add_argument("--output-txt", default="best_hpo_params.txt",
                   help="human-readable summary (default: best_hpo_params.txt)")
    p.add_argument("--plots-dir", default=".", help="folder for the two plots (default: current folder)")
    p.add_argument("--run-record", default=None,
                   help="run record JSON (default: <output stem>_run.json next to --output)")
    return p


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("optuna").setLevel(logging.WARNING)
    if args.journals and len(args.journals) != len(args.inputs):
        raise HpoError(f"--journals: {len(args.journals)} journal(s) for {len(args.inputs)} worker result(s) "
                       "(--inputs): give one per worker, in the same order, or none")
    results = read_worker_results(args.inputs)
    merged = merge_results(results)
    notes = write_hpo_plots(results, args.plots_dir, journals=args.journals)
    merged["plot_notes"] = notes
    write_json(args.output, merged)
    write_text(args.output_txt, merged_text(merged))
    output = Path(args.output)
    record = Path(args.run_record) if args.run_record else output.with_name(f"{output.stem}_run.json")
    write_run_record(record, "hpo_merge", vars(args), [*args.inputs, *args.journals])
    for name, note in notes.items():
        print(f"hpo_merge: {name}: {note}")
    print(f"hpo_merge: best {merged['objective']} {merged['value']:.4f} from {merged['source']}: {merged['params']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main, get_args_parser()))
