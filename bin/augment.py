#!/usr/bin/env python3
"""Augment the training set: originals as train_<stem>, transformed copies as aug<k>_<stem> (.jpg/.xml).

A copy is a random horizontal flip, scale jitter (zoom out or IoU crop, then back to
the original longest side), colour jitter and Gaussian pixel noise; boxes follow the
pixels through torchvision.transforms.v2. Images containing mask_weared_incorrect
get --rare-factor extra copies. The same --seed gives the same files. Unreadable
inputs and copies that lost all their boxes are listed in the report.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

from utils.data.augment import augment_set  # noqa: E402
from utils.cli import add_set_input_args, add_set_output_args, set_args_problem  # noqa: E402
from utils.data.preprocess import NothingProcessedError  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_set_input_args(parser, split_example="train")
    parser.add_argument("--copies", type=int, default=2, help="augmented copies per image (default: 2)")
    parser.add_argument("--rare-factor", type=int, default=2,
                        help="extra copies of each image containing mask_weared_incorrect (default: 2)")
    parser.add_argument("--noise-std", type=float, default=8.0,
                        help="standard deviation of the Gaussian pixel noise, in 8-bit units 0-255; 0 turns it "
                             "off (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files "
                                                            "(default: 0)")
    add_set_output_args(parser, report_contents="counts, skipped files, object problems and copies without boxes")
    return parser


def main(args) -> int:
    problem = set_args_problem(args)
    if problem:
        print(f"augment: {problem}", file=sys.stderr)
        return 2
    try:
        report = augment_set(args.images, args.annotations or args.images, copies=args.copies,
                             rare_factor=args.rare_factor, noise_std=args.noise_std, seed=args.seed,
                             output_dir=args.output_dir, output_tar=args.output_tar, split_csv=args.split_csv,
                             split=args.split, quality=args.quality, report=args.report,
                             progress=not args.no_progress)
    except (NothingProcessedError, ValueError, FileNotFoundError, NotADirectoryError, KeyError) as exc:
        print(f"augment: {exc}", file=sys.stderr)
        return 1
    output = args.output_dir or args.output_tar
    print(f"augment: {report['originals']} originals and {report['copies']} copies "
          f"({report['rare_extra_copies']} extra for {report['rare_images']} images with mask_weared_incorrect) "
          f"written to {output}; {report['images_skipped']} inputs skipped, "
          f"{len(report['copies_without_boxes'])} copies left out for losing every box")
    for item in report["skipped"] + report["copies_without_boxes"]:
        print(f"  {item['file']}: {item['problem']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
