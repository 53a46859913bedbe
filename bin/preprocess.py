#!/usr/bin/env python3
"""Preprocess a val or test set: every image to 8-bit RGB in one format, optional longest-side cap.

Boxes follow the pixels (torchvision.transforms.v2); objects with unknown classes or
boxes outside the image are dropped or clipped and reported. Outputs are named
<prefix><stem>.<format> and <prefix><stem>.xml, side by side in --output-dir or
packed flat into --output-tar. Unreadable inputs are skipped and listed in the
report; the job fails only when no image could be processed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

from utils.cli import add_set_input_args, add_set_output_args, set_args_problem  # noqa: E402
from utils.data.preprocess import FORMATS, NothingProcessedError, preprocess_set  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_set_input_args(parser, split_example="val or test")
    parser.add_argument("--prefix", default="", help="prefix of output names, e.g. val_ or test_ (default: none)")
    parser.add_argument("--max-size", type=int, default=None,
                        help="cap on the longest image side in pixels; larger images are shrunk, boxes "
                             "scaled with them (default: no cap)")
    parser.add_argument("--format", dest="image_format", choices=sorted(FORMATS), default="jpg",
                        help="output image format (default: jpg)")
    add_set_output_args(parser, report_contents="counts, skipped files and object problems")
    return parser


def main(args) -> int:
    problem = set_args_problem(args)
    if problem:
        print(f"preprocess: {problem}", file=sys.stderr)
        return 2
    try:
        report = preprocess_set(args.images, args.annotations or args.images, args.prefix,
                                output_dir=args.output_dir, output_tar=args.output_tar, split_csv=args.split_csv,
                                split=args.split, max_size=args.max_size, image_format=args.image_format,
                                quality=args.quality, report=args.report, progress=not args.no_progress)
    except (NothingProcessedError, ValueError, FileNotFoundError, NotADirectoryError, KeyError) as exc:
        print(f"preprocess: {exc}", file=sys.stderr)
        return 1
    output = args.output_dir or args.output_tar
    print(f"preprocess: {report['images_processed']} of {report['inputs']} images written to {output} "
          f"({report['images_skipped']} skipped, {len(report['object_problems'])} object problems)")
    for item in report["skipped"]:
        print(f"  skipped {item['file']}: {item['problem']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
