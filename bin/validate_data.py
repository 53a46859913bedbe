#!/usr/bin/env python3
"""Validate a folder (or .tar) of VOC pairs: report every problem and write the clean set.

Writes OUTPUT_DIR/validation_report.json, OUTPUT_DIR/clean_manifest.csv,
OUTPUT_DIR/annotations_clean/ (the annotation of every usable pair, cleaned where
needed; object names renamed by --label-map are written as the class names) and
OUTPUT_DIR/validate_run.json (run record). Prints a summary of counts.
Exit 0 when at least one image is usable; 2 when none is, the inputs cannot be read or the output
folder is one of them (one line naming the folder and the reason); 1 on a bug.
"""

import argparse
import contextlib
import sys
from pathlib import Path

from utils import defaults as D
from utils.classes import LabelMap
from utils.cli import add_label_map_arg, near_duplicate_bits, non_negative_int, run_job
from utils.data.images import valid_utf8_name
from utils.data.pairs import open_folder, pack_folder
from utils.data.validation import ValidationInputError, format_summary, validate_dataset, write_clean_outputs
from utils.provenance import write_run_record


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="folder (or flat .tar) of images")
    parser.add_argument("--annotations", required=True,
                        help="folder (or flat .tar) of VOC .xml files; may be the same path as --images")
    parser.add_argument("--output-dir", required=True, help="folder for the report, manifest and clean annotations")
    parser.add_argument("--near-duplicate-distance", type=near_duplicate_bits, default=D.NEAR_DUPLICATE_DISTANCE,
                        help="largest perceptual-hash Hamming distance (of 64 bits) counted as a near duplicate, "
                             "of which one is kept; -1 turns near-duplicate search off "
                             f"(default: {D.NEAR_DUPLICATE_DISTANCE})")
    parser.add_argument("--clean-annotations-tar", default=None,
                        help="also pack annotations_clean/ into this flat .tar (for workflow staging; default: none)")
    parser.add_argument("--workers", type=non_negative_int, default=D.VALIDATE_WORKERS,
                        help=f"decoding threads; 0 means min({D.VALIDATE_WORKERS_MAX}, CPUs) "
                             f"(default: {D.VALIDATE_WORKERS})")
    add_label_map_arg(parser, writes_canonical=True)
    return parser


def _files(folder: Path):
    # A name that is not valid UTF-8 is not read (the report says so) and cannot be named in the JSON record.
    return [p for p in folder.iterdir() if p.is_file() and valid_utf8_name(p.name)]


def main(args) -> int:
    label_map = LabelMap.parse(args.label_map)
    output_dir = Path(args.output_dir)
    for role in ("images", "annotations"):  # its outputs would be read back as inputs by the next run
        if output_dir.resolve() == Path(getattr(args, role)).resolve():
            raise ValidationInputError(f"{output_dir}: the output folder is also the --{role} folder; write the "
                                       "report, manifest and clean annotations to another folder")
    with contextlib.ExitStack() as stack:
        images_dir = stack.enter_context(open_folder(args.images))
        same = Path(args.images).resolve() == Path(args.annotations).resolve()
        annotations_dir = images_dir if same else stack.enter_context(open_folder(args.annotations))
        result = validate_dataset(images_dir, annotations_dir, near_duplicate_distance=args.near_duplicate_distance,
                                  workers=args.workers or None, label_map=label_map)
        # Images unpacked from an archive live in a temporary folder: the manifest names them only.
        from_archive = not Path(args.images).is_dir()
        outputs = write_clean_outputs(result, output_dir, images_by_name=from_archive)
        if args.clean_annotations_tar:
            pack_folder(outputs["annotations_clean"], args.clean_annotations_tar)
        inputs = _files(images_dir) + ([] if same else _files(annotations_dir))
        write_run_record(output_dir / "validate_run.json", "validate_data", vars(args), inputs, result.images_sha256)
    report = result.report
    print(format_summary(report))
    print(f"report: {outputs['report']}")
    if report["images_total"] == 0:
        raise ValidationInputError(f"{args.images}: no images found")
    if report["images_usable"] == 0:
        raise ValidationInputError(f"{args.images}: none of the {report['images_total']} images is usable "
                                   f"(see {outputs['report']})")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main, get_args_parser()))
