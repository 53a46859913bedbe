#!/usr/bin/env python3
"""Validate a folder (or .tar) of VOC pairs: report every problem and write the clean set.

Writes OUTPUT_DIR/validation_report.json, OUTPUT_DIR/clean_manifest.csv,
OUTPUT_DIR/annotations_clean/ (the annotation of every usable pair, cleaned where
needed) and OUTPUT_DIR/validate_run.json (run record). Prints a summary of counts.
Exit 0 when at least one image is usable, 1 when none is, 2 when the inputs cannot
be read; failures print one line naming the reason.
"""

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.data.pairs import open_folder, pack_folder  # noqa: E402
from utils.provenance import write_run_record  # noqa: E402
from utils.data.validation import (ValidationInputError, format_summary, validate_dataset,  # noqa: E402
                              write_clean_outputs)


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="folder (or flat .tar) of images")
    parser.add_argument("--annotations", required=True,
                        help="folder (or flat .tar) of VOC .xml files; may be the same path as --images")
    parser.add_argument("--output-dir", required=True, help="folder for the report, manifest and clean annotations")
    parser.add_argument("--near-duplicate-distance", type=int, default=4,
                        help="largest perceptual-hash Hamming distance (of 64 bits) counted as a near duplicate; "
                             "negative turns near-duplicate search off (default: 4)")
    parser.add_argument("--clean-annotations-tar", default=None,
                        help="also pack annotations_clean/ into this flat .tar (for workflow staging; default: none)")
    parser.add_argument("--workers", type=int, default=0,
                        help="decoding threads; 0 means min(8, CPUs) (default: 0)")
    return parser


def _files(folder: Path):
    return [p for p in folder.iterdir() if p.is_file()]


def main(args) -> int:
    output_dir = Path(args.output_dir)
    try:
        with contextlib.ExitStack() as stack:
            images_dir = stack.enter_context(open_folder(args.images))
            same = Path(args.images).resolve() == Path(args.annotations).resolve()
            annotations_dir = images_dir if same else stack.enter_context(open_folder(args.annotations))
            result = validate_dataset(images_dir, annotations_dir,
                                      near_duplicate_distance=args.near_duplicate_distance,
                                      workers=args.workers or None)
            # Images unpacked from an archive live in a temporary folder: the manifest names them only.
            from_archive = not Path(args.images).is_dir()
            outputs = write_clean_outputs(result, output_dir, images_by_name=from_archive)
            if args.clean_annotations_tar:
                pack_folder(outputs["annotations_clean"], args.clean_annotations_tar)
            inputs = _files(images_dir) + ([] if same else _files(annotations_dir))
            write_run_record(output_dir / "validate_run.json", "validate_data", vars(args), inputs)
    except (ValidationInputError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"validate_data: error: {exc}", file=sys.stderr)
        return 2
    report = result.report
    print(format_summary(report))
    print(f"report: {outputs['report']}")
    if report["images_usable"] == 0:
        if report["images_total"] == 0:
            reason = f"no images found in {args.images}"
        else:
            reason = (f"none of the {report['images_total']} images is usable "
                      f"(see {outputs['report']})")
        print(f"validate_data: error: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
