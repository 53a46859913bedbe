#!/usr/bin/env python3
"""Mask compliance over a video file, a stream URL or a webcam, with OpenCV.

    bin/predict_video.py --source clip.mp4 --model model.pt --output-dir out --output-video out/annotated.mp4
    bin/predict_video.py --source 0 --model model.pt --output-dir out --show --max-seconds 60   # webcam

Runs the detector on every --stride-th frame and writes OUTPUT_DIR/video_frames.csv (frame,
time, faces per class, percent with_mask of the faces kept), compliance_over_time.png,
video_summary.json (frames, the pooled figure over all processed frames as an estimate with
its 95 % interval, resampled in blocks of consecutive frames since nearby frames are not
independent, the mean of the per-frame figures) and, with --output-video, the processed frames with
their boxes (.mp4, .avi, .mkv or .mov, at fps / stride, 0.1 at least by up to 120 copies: a file's plays at real speed).
--show opens a live window (q or Esc stops; needs a display and OpenCV's GUI build). --max-frames (processed
frames) and --max-seconds bound a run; a camera has no end without them.
Detections count from the model's operating threshold unless --score-threshold is given. Several --model
files run as one ensemble, as in bin/predict.py (--fold-ensemble gives a workflow's videos the fold models
its photos get).
A file's frame times are its frame timestamps (a variable frame rate stays true), else frame number / fps,
and --max-seconds is of video time, as for a stream with a length (a recorded video at a URL); a camera's or
a live stream's (no length) are the wall-clock time since its first frame, and --max-seconds is of wall time (a
detector slower than the camera reads fewer frames a second than its fps; the annotated video holds each frame
until the next one's time, so it plays at real speed too);
a rate the source does not give (0, NaN, 1000 or more) is taken as 25 fps, and said, as is a file that
ends before the frame count its header declares (the summary's "notes", one line each).

Ctrl-C (the way to end a camera or stream run without --max-*) or SIGTERM stops the run at the next
frame: the CSV, plot, summary and annotated video are written for the frames done, and the summary's
"interrupted" names the signal. A second Ctrl-C stops at once, writing nothing: the outputs (the run record
too) are made at temporary names and replace the last run's all together once complete (utils.atomic.atomic_files),
so a second Ctrl-C before that leaves the last run's as they were, and one (or a SIGTERM) during the renames waits
until they are done. After Ctrl-C the exit is 0,
as for q or Esc: the user ended the run. After SIGTERM (even one after a Ctrl-C; not one that comes once the run
has ended of itself, while its outputs are written) it is 143, as for the workflow's other jobs (utils/stop.py):
a pool stopped the job, which is retried; what was not written yet gets a stand-in.
A video file's run stopped part way (Ctrl-C, SIGTERM, a kill) keeps its processed frames' detections in
OUTPUT_DIR/.video_frames.csv.progress.jsonl (or --checkpoint FILE, which a run in another folder resumes from);
run again with the same model files, settings, packages, code and video, it reads the frames again but runs the
model only on those not done, and its outputs are those of a run never stopped (utils/detection/video_progress.py).
Exit 0 on success; 2 with one line naming the source (or flag) when it cannot be read or used; 1 on a bug.
A stream URL's password (rtsp://user:password@camera/...) is shown as *** in every line and output file.
"""

import argparse
import signal
import sys
from pathlib import Path

from tqdm import tqdm

from utils import defaults as D
from utils.atomic import TEMP_NAME_EXTRA
from utils.cli import (WRITER_EXTENSIONS, add_box_voting_arg, add_tta_arg, annotated_video_path, check_display,
                       check_distinct_outputs, check_output_tag, fraction, positive_float, positive_int,
                       require_model_files, run_job, video_source_kind)
from utils.detection.compliance import video_compliance_line
from utils.errors import InputError, require_file, without_password
from utils.naming import video_output_names
from utils.provenance import run_record
from utils.stop import StopRequested, declare_outputs, stop_on_sigterm, stop_requested

NAME_MAX = 255  # bytes of a file name (Linux, macOS)


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="video file, stream URL (rtsp://, http://) or camera index")
    parser.add_argument("--model", nargs="+", required=True,
                        help="model file written by bin/train.py; several (the fold models of --fold-ensemble) run as "
                             "one ensemble, as in bin/predict.py")
    parser.add_argument("--output-dir", required=True, help="folder for the CSV, plot and summary")
    parser.add_argument("--output-video", type=annotated_video_path, default=None,
                        help=f"annotated video to write ({', '.join(WRITER_EXTENSIONS)}) (default: none)")
    parser.add_argument("--stride", type=positive_int, default=D.VIDEO_STRIDE,
                        help=f"process every N-th frame (default: {D.VIDEO_STRIDE})")
    parser.add_argument("--max-frames", type=positive_int, default=None,
                        help="stop after N processed frames (default: none)")
    parser.add_argument("--max-seconds", type=positive_float, default=None,
                        help="stop at this time: a file's (or recorded stream's) video time, a camera's or live "
                             "stream's wall-clock time since its first frame (default: none)")
    parser.add_argument("--show", action="store_true", help="show the annotated frames in a window (webcam mode)")
    add_tta_arg(parser, "frame")
    add_box_voting_arg(parser)
    parser.add_argument("--score-threshold", type=fraction, default=None,
                        help="count detections at or above this score (default: the model's operating threshold)")
    parser.add_argument("--output-tag", default=None,
                        help="name the outputs video_frames_TAG.csv, video_summary_TAG.json, ... (one job per video "
                             "of a workflow) (default: none)")
    parser.add_argument("--device", default=D.DEVICE, choices=("auto", "cpu", "cuda"), help=f"(default: {D.DEVICE})")
    parser.add_argument("--checkpoint", default=None,
                        help="keep a video file's progress (its processed frames' detections) in this file, not in "
                             "OUTPUT_DIR/.video_frames.csv.progress.jsonl: a run in another folder (a pool's retry) "
                             "resumes from it; emptied once the outputs are written (default: none)")
    return parser


def main(args) -> int:
    stop_on_sigterm()  # SIGTERM and Ctrl-C stop at the next frame, the outputs written for the frames done
    names = check_flags(args)
    # torch and OpenCV (the model, the video) are imported only now: a bad flag or a missing model file is refused
    # in a fraction of a second, not after the seconds that importing torch takes
    from utils.detection.video import stop_on_sigint

    previous = signal.signal(signal.SIGINT, signal.getsignal(signal.SIGINT))
    stop_on_sigint()
    try:
        return run(args, names)
    finally:
        signal.signal(signal.SIGINT, previous)


def check_flags(args) -> dict:
    """The output file names by role, once every flag is checked (no torch needed)."""
    check_output_tag(args.output_tag)
    names = video_output_names(args.output_tag)
    longest = max(names.values(), key=lambda name: len(name.encode()))
    if len(longest.encode()) + TEMP_NAME_EXTRA > NAME_MAX:  # checked now, not when the outputs are written
        raise InputError(f"--output-tag: too long: it makes the file name {longest[:40]}... of "
                         f"{len(longest.encode())} bytes, over the {NAME_MAX - TEMP_NAME_EXTRA} this job's names "
                         "(with their temporary names) may have")
    if args.show:
        check_display()
    outputs = [Path(args.output_dir) / name for name in names.values()]
    check_distinct_outputs({**{f"--output-dir's {path.name}": path for path in outputs},
                            "--output-video": args.output_video, "--checkpoint": args.checkpoint},
                           {"--model": args.model, "--source": [args.source]})
    declare_outputs(*outputs, args.output_video, checkpoints=[args.checkpoint])
    # the refusals of open_source and of the model loader, made before torch's import
    if video_source_kind(args.source) == "file":
        require_file(args.source, "video file")
    require_model_files(args.model)
    return names


def run(args, names: dict) -> int:
    from utils.detection.device import resolve_device
    from utils.detection.ensemble import box_voting_said, load_models
    from utils.detection.video import SIGTERM, open_source, predict_video
    from utils.detection.video_progress import VideoProgress, progress_path, run_key

    device = resolve_device(args.device)
    opened = open_source(args.source)  # before the model loads: a bad source is refused at once
    try:
        model, meta, threshold, source = load_models(args.model, device, args.score_threshold, tta=args.tta,
                                                     box_voting=args.box_voting)
    except BaseException:
        opened[0].release()
        raise
    print(f"predict_video: score threshold {threshold:g} ({source}); flip TTA {'on' if meta['tta'] else 'off'} "
          f"({meta['tta_source']}); {box_voting_said(meta)}")
    inputs = [*args.model] + ([args.source] if opened[1] == "file" else [])

    def record():  # written with the other outputs, as one set
        # the source as shown everywhere: a stream URL's password is not kept in the record
        return run_record("predict_video", {**vars(args), "source": without_password(args.source),
                                            "device": str(device)}, inputs)

    journal = None
    if opened[1] == "file":  # a camera's or a live stream's frames do not come again: no resume
        try:
            key = run_key(args.model, device.type, args.source, args.stride, threshold, meta["tta"],
                          meta["working_size"], by_content=args.checkpoint is not None,
                          box_vote_iou=meta["box_vote_iou"])
            journal = VideoProgress(args.checkpoint or progress_path(args.output_dir, names["frames_csv"]), key,
                                    checkpoint=args.checkpoint is not None)
        except BaseException:
            opened[0].release()
            raise
        if journal.stale:
            print(f"predict_video: {journal.path.name}: the progress of a stopped run with another model, setting "
                  "or video (or unreadable); starting afresh")
        elif journal.done:
            print(f"predict_video: resuming a stopped run: the detections of its {len(journal.done)} processed "
                  f"frames are taken from {journal.path.name}; the frames are read again")
    with tqdm(desc="frames", unit="frame", file=sys.stderr, disable=None) as bar:
        summary = predict_video(model, device, args.source, args.output_dir, threshold, stride=args.stride,
                                output_video=args.output_video, show=args.show, max_frames=args.max_frames,
                                max_seconds=args.max_seconds, tta=meta["tta"], progress=bar.update,
                                settings={"model": args.model[0] if len(args.model) == 1 else args.model,
                                          "working_size": meta["working_size"], "score_threshold_source": source,
                                          "box_vote_iou": meta["box_vote_iou"]},
                                tag=args.output_tag, calibration=meta.get("quantification"), opened=opened,
                                record=record, journal=journal)
    for note in summary["notes"]:
        print(f"predict_video: note: {note}", file=sys.stderr)
    print(video_compliance_line(summary))
    print(f"{summary['frames_processed']} of {summary['frames_read']} frames processed in "
          f"{summary['processing_seconds']} s; outputs in {args.output_dir}")
    if stop_requested() and summary["interrupted"]:  # also one after a Ctrl-C had stopped the run: not all done
        after = "" if summary["interrupted"] == SIGTERM else f" after {summary['interrupted']} had stopped the run"
        raise StopRequested(f"SIGTERM received{after}; stopped after {summary['frames_processed']} processed frames, "
                            "whose outputs are written (the summary says interrupted)")
    if stop_requested():  # while a run that had ended of itself wrote its outputs: they are all there
        print(f"predict_video: note: SIGTERM received once the run had ended ({summary['ended']}); its outputs "
              "are complete", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main, get_args_parser()))
