#!/usr/bin/env python3
"""Augment the training set: originals as train_<stem> (the photo itself, or lossless PNG), transformed copies as
aug<k>_<stem> (.jpg/.xml).

A copy is a random horizontal flip, scale jitter (zoom out or IoU crop, then back to
the original longest side), colour jitter and Gaussian pixel noise; boxes follow the
pixels through torchvision.transforms.v2. Images containing mask_weared_incorrect
get --rare-factor extra copies. The same --seed gives the same files. Object names
renamed by --label-map are written as the class names, so later jobs read the set
without a map. Unreadable inputs and copies that lost all their boxes are listed in
the report. --output-dir is replaced whole once the new set is complete, so no file of
an earlier run (its copies) lingers; a folder holding files no earlier preprocess or
augment run wrote there is refused.
Exit 0 when at least one image was written, 2 on bad input (none usable, unreadable
folder, bad flag; one line naming the file), 143 on SIGTERM (stopped before the next
image; the partial set removed, an earlier one left as it was), 1 on a bug.
"""

import argparse
import sys

from utils import defaults as D
from utils.classes import LabelMap
from utils.cli import (add_label_map_arg, add_set_input_args, add_set_output_args, check_set_args,
                       non_negative_float, non_negative_int, print_skipped, random_seed, require_set_inputs,
                       run_job)
from utils.data.preprocess import default_report_path
from utils.stop import declare_outputs, stop_on_sigterm


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_set_input_args(parser, split_example="train")
    parser.add_argument("--copies", type=non_negative_int, default=D.AUGMENT_COPIES,
                        help=f"augmented copies per image (default: {D.AUGMENT_COPIES})")
    parser.add_argument("--rare-factor", type=non_negative_int, default=D.RARE_FACTOR,
                        help=f"extra copies of each image containing mask_weared_incorrect (default: {D.RARE_FACTOR})")
    parser.add_argument("--noise-std", type=non_negative_float, default=D.NOISE_STD,
                        help="standard deviation of the Gaussian pixel noise, in 8-bit units 0-255; 0 turns it "
                             f"off (default: {D.NOISE_STD})")
    parser.add_argument("--seed", type=random_seed, default=D.SEED,
                        help=f"random seed; the same seed gives the same files (default: {D.SEED})")
    add_label_map_arg(parser, writes_canonical=True)
    add_set_output_args(parser, report_contents="counts, skipped files, object problems and copies without boxes")
    return parser


def main(args) -> int:
    stop_on_sigterm()  # a SIGTERM stops at the next image and removes the partial set, leaving the old one
    check_set_args(args)
    # a stopped try leaves stand-ins for the files (not a folder): on a pool a missing one holds the job
    declare_outputs(args.output_tar, args.report)
    label_map = LabelMap.parse(args.label_map)
    # augment_set's own refusals; without --annotations they are read from --images, already checked
    require_set_inputs(args.images, args.annotations, args.split_csv)
    # torch (torchvision's transforms) is imported only now: a bad flag or a missing input is refused in a fraction
    # of a second, not after the seconds that importing torch takes
    from utils.data.augment import augment_set

    report = augment_set(args.images, args.annotations or args.images, copies=args.copies,
                         rare_factor=args.rare_factor, noise_std=args.noise_std, seed=args.seed,
                         output_dir=args.output_dir, output_tar=args.output_tar, split_csv=args.split_csv,
                         split=args.split, quality=args.quality, report=args.report,
                         progress=not args.no_progress, label_map=label_map)
    output = args.output_dir or args.output_tar
    print(f"augment: {report['originals']} originals and {report['copies']} copies "
          f"({report['rare_extra_copies']} extra for {report['rare_images']} images with mask_weared_incorrect) "
          f"written to {output}; {report['images_skipped']} inputs skipped, "
          f"{len(report['copies_without_boxes'])} copies left out for losing every box")
    listed_in = str(args.report or default_report_path(args.output_dir, args.output_tar))
    print_skipped(report["skipped"] + report["copies_without_boxes"], listed_in, reason_key="problem")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main, get_args_parser()))
