"""Argument groups and checks shared by several bin/ jobs, defined once."""

from __future__ import annotations

from pathlib import Path


def add_set_input_args(parser, split_example: str) -> None:
    """--images/--annotations/--split-csv/--split of the jobs that read one set of VOC pairs."""
    parser.add_argument("--images", type=Path, required=True, help="folder or .tar of images (required)")
    parser.add_argument("--annotations", type=Path, default=None,
                        help="folder or .tar of VOC .xml files (default: the --images path)")
    parser.add_argument("--split-csv", type=Path, default=None,
                        help="split.csv (image, annotation, split) selecting the pairs; names are looked up "
                             "inside --images/--annotations (default: pair every image with its .xml)")
    parser.add_argument("--split", default=None,
                        help=f"only rows of this split from --split-csv, e.g. {split_example} (default: all rows)")


def add_set_output_args(parser, report_contents: str) -> None:
    """--quality, --output-dir | --output-tar, --report, --no-progress of the jobs that write a set."""
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality 1-100 (default: 95)")
    output = parser.add_mutually_exclusive_group(required=True)
    output.add_argument("--output-dir", type=Path, default=None, help="folder to write the pairs into")
    output.add_argument("--output-tar", type=Path, default=None, help="flat .tar to pack the pairs into")
    parser.add_argument("--report", type=Path, default=None,
                        help=f"JSON report of {report_contents} (default: <output>.report.json next to the output)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar (default: shown)")


def set_args_problem(args) -> str | None:
    """The one-line problem with the set flags, or None when they are usable."""
    if args.split and not args.split_csv:
        return "--split needs --split-csv"
    if not 1 <= args.quality <= 100:
        return f"--quality must be 1-100, got {args.quality}"
    return None


def add_model_run_args(parser) -> None:
    """--batch-size, --workers, --device of the jobs that run a trained model over images."""
    parser.add_argument("--batch-size", type=int, default=4, help="images per model call (default: 4)")
    parser.add_argument("--workers", type=int, default=-1,
                        help="image decoding processes; -1 picks a share of the CPUs, 0 decodes in the main "
                             "process (default: -1)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where the model runs; auto uses CUDA when available (default: auto)")


def model_run_args_problem(args) -> str | None:
    """The one-line problem with --score-threshold/--batch-size, or None when they are usable."""
    if not 0.0 <= args.score_threshold <= 1.0:
        return f"--score-threshold must be between 0 and 1, got {args.score_threshold}"
    if args.batch_size < 1:
        return f"--batch-size must be at least 1, got {args.batch_size}"
    return None
