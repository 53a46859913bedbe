#!/usr/bin/env python3
"""Preprocess a val or test set: checked pairs, optional longest-side cap, each photo kept as it is.

With --format source (the default) a JPEG or PNG photo that is not shrunk is copied byte for
byte and any other is written as lossless PNG, so the set decodes to the pixels predict reads
from the photos; --format jpg or png re-encodes every image in 8-bit RGB.

Boxes follow the pixels (torchvision.transforms.v2); objects with unknown classes or
boxes outside the image are dropped or clipped and reported. Outputs are named
<prefix><stem>.<format> and <prefix><stem>.xml, side by side in --output-dir or
packed flat into --output-tar (--prefix: a plain file-name part, no '/', '..' or leading
'.'). --output-dir is replaced whole once the new set is complete, so no old file lingers;
a folder holding files no earlier preprocess or augment run wrote there is refused.
Object names renamed by --label-map are written as
the class names, so later jobs read the set without a map. Unreadable inputs are
skipped and listed in the report; the job fails only when no image could be processed.
Exit 0 when at least one image was written, 2 on bad input (none usable, unreadable
folder, bad flag; one line naming the file), 143 on SIGTERM (stopped before the next
image; the partial set removed, an earlier one left as it was), 1 on a bug.
"""

import argparse
import sys

from utils import defaults as D
from utils.classes import LabelMap
from utils.cli import (add_label_map_arg, add_set_input_args, add_set_output_args, check_set_args, file_name_part,
                       int_at_least, print_skipped, run_job)
from utils.data.preprocess import FORMATS, SOURCE, default_report_path, preprocess_set
from utils.stop import declare_outputs, stop_on_sigterm


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_set_input_args(parser, split_example="val or test")
    parser.add_argument("--prefix", type=file_name_part, default="",
                        help="prefix of output names, e.g. val_ or test_: a plain file-name part (no '/', '\\', "
                             "'..' or leading '.') (default: none)")
    parser.add_argument("--max-size", type=int_at_least(16), default=D.PREPROCESS_MAX_SIZE,
                        help="cap on the longest image side in pixels; larger images are shrunk, boxes "
                             f"scaled with them (default: {D.PREPROCESS_MAX_SIZE or 'no cap'})")
    parser.add_argument("--format", dest="image_format", choices=[SOURCE, *sorted(FORMATS)],
                        default=D.PREPROCESS_FORMAT,
                        help=f"output images: {SOURCE} keeps a JPEG or PNG photo's own bytes, else PNG; jpg "
                             f"(quality --quality) or png re-encode every one (default: {D.PREPROCESS_FORMAT})")
    add_label_map_arg(parser, writes_canonical=True)
    add_set_output_args(parser, report_contents="counts, skipped files and object problems")
    return parser


def main(args) -> int:
    stop_on_sigterm()  # a SIGTERM stops at the next image and removes the partial set, leaving the old one
    check_set_args(args)
    # a stopped try leaves stand-ins for the files (not a folder): on a pool a missing one holds the job
    declare_outputs(args.output_tar, args.report)
    label_map = LabelMap.parse(args.label_map)
    report = preprocess_set(args.images, args.annotations or args.images, args.prefix,
                            output_dir=args.output_dir, output_tar=args.output_tar, split_csv=args.split_csv,
                            split=args.split, max_size=args.max_size, image_format=args.image_format,
                            quality=args.quality, report=args.report, progress=not args.no_progress,
                            label_map=label_map)
    output = args.output_dir or args.output_tar
    # inputs: the pairs and every entry skipped (a subfolder, a file without a partner), not only images
    print(f"preprocess: {report['images_processed']} images written to {output} ({report['inputs']} inputs, "
          f"{report['images_skipped']} skipped; {len(report['object_problems'])} object problems)")
    print_skipped(report["skipped"], str(args.report or default_report_path(args.output_dir, args.output_tar)),
                  reason_key="problem")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main, get_args_parser()))
