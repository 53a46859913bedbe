"""The job runner every bin/ script ends with, and the argument groups several jobs share.

A bin/ script is ``get_args_parser()`` plus ``main(args) -> int`` (the job's flow, read
top to bottom), and ends with ``sys.exit(run_job(main, get_args_parser()))``. The runner
parses the flags, prints the resolved arguments as the job's first line and runs main:

- exit 0: main returned 0;
- exit 2: bad input or arguments: argparse's own exit on a bad flag, a
  utils.errors.InputError, or an OSError (missing, unreadable, wrong kind of file);
  stderr gets one line ``<job>: error: <file>: <problem>``, never a traceback;
- exit 1: anything else is a bug: the same one line, then the traceback;
- exit 143: a job that checkpoints (train, hpo) stopped on SIGTERM (utils.stop); stderr
  says what was abandoned and which checkpoint a retry resumes from. preprocess and augment
  stop the same way before their next image, their partial set removed; predict after the
  image in hand, its progress file kept for the rerun; predict_video at its next frame;
- exit 130: a Ctrl-C the job does not handle itself, one line, no traceback.

The SIGTERM and SIGINT handlers a job sets are put back as they were once it ends, however it ends, where another
program runs it in-process; a job that is the program (``python bin/<job>.py``) keeps them until its exit.

Standard output: ``<job>: args: {...}`` (JSON, keys sorted, paths as strings) first.
Nothing here imports torch: the jobs' flags and their cheap checks come from here, so that a bad flag is refused
before the seconds that importing torch takes.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import sys
import traceback
from pathlib import Path

from . import defaults as D
from .classes import CLASSES
from .errors import InputError, require_set, set_paths, shown, without_password
from .naming import name_part_problem
from .stop import EXIT_STOPPED, StopRequested, handlers_as_found, require_job_output, write_stand_ins

EXIT_OK, EXIT_BUG, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED = 128 + 2  # what a shell reports for a process ended by SIGINT


def values_line(job: str, label: str, values: dict) -> str:
    """``<job>: <label>: {...}``: one line of JSON, keys sorted, paths and other objects as strings; a URL's
    password (a camera's rtsp://user:password@...) shown as ***."""
    return without_password(f"{job}: {label}: {json.dumps(values, sort_keys=True, default=str)}")


def print_values(job: str, label: str, values: dict) -> None:
    print(values_line(job, label, values), flush=True)


SKIPPED_PRINTED = 20  # skipped files a job names on stderr; the rest are counted there, all listed in its outputs: a
                      # collection of 100k photos with a bad camera printed thousands of lines per job


def print_skipped(entries: list[dict], listed_in, reason_key: str = "reason", prefix: str = "skipped") -> None:
    """A job's skipped files ({file, reason}; the data jobs' reports say "problem") on stderr, a line each: the first
    SKIPPED_PRINTED, then one line counting the rest and naming *listed_in*, the output that lists every one with
    its reason (None: no output does, so every one is printed). *prefix* begins each line."""
    limit = SKIPPED_PRINTED if listed_in else len(entries)
    for entry in entries[:limit]:
        print(f"{prefix} {entry['file']}: {entry[reason_key]}", file=sys.stderr)
    if len(entries) > limit:
        print(f"{prefix} {len(entries) - limit} more files (all {len(entries)} with their reasons in {listed_in})",
              file=sys.stderr)


def error_message(error: BaseException) -> str:
    """The error in one line, the file first when known: ``<file>: <problem>``."""
    if isinstance(error, OSError) and error.filename is not None:
        message = f"{error.filename}: {error.strerror or error}"
    else:
        message = str(error) or type(error).__name__
        file = getattr(error, "file", None)
        if file and not message.startswith(str(file)):
            message = f"{file}: {message}"
    return "; ".join(part.strip() for part in message.splitlines() if part.strip())


# The local executor hands each job the run folder's lock (utils.executor.run_lock) as an open file descriptor and
# names it in this variable as "FD:PATH" of the lock file.
RUN_LOCK_VARIABLE = "MASK_WORKFLOW_RUN_LOCK"


def keep_the_run_lock_from_forked_helpers() -> None:
    """The job holds the run folder's lock while it runs; its forked helpers (DataLoader workers) close their copy
    when they start. They outlive a killed job by a few seconds, and a rerun meanwhile was refused as 'in use'.
    The descriptor is closed only while it is still the lock file (a variable copied into a rerun by hand, or
    inherited by a program the job runs, names a descriptor that is something else or nothing there)."""
    fd_text, _, path = os.environ.get(RUN_LOCK_VARIABLE, "").partition(":")
    try:
        fd = int(fd_text)
        lock = os.fstat(fd)
        if not os.path.samestat(lock, os.stat(path)):
            return
    except (ValueError, OSError):
        return
    held = [fd]  # in the job; a forked helper empties its copy, so that its own forked children close nothing

    def close_in_child():
        # only the job's helpers hold the lock: below them the number may name a file a helper opened since
        with contextlib.suppress(OSError, IndexError):
            number = held.pop()
            if os.path.samestat(os.fstat(number), lock):
                os.close(number)

    os.register_at_fork(after_in_child=close_in_child)


def run_job(main, parser, argv=None, job: str | None = None) -> int:
    """Parse *argv* (default: sys.argv), print the args line, run ``main(args)``; return the exit code.

    *job* names the job in every line (default: the file name of *main*'s script, e.g. "train").
    """
    job = job or Path(inspect.getfile(main)).stem
    keep_the_run_lock_from_forked_helpers()
    args = parser.parse_args(argv)
    print_values(job, "args", vars(args))
    # A program that runs the job in-process (tests, an embedding program) gets its handlers back. A job that is
    # the program keeps its own to its exit: a SIGTERM while the interpreter exits after main (a pool's, at
    # checkpoint.time) then finds the work done and the exit code main's, where the default action killed it
    # and the finished job was retried.
    with handlers_as_found() if main.__module__ != "__main__" else contextlib.nullcontext():
        try:
            return main(args)
        except StopRequested as stop:
            stand_ins = write_stand_ins(job, str(stop))
            names = ", ".join(p.name for p in stand_ins)
            kept = f" (stand-ins for the outputs not written yet: {names})" if stand_ins else ""
            print(f"{job}: stopped: {stop}{kept}", file=sys.stderr)
            return EXIT_STOPPED
        except (InputError, OSError) as error:
            print(f"{job}: error: {error_message(error)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except KeyboardInterrupt:  # Ctrl-C where the job has no handler of its own, or a second one: not a bug
            print(f"{job}: interrupted (Ctrl-C); every file it writes is complete or not there (written atomically)",
                  file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as error:  # a bug: what a developer needs is the traceback
            print(f"{job}: error: unexpected {type(error).__name__}: {error_message(error)} (a bug; traceback follows)",
                  file=sys.stderr)
            traceback.print_exc()
            return EXIT_BUG


# ----------------------------------------------------------------------------- flag value types
# argparse `type=` functions: a value out of range is refused while the flags are parsed, as
# argparse's own "usage: ... error: argument --x: ..." and exit 2, before any work starts, and
# the same rule holds for every script that has the flag.

def _number(text: str, kind, what: str):
    try:
        value = kind(text)
    except (ValueError, OverflowError):  # OverflowError: int() of an infinite float, from a --params file
        raise argparse.ArgumentTypeError(f"expected {what}, got {shown(text)}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {shown(text)}")
    return value


def int_at_least(minimum: int, what: str | None = None):
    """A type for whole numbers >= *minimum* (*what* names them in the message)."""
    def parse(text: str) -> int:
        value = _number(text, int, what or f"a whole number of at least {minimum}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what or f'a whole number of at least {minimum}'}, "
                                             f"got {shown(value)}")
        return value
    parse.__name__ = f"int_at_least_{minimum}"
    return parse


def int_between(low: int, high: int):
    """A type for whole numbers from *low* to *high*."""
    def parse(text: str) -> int:
        value = _number(text, int, f"a whole number from {low} to {high}")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected a whole number from {low} to {high}, got {shown(value)}")
        return value
    parse.__name__ = f"int_between_{low}_{high}"
    return parse


positive_int = int_at_least(1)
# --image-size of the jobs that build a model: what a model file may then hold (utils/detection/model_file.py)
image_size_px = int_between(32, D.MODEL_IMAGE_SIZE_MAX)
non_negative_int = int_at_least(0)
# --workers of the jobs that decode in processes: -1 picks a share of the CPUs, 0 the main process
worker_count = int_at_least(-1, "a number of processes (0 or more, or -1 for a share of the CPUs)")
# --seed of train: numpy's seed range; torch refuses seeds above 2**64 - 1, and train seeds each epoch's
# shuffle with seed * 100_003 + epoch
random_seed = int_between(0, 2**32 - 1)
# bits by which two 64-bit perceptual hashes may differ and the images still count as near duplicates; -1: no search
near_duplicate_bits = int_between(-1, 64)


def path_arg(text: str) -> Path:
    """A file or folder flag: empty text, which Path reads as the current folder, is refused (write . for it),
    as in an experiment file."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty value (write . for the current folder)")
    return Path(text)


# What a plot flag writes, by the file's extension: the formats matplotlib writes by itself or through Pillow
# (not .pgf, which needs LaTeX at drawing time, nor raw pixel buffers).
PLOT_FORMATS = (".png", ".svg", ".pdf", ".jpg", ".jpeg", ".tif", ".tiff", ".webp")


def plot_path(text: str) -> Path:
    """A plot file flag (train --loss-plot, plot_class_distribution --output, compare_runs --plot): matplotlib
    picks the format by the extension, so one it does not write is refused here, not when the plot is drawn (after
    an epoch of training, a traceback)."""
    path = path_arg(text)
    if path.suffix.lower() not in PLOT_FORMATS:
        raise argparse.ArgumentTypeError(f"expected a plot file ending in {', '.join(PLOT_FORMATS)}, "
                                         f"got {shown(text)}")
    return path


def plot_file_name(text: str) -> str:
    """A plot written into the job's output folder under this name (merge_predictions --histogram): a plain name,
    as file_name_part, with a plot's extension (plot_path)."""
    return str(plot_path(file_name_part(text)))


WRITER_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov")  # the containers the annotated video's writer (mp4v) fills


def annotated_video_path(text: str) -> str:
    """argparse type of --output-video: a file name with one of WRITER_EXTENSIONS (another would give a broken
    file, or fail only after the model loaded)."""
    if Path(text).suffix.lower() not in WRITER_EXTENSIONS:
        raise argparse.ArgumentTypeError(f"expected a video file name ending {', '.join(WRITER_EXTENSIONS)}, "
                                         f"got {text!r}")
    return text


def file_name_part(text: str) -> str:
    """A part of the output files' names (--prefix): no path separators, no '..', no leading dot
    (utils.naming.name_part_problem), so every file stays flat in its folder or archive and visible."""
    problem = name_part_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def positive_float(text: str) -> float:
    value = _number(text, float, "a finite number above 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number above 0, got {value:g}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float, "a finite number of 0 or more")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number of 0 or more, got {value:g}")
    return value


def fraction_below_one(text: str) -> float:
    """A number from 0 up to, not including, 1 (a decay rate: at 1 nothing would ever be averaged in)."""
    value = _number(text, float, "a number from 0 to below 1")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to below 1, got {value:g}")
    return value


def open_fraction(text: str) -> float:
    """A number above 0 and below 1 (an IoU threshold that some boxes must pass and some fail)."""
    value = _number(text, float, "a number above 0 and below 1")
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number above 0 and below 1, got {value:g}")
    return value


def fraction(text: str) -> float:
    """A number from 0 to 1 (a score threshold, a split fraction)."""
    value = _number(text, float, "a number from 0 to 1")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {value:g}")
    return value


# ----------------------------------------------------------------------------- shared argument groups

def add_set_input_args(parser, split_example: str) -> None:
    """--images/--annotations/--split-csv/--split of the jobs that read one set of VOC pairs."""
    parser.add_argument("--images", type=Path, nargs="+", required=True,
                        help="folder or .tar of images, or several .tar shards of one set (required)")
    parser.add_argument("--annotations", type=Path, nargs="+", default=None,
                        help="folder or .tar(s) of VOC .xml files (default: the --images paths)")
    parser.add_argument("--split-csv", type=Path, default=None,
                        help="split.csv (image, annotation, split) selecting the pairs; names are looked up "
                             "inside --images/--annotations (default: pair every image with its .xml)")
    parser.add_argument("--split", default=None,
                        help=f"only rows of this split from --split-csv, e.g. {split_example} (default: all rows)")


def add_label_map_arg(parser, writes_canonical: bool = False) -> None:
    """--label-map of the jobs that read VOC XML; main parses it with ``LabelMap.parse(args.label_map)``.

    The flag stays text in args, so the args line and run records show it as given.
    *writes_canonical*: the job writes XML, and says in --help that it writes the class names.
    """
    then = "; the XML written holds the class names, so later jobs need no map" if writes_canonical else ""
    parser.add_argument("--label-map", default=D.LABEL_MAP, metavar="SOURCE=CLASS,...",
                        help="read these object names of another data set as classes, e.g. "
                             "'with_incorrect_mask=mask_weared_incorrect, mask=with_mask, no_mask=without_mask' "
                             f"(CLASS: one of {', '.join(CLASSES)}){then} (default: none)")


def add_set_output_args(parser, report_contents: str) -> None:
    """--quality, --output-dir | --output-tar, --report, --no-progress of the jobs that write a set."""
    parser.add_argument("--quality", type=int_between(1, 100), default=D.JPEG_QUALITY,
                        help=f"JPEG quality 1-100 of the images it encodes as JPEG: augment's copies, preprocess "
                             f"--format jpg; a photo kept as it is keeps its own (default: {D.JPEG_QUALITY})")
    output = parser.add_mutually_exclusive_group(required=True)
    output.add_argument("--output-dir", type=Path, default=None,
                        help="folder of the pairs, replaced whole by the new set once it is complete; a folder "
                             "holding files no earlier preprocess or augment run wrote there is refused")
    output.add_argument("--output-tar", type=Path, default=None, help="flat .tar to pack the pairs into")
    parser.add_argument("--report", type=Path, default=None,
                        help=f"JSON report of {report_contents} (default: <output>.report.json next to the output)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar (default: shown)")


def check_set_args(args) -> None:
    """Raise InputError naming the flag when the set flags cannot be used."""
    if args.split and not args.split_csv:
        raise InputError("--split needs --split-csv")
    if not 1 <= args.quality <= 100:
        raise InputError(f"--quality must be 1-100, got {args.quality}")


def add_model_run_args(parser, threshold_use: str) -> None:
    """--score-threshold, --image-size, --batch-size, --workers, --device, --tta, --box-voting of the jobs that run a
    trained model over images.

    *threshold_use* says what the threshold decides in this job (its --help).
    """
    parser.add_argument("--score-threshold", type=fraction, default=None,
                        help=f"{threshold_use} (default: the model's operating threshold, chosen on the "
                             f"validation images when it was trained; {D.SCORE_THRESHOLD} for a model without one)")
    parser.add_argument("--image-size", type=image_size_px, default=None, metavar="PX",
                        help="working size the model runs at: each image's longer side is resized to it "
                             "(default: the model's, chosen on the validation images when it was trained; the "
                             "size it was trained at for a model without one)")
    parser.add_argument("--batch-size", type=positive_int, default=D.INFERENCE_BATCH_SIZE,
                        help=f"images per model call (default: {D.INFERENCE_BATCH_SIZE})")
    parser.add_argument("--workers", type=worker_count, default=D.DECODE_WORKERS,
                        help="image decoding processes; -1 picks a share of the CPUs, 0 decodes in the main "
                             f"process (default: {D.DECODE_WORKERS})")
    parser.add_argument("--device", default=D.DEVICE, choices=("auto", "cpu", "cuda"),
                        help=f"where the model runs; auto uses CUDA when available (default: {D.DEVICE})")
    add_tta_arg(parser, "image")
    add_box_voting_arg(parser)


def add_box_voting_arg(parser) -> None:
    """--box-voting / --no-box-voting: None when neither is given (the model's choice)."""
    parser.add_argument("--box-voting", action=argparse.BooleanOptionalAction, default=None,
                        help="move each kept box to the score-weighted mean of the boxes of its class that overlapped "
                             "it before non-maximum suppression (default: the model's choice, made on the validation "
                             "images when it was trained; off for a model without one)")


def add_tta_arg(parser, unit: str) -> None:
    """--tta / --no-tta: flip test-time augmentation, None when neither is given (the model's choice)."""
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help=f"also run each {unit} flipped left-right and fuse both passes' boxes with weighted box "
                             "fusion (about 2x slower) (default: the model's choice, made on the validation images "
                             "when it was trained; off for a model without one or an ensemble)")


def check_output_tag(tag: str | None) -> None:
    """--output-tag names output files (one job per shard or video): letters, digits, - and _ only."""
    if tag is not None and not tag.replace("-", "").replace("_", "").isalnum():
        raise InputError(f"--output-tag {tag!r}: use letters, digits, '-' and '_' only")


def video_source_kind(source: str) -> str:
    """What predict_video's --source names: "camera" (an index), "stream" (a URL) or "file"."""
    # ASCII digits only: '²' is a digit to str.isdigit() but no number to int()
    return "camera" if source.isascii() and source.isdigit() else ("stream" if "://" in source else "file")


def check_display() -> None:
    """InputError for --show where no window can open: on Linux without DISPLAY or WAYLAND_DISPLAY, where
    OpenCV's Qt would abort the whole process instead of raising."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise InputError("--show: no display here (neither DISPLAY nor WAYLAND_DISPLAY is set); run without --show, "
                         "the outputs are written all the same")


def require_set_inputs(images, annotations=None, split_csv=None) -> None:
    """The refusals of a set's --images and --annotations (utils.errors.require_set: missing, or no folder, .tar or
    .tar shards, as open_folder says) and of a --split-csv that cannot be opened (the OSError reading it raises),
    made before the job imports torch. Annotations read from the images' own paths (the same folder or .tar) are
    checked once."""
    require_set(images)
    if annotations is not None and set_paths(annotations) != set_paths(images):
        require_set(annotations)
    if split_csv is not None:
        with open(split_csv, "rb"):  # the error utils.data.pairs.read_csv_rows's open() would raise, in its words
            pass


def require_model_files(paths) -> None:
    """The model loader's refusals of each --model file that need no torch (utils.stop.require_job_output: missing,
    or a stopped job's stand-in), in its words: made before the job imports torch."""
    for path in paths:
        require_job_output(path, "model file")


def check_tensorboard_flags(args) -> None:
    """train's and hpo's --tensorboard-tar packs --tensorboard-dir: refused without it, before the job imports torch."""
    if args.tensorboard_tar and not args.tensorboard_dir:
        raise InputError("--tensorboard-tar needs --tensorboard-dir (the folder it packs)")


def check_model_run_args(args) -> None:
    """Raise InputError naming the flag when --score-threshold or --batch-size cannot be used."""
    if args.score_threshold is not None and not 0.0 <= args.score_threshold <= 1.0:
        raise InputError(f"--score-threshold must be between 0 and 1, got {args.score_threshold}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")


def check_distinct_outputs(outputs: dict, inputs: dict | None = None) -> None:
    """One InputError line when two of a job's output flags ({flag: path or None}) name the same file: the
    later write replaced the earlier (train's model file its checkpoint, which a rerun then refused); or when one
    names a file of *inputs* ({flag: [paths]}), which the job would write over (a checkpoint named as the model
    or the video was written over as the run went, then emptied)."""
    seen: dict[Path, str] = {}
    for flag, path in outputs.items():
        if path is None:
            continue
        where = Path(path).resolve()
        if where in seen:
            raise InputError(f"{path}: given as {seen[where]} and as {flag}; each output needs a file of its own")
        seen[where] = flag
    for flag, paths in (inputs or {}).items():
        for path in paths:
            if (where := Path(path).resolve()) in seen:
                raise InputError(f"{path}: given as {flag} and as {seen[where]}, which this job writes; give "
                                 f"{seen[where]} a file of its own")
