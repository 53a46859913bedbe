#!/usr/bin/env python3
"""Cut one cross-validation fold out of the workflow's preprocessed train and val sets.

Reads the train set (bin/augment.py: originals train_<stem>, copies aug<k>_<stem>) and the
val set (bin/preprocess.py: val_<stem>), both flat .tar files or folders, and folds.csv
(image, fold; written by workflow.py --folds K at generation time). Writes, like the final
model's train / val / test sets but within the train+val pool:

  --output-train     the train-split files of the other folds: originals and their augmented copies
  --output-val       the val-split images of the other folds: the fold model's validation set, where
                     train chooses its score threshold and measures the rates the adjusted compliance
                     estimators correct with; never an image of the held-out fold, so the fold's
                     evaluation does not grade a model on the images it was tuned on
  --output-held-out  the originals of the images in fold --fold, from either split: the images the
                     fold model is evaluated on
  --report           JSON: counts per output, the augmented copies of held-out images left out,
                     the pool images found in neither set (augment or preprocess skipped them),
                     and the job's run record (parameters, versions, the sha256 of its inputs)

Files are copied member by member (images stay encoded as they were); the three sets and the
report are written as one set (a failure leaves the last run's four files as they were). Exit 0 when all three
outputs hold at least one image, 2 on bad input (one line naming the file), 1 on a bug.
"""

import argparse
import contextlib
import sys
from pathlib import Path

from utils.atomic import atomic_files, dump_json
from utils.cli import check_distinct_outputs, non_negative_int, run_job
from utils.data.folds import FoldError, fold_of_stems, read_folds_csv, source_stem
from utils.data.images import is_image_name
from utils.data.pairs import open_folder, write_tar
from utils.provenance import run_record

LISTED = 20  # names shown on the console per problem; the report lists them all


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-set", type=Path, required=True, help="the augmented train set (.tar or folder)")
    parser.add_argument("--val-set", type=Path, required=True, help="the preprocessed val set (.tar or folder)")
    parser.add_argument("--folds-csv", type=Path, required=True, help="folds.csv (image, fold)")
    parser.add_argument("--fold", type=non_negative_int, required=True, help="the held-out fold, 0..K-1")
    parser.add_argument("--output-train", type=Path, required=True, help="the fold's training set (.tar)")
    parser.add_argument("--output-val", type=Path, required=True, help="the fold model's validation set (.tar)")
    parser.add_argument("--output-held-out", type=Path, required=True, help="the fold's held-out set (.tar)")
    parser.add_argument("--report", type=Path, default=None,
                        help="JSON report (default: <output-held-out stem>.report.json next to --output-held-out)")
    return parser


def _set_files(folder: Path, fold_of_stem: dict[str, int], where: Path) -> list[tuple[Path, str, int, bool]]:
    """(file, original stem, fold, is a copy) for every file of a set; a name that is not the
    workflow's, or an image outside the pool, is a FoldError naming the set."""
    files, unknown, outside = [], [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        source = source_stem(path.stem)
        if source is None:
            unknown.append(path.name)
            continue
        stem, is_copy = source
        if stem not in fold_of_stem:
            outside.append(path.name)
            continue
        files.append((path, stem, fold_of_stem[stem], is_copy))
    if unknown:
        raise FoldError(f"{where}: {len(unknown)} file(s) not named like the workflow's sets (train_, val_ or "
                        f"aug<k>_ prefix): {', '.join(unknown[:5])}")
    if outside:
        raise FoldError(f"{where}: {len(outside)} file(s) of images not in the folds file: {', '.join(outside[:5])}")
    return files


def _as_given(data_set: Path) -> list[Path]:
    """A set's files as the run record hashes them: its .tar, or the files of its folder that _set_files reads (not
    the unpacked copies of an archive, whose folder has another name every run)."""
    if data_set.is_file():
        return [data_set]
    return sorted(p for p in data_set.iterdir() if p.is_file() and not p.name.startswith("."))


def main(args) -> int:
    assignment = read_folds_csv(args.folds_csv)
    folds = max(assignment.values()) + 1
    if not 0 <= args.fold < folds:
        raise FoldError(f"--fold {args.fold}: {args.folds_csv} has folds 0..{folds - 1}")
    check_distinct_outputs({"--output-train": args.output_train, "--output-val": args.output_val,
                            "--output-held-out": args.output_held_out, "--report": args.report})
    fold_of_stem = fold_of_stems(assignment, str(args.folds_csv))
    with contextlib.ExitStack() as stack:
        train_files = _set_files(stack.enter_context(open_folder(args.train_set)), fold_of_stem, args.train_set)
        val_files = _set_files(stack.enter_context(open_folder(args.val_set)), fold_of_stem, args.val_set)
        files = train_files + val_files
        sets = {"train": [path for path, _, fold, _ in train_files if fold != args.fold],
                "val": [path for path, _, fold, _ in val_files if fold != args.fold],
                "held_out": [path for path, _, fold, is_copy in files if fold == args.fold and not is_copy]}
        left_out = sorted(path.name for path, _, fold, is_copy in files if fold == args.fold and is_copy)
        found = {stem for _, stem, _, is_copy in files if not is_copy}
        missing = sorted(name for name in assignment if Path(name).stem not in found)
        counts = {name: sum(1 for path in paths if is_image_name(path)) for name, paths in sets.items()}
        for name, count in counts.items():
            if count == 0:
                where = "(val-split images outside it) " if name == "val" else ""
                raise FoldError(f"{args.folds_csv}: fold {args.fold} leaves no {name.replace('_', '-')} images "
                                f"{where}(sets {args.train_set}, {args.val_set}); use fewer folds or more images")
        outputs = {"train": args.output_train, "val": args.output_val, "held_out": args.output_held_out}
        report = {"fold": args.fold, "folds": folds,
                  **{f"{name}_images": count for name, count in counts.items()},
                  **{f"{name}_files": len(paths) for name, paths in sets.items()},
                  "copies_of_held_out_images_left_out": left_out,
                  "pool_images_in_neither_set": missing,
                  "inputs": {"train_set": str(args.train_set), "val_set": str(args.val_set),
                             "folds_csv": str(args.folds_csv)},
                  "run_record": run_record("make_fold", vars(args),
                                           [args.folds_csv, *_as_given(args.train_set), *_as_given(args.val_set)])}
        report_path = args.report or args.output_held_out.with_name(f"{args.output_held_out.stem}.report.json")
        # one set: a set that failed (a full disk) left this fold's train set beside another fold's held-out set
        with atomic_files() as files:
            for name, paths in sets.items():
                with files.writing(outputs[name]) as tmp:
                    write_tar(((path, path.name) for path in paths), tmp)
            with files.writing(report_path) as tmp:
                dump_json(report, tmp)
    print(f"make_fold: fold {args.fold} of {folds}: {counts['train']} training images -> {args.output_train}, "
          f"{counts['val']} validation images -> {args.output_val}, {counts['held_out']} held-out images -> "
          f"{args.output_held_out}; {len(left_out)} augmented copies of held-out images left out")
    if missing:
        print(f"make_fold: {len(missing)} pool image(s) are in neither set (skipped by augment or preprocess; "
              f"see their reports): {', '.join(missing[:LISTED])}{' ...' if len(missing) > LISTED else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main, get_args_parser()))
