"""Mask compliance over a video, a stream or a webcam (bin/predict_video.py), with OpenCV.

Every `stride`-th frame is run through the detector; per processed frame the counts per
class and the percent properly masked go into a CSV; the processed frames, with their
boxes drawn, into an annotated video (at fps / stride, so a file's plays at real speed; a live
source's frames are each held until the next one's clock time, so its plays at real speed too); a
plot shows compliance over time, and a summary JSON the whole run: the pooled figure as an
estimate with its 95 % bootstrap interval (utils/detection/quantify.py). Nearby frames show the
same faces, so they are not independent samples: the interval resamples blocks of consecutive
processed frames (VIDEO_BLOCK_SECONDS of video each), not single frames. `show` opens a live
window (the webcam mode; q or Esc stops). Runs are bounded by max_frames / max_seconds, which a
camera needs: it has no end. A file's frame times are its timestamps (video time), and so are a
stream's with a length (a recorded video at a URL); a camera's or a live stream's (no length) are
the wall-clock time since its first frame was read, so max_seconds bounds the wall time there: a
detector slower than the camera reads fewer frames a second than its fps, and a count of
frames / fps would lag the clock and run long. Its resampling blocks are then 10 s of wall time.
"""

from __future__ import annotations

import csv
import math
import signal
import threading
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from .. import defaults as D
from ..atomic import FileSet, atomic_files, json_text
from ..classes import CLASSES, NAME_OF
from ..cli import video_source_kind
from ..errors import InputError, require_file, without_password
from ..naming import video_output_names
from ..stop import stop_requested
from .compliance import compliance, merge_compliance
from .inference import (decode_bound, detect, detection_floor, pixels_for_model, rescaled_boxes, to_model_input,
                        too_thin)
from .inference_size import working_size
from .quantify import Calibration, Units, calibration_problem, calibration_summary, set_estimates, soft_counts
from .plots import draw_detections

CSV_FIELDS = ("frame", "time_s", "faces", *CLASSES, "percent_properly_masked")
ASSUMED_FPS = D.VIDEO_ASSUMED_FPS  # where the source gives no usable frame rate, said in the summary
SIGTERM, SIGINT = "SIGTERM", "Ctrl-C (SIGINT)"  # what stopped an interrupted run (the summary's "interrupted")
LIVE_TIMES = "wall clock"  # the summary's frame_times for a camera or a live stream
wall_clock = time.monotonic  # a live source's frame times; a module name, so that a test can give it a fake clock
_sigint = threading.Event()


def _on_sigint(signum, frame) -> None:
    if _sigint.is_set():  # a second Ctrl-C: the run did not stop at its frame (a stalled stream), so at once
        raise KeyboardInterrupt
    _sigint.set()


def stop_on_sigint() -> None:
    """From now on, a Ctrl-C (SIGINT) stops a run at the next frame, its outputs written for the frames done;
    a second one interrupts at once (main thread only). SIGTERM: utils.stop.stop_on_sigterm."""
    _sigint.clear()
    signal.signal(signal.SIGINT, _on_sigint)


def stop_reason() -> str | None:
    """SIGTERM or SIGINT when one asked the run to stop (with their handlers installed), else None."""
    return SIGTERM if stop_requested() else SIGINT if _sigint.is_set() else None


def open_source(source: str) -> tuple[cv2.VideoCapture, str]:
    """(capture, kind) for a file, a URL (rtsp://, http://) or a camera index; InputError naming it."""
    kind = video_source_kind(source)
    name = without_password(source)  # as messages show it
    if kind == "file":
        require_file(source, "video file")
    capture = cv2.VideoCapture(int(source) if kind == "camera" else source)
    if not capture.isOpened():
        raise InputError(f"{name}: cannot open the {kind} (not a video OpenCV can read, or not reachable)")
    # From the container's header, before any frame is decoded (cameras and some streams say 0 until then).
    width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    try:
        check_frame_pixels(width, height, name, kind)
        ok, frame = capture.read()
        if not ok:
            raise InputError(f"{name}: the {kind} opened but gave no frame (empty, damaged or unsupported codec)")
        check_frame_pixels(frame.shape[1], frame.shape[0], name, kind)
    except InputError:
        capture.release()
        raise
    # A file, or a recorded video at a URL (it has a length), starts again at frame 0 (reopening works where a
    # backend cannot seek); a camera or a live stream goes on from here
    if kind == "file" or (kind == "stream" and has_length(capture)):
        capture.release()
        capture = cv2.VideoCapture(source)
    return capture, kind


def has_length(capture: cv2.VideoCapture) -> bool:
    """Whether the source's header gives a frame count: a file or a recorded video at a URL, not a live stream."""
    count = capture.get(cv2.CAP_PROP_FRAME_COUNT)
    return math.isfinite(count) and 0 < count < 2 ** 31


def check_frame_pixels(width: int, height: int, source: str, kind: str = "video") -> None:
    """InputError naming *source* when a frame of width x height is over defaults.IMAGE_MAX_PIXELS, the limit
    of every image the jobs read: a frame becomes a float tensor of 12 bytes a pixel for the detector."""
    if width * height > D.IMAGE_MAX_PIXELS:
        raise InputError(f"{source}: the {kind}'s frames are {width}x{height} = {width * height:,} pixels, over the "
                         f"limit of {D.IMAGE_MAX_PIXELS:,}")


@dataclass
class VideoRun:
    frames_read: int = 0
    # Per processed frame, 8 numbers in arrays (64 bytes), not its CSV row and compliance dicts (~1.1 kB): a camera's
    # hours are millions of frames. The CSV rows go to the file as the frames come (add_frame's caller).
    times: array = field(default_factory=lambda: array("d"))  # its time_s, as the CSV has it
    percents: array = field(default_factory=lambda: array("d"))  # percent properly masked, NaN: no face
    counts: array = field(default_factory=lambda: array("q"))  # faces kept per class (CLASSES order), K a frame
    soft: array = field(default_factory=lambda: array("d"))  # score sums per class down to the floor, K a frame
    last_time: float | None = None  # the time of the last frame read (s)
    timed_by_rate: int = 0  # frames read whose time is the one before + 1 / fps (no valid timestamp)
    ended: str | None = None  # what ended the run: the end of the source, a bound, the viewer, a signal
    live_start: float | None = None  # a live source: wall_clock() when its first frame was read
    frames_written: int = 0  # to the annotated video: a live source's held frames too
    last_drawn: np.ndarray | None = None  # a live source: the frame held in the annotated video until the next
    frames_dropped: int = 0  # a live source's frames that came while the video was ahead of the clock
    pauses_shortened: int = 0  # a live source's pauses over VIDEO_HOLD_MAX_SECONDS, held only that long
    slots_skipped: int = 0  # the video frames those pauses did not get: the video's clock runs that much behind

    @property
    def processed(self) -> int:
        return len(self.times)

    def add_frame(self, time_s: float, figure: dict, soft) -> None:
        """Record a processed frame: its rounded time, compliance() *figure* and class_sums *soft*."""
        percent = figure["percent_properly_masked"]
        self.times.append(time_s)
        self.percents.append(math.nan if percent is None else percent)
        self.counts.extend(figure["counts"][name] for name in CLASSES)
        self.soft.extend(soft)

    def count_matrix(self) -> np.ndarray:
        """Faces kept per class, one row a processed frame."""
        return np.frombuffer(self.counts, dtype=np.int64).reshape(-1, len(CLASSES))

    def frame_time(self, capture, fps: float) -> tuple[float, bool]:
        """(time, by the rate) of a file's frame just read: its timestamp when valid (finite, after the one
        before; a variable frame rate stays true), else the time before + 1 / fps (from 0)."""
        seconds = capture.get(cv2.CAP_PROP_POS_MSEC) / 1000
        if math.isfinite(seconds) and (seconds > self.last_time if self.last_time is not None else seconds >= 0):
            return seconds, False
        return (0.0 if self.last_time is None else self.last_time + 1 / fps), True

    def live_time(self) -> float:
        """The time of a camera's or live stream's frame just read: the wall-clock seconds since its first frame
        was read (0 for that one). Its frames / fps would lag the clock when the detector is the slower."""
        now = wall_clock()
        if self.live_start is None:
            self.live_start = now
        return now - self.live_start

    def write_live(self, writer, drawn: np.ndarray, time_s: float, video_fps: float) -> None:
        """Write a live source's processed frame at its clock time *time_s* into a video of *video_fps*: the frame
        before is held until then (a detector slower than the camera: the video still plays at real speed), at
        most VIDEO_HOLD_MAX_SECONDS (a stalled stream), and a frame that comes while the video is more than a
        frame ahead of the clock (a camera faster than the rate it gives) is left out of the video (not the CSV)."""
        slot = round(time_s * video_fps) - self.slots_skipped  # the video frame this one's time falls in
        if self.last_drawn is not None:
            held = slot - self.frames_written
            most = max(0, round(D.VIDEO_HOLD_MAX_SECONDS * video_fps) - 1)  # copies: the frame's own slot is one
            if held > most:
                self.pauses_shortened += 1
                self.slots_skipped += held - most
                held = most
            for _ in range(held):
                if stop_reason():  # a stop is not kept waiting by the copies of a long pause
                    break
                writer.write(self.last_drawn)
                self.frames_written += 1
            if self.frames_written > slot + 1:
                self.frames_dropped += 1
                return
        writer.write(drawn)
        self.frames_written += 1
        self.last_drawn = drawn

    def times_from(self, live: bool) -> str:
        if live:
            return LIVE_TIMES
        if not self.timed_by_rate:
            return "timestamps"
        return "frame rate" if self.timed_by_rate >= self.frames_read else (
            f"timestamps, {self.timed_by_rate} frames without one: by the frame rate")


def _annotate(frame_bgr: np.ndarray, out: dict) -> np.ndarray:
    image = Image.fromarray(cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB))
    drawn = draw_detections(image, out["boxes"], out["labels"], out["scores"])
    return cv2.cvtColor(np.asarray(drawn), cv2.COLOR_RGB2BGR)


def predict_video(model, device, source: str, output_dir, score_threshold: float, stride: int = 1,
                  output_video=None, show: bool = False, max_frames: int | None = None,
                  max_seconds: float | None = None, tta: bool = False, settings: dict | None = None,
                  progress=None, tag: str | None = None, calibration: dict | None = None,
                  opened: tuple | None = None, record=None, journal=None) -> dict:
    """Run the detector over *source*; write the CSV, plot, summary (and video, and the run record *record()*
    gives) as one set that replaces the last run's (utils.atomic.atomic_files); return the summary.
    *calibration* is the model file's validation record, for the adjusted estimators. A SIGTERM (with
    utils.stop.stop_on_sigterm) or a Ctrl-C (with stop_on_sigint) stops it at the next frame: the outputs
    are written for the frames done and the summary's "interrupted" names the signal. *opened*: open_source's
    (capture, kind) of *source*, opened by the caller (released here). *journal* (a video_progress.VideoProgress,
    closed here) gives the frames an earlier, stopped run processed and keeps this run's; it is finished (nothing
    left to resume) once the outputs of a run that was not stopped are written."""
    if stride < 1:
        if opened:
            opened[0].release()
        raise InputError(f"--stride must be at least 1, got {stride}")
    capture, kind = opened or open_source(source)
    name = without_password(source)  # as the messages, the summary and the plot show it
    run, writer, csv_file, started = VideoRun(), None, None, time.perf_counter()
    video_target = Path(output_video) if output_video else None
    # the outputs replace the last run's all together at the end of the block, or none does (a second Ctrl-C
    # while they are written, an error)
    with atomic_files() as outputs:
        output_dir, names = Path(output_dir), video_output_names(tag)
        csv_path = output_dir / names["frames_csv"]
        csv_tmp = outputs.path(csv_path)  # its writes name it (outputs.naming), not the frame loop's errors
        try:  # the capture is released whatever happens, and the writer before its file is renamed
            output_dir.mkdir(parents=True, exist_ok=True)
            reported_fps = capture.get(cv2.CAP_PROP_FPS)
            fps_assumed = not (math.isfinite(reported_fps) and 0 < reported_fps < D.VIDEO_FPS_MAX)  # cameras: 0
            fps = ASSUMED_FPS if fps_assumed else reported_fps
            declared = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if kind != "camera" and has_length(capture) else None
            # A camera, or a stream without a length (a live one), is timed by the wall clock; a file, or a stream
            # with a length (a recorded video at a URL), by its timestamps: its video time, however slow the detector
            live = kind == "camera" or (kind == "stream" and declared is None)
            # in the summary; the rates need it. The caller's when given: an ensemble's members each run at their own
            # (working_size gives None), and predict's outputs give the size ensemble.load_ensemble says
            settings = dict(settings or {})
            settings["working_size"] = settings.pop("working_size", working_size(model))
            bound = decode_bound(model)  # the size predict would reduce the frame to, as a photo
            tmp_video = outputs.path(video_target) if video_target else None
            video_rate, copies = writer_rate(fps / stride)
            with outputs.naming(csv_path):  # a full disk while a row is written (a row a frame) names the file
                csv_file = open(csv_tmp, "w", encoding="utf-8")
                rows = csv.DictWriter(csv_file, fieldnames=CSV_FIELDS, lineterminator="\n")
                rows.writeheader()
            while True:
                run.ended = stop_reason()
                if run.ended:
                    break
                if max_frames is not None and run.processed >= max_frames:
                    run.ended = "--max-frames"
                    break
                ok, frame = capture.read()
                if not ok:
                    run.ended = "the end of the source"
                    break
                check_frame_pixels(frame.shape[1], frame.shape[0], name, kind)  # a stream may change size
                if thin := too_thin(model, *frame.shape[:2]):  # as predict skips such a photo: not 0 faces a frame
                    raise InputError(f"{name}: the {kind}'s frames: {thin}; crop or pad it to a less elongated shape")
                time_s, by_rate = (run.live_time(), False) if live else run.frame_time(capture, fps)
                if max_seconds is not None and time_s >= max_seconds:
                    run.ended = "--max-seconds"  # this frame is past the run: not counted as read
                    break
                index, run.frames_read, run.last_time = run.frames_read, run.frames_read + 1, time_s
                run.timed_by_rate += by_rate
                if index % stride:
                    continue
                done = journal.detections(index) if journal is not None else None
                if done is not None:  # found by the stopped run this one resumes
                    out, soft = done
                else:
                    rgb = torch.from_numpy(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)).permute(2, 0, 1)
                    given = pixels_for_model(model, rgb, bound)
                    (out,) = detect(model, [to_model_input(given, device)], tta=tta,
                                    score_threshold=detection_floor(score_threshold))
                    out["boxes"] = rescaled_boxes(out["boxes"], tuple(given.shape[-2:]), tuple(rgb.shape[-2:]))
                    # to 4 decimals, as predict (so a merge) and the service keep them: the same sums, the same figure
                    soft = list(soft_counts(out["labels"].tolist(), out["scores"].tolist()).values())
                    keep = out["scores"] >= score_threshold  # counted, drawn and listed: those at the threshold
                    out = {key: value[keep] for key, value in out.items()}
                    if journal is not None:
                        journal.add(index, out, soft)
                labels = [NAME_OF[int(label)] for label in out["labels"].tolist()]
                figure = compliance(labels)
                run.add_frame(round(time_s, 3), figure, soft)
                with outputs.naming(csv_path):
                    rows.writerow({"frame": index, "time_s": round(time_s, 3), "faces": figure["faces"],
                                   **figure["counts"], "percent_properly_masked": figure["percent_properly_masked"]})
                if tmp_video is not None or show:
                    drawn = _annotate(frame, out)
                    if tmp_video is not None:
                        if writer is None:
                            height, width = drawn.shape[:2]
                            # at fps / stride, so that a file's plays at real speed (under 1 frame a second too)
                            writer = cv2.VideoWriter(str(tmp_video), cv2.VideoWriter_fourcc(*"mp4v"),
                                                     video_rate, (width, height))
                            if not writer.isOpened():
                                raise InputError(f"{video_target}: OpenCV cannot write this video file")
                        if live:
                            run.write_live(writer, drawn, time_s, video_rate)
                        else:
                            for _ in range(copies):
                                writer.write(drawn)
                            run.frames_written += copies
                    if show and _show(drawn):
                        run.ended = "the viewer (q or Esc)"
                        break
                if progress is not None:
                    progress(1)
        finally:
            capture.release()
            if journal is not None:
                journal.close()
            if csv_file is not None:
                with outputs.naming(csv_path):  # the last rows' flush
                    csv_file.close()
            if writer is not None:
                writer.release()
            if show:
                cv2.destroyAllWindows()
        if video_target and not run.processed:
            outputs.drop(video_target)  # no frame drawn: the last run's video stays, not an empty one
        interrupted = run.ended if run.ended in (SIGTERM, SIGINT) else None
        if not run.processed and not interrupted:
            raise InputError(f"{name}: no frame was processed (check --max-frames/--max-seconds and the source)")
        notes = []
        if fps_assumed:
            uses = ("the annotated video, the resampling blocks and the frames without a timestamp" if not live
                    else "the annotated video")  # a live source's times and blocks are the clock's
            notes.append(f"the {kind} gives no usable frame rate ({reported_fps:g}); {fps:g} fps assumed for {uses}")
        # Containers whose count is duration x fps (.ts, .mkv, .webm, variable-rate mp4) often end a frame or two
        # short: only a larger gap is said
        if (run.ended == "the end of the source" and declared is not None
                and declared - run.frames_read > max(2, declared // 100)):
            notes.append(f"the {kind} ended after {run.frames_read} of the {declared} frames its header declares "
                         "(truncated or damaged?)")
        if interrupted:
            notes.append(f"interrupted by {interrupted} after {run.frames_read} frames read: the outputs hold the "
                         f"{run.processed} processed frames")
        video = {"fps": round(fps, 3), "fps_reported": reported_fps if math.isfinite(reported_fps) else None,
                 "fps_assumed": fps_assumed, "frames_declared": declared, "ended": run.ended,
                 "interrupted": interrupted, "frame_times": run.times_from(live),
                 "processed_per_second": round(processed_rate(run, fps, stride, live), 3), "notes": notes}
        if video_target and run.processed:
            video["annotated_video"] = {"fps": round(video_rate, 3), "frames": run.frames_written,
                                        "frames_held": run.frames_written - run.processed + run.frames_dropped,
                                        "frames_dropped": run.frames_dropped,
                                        "pauses_shortened": run.pauses_shortened}
            if copies > 1:
                faster = video_rate / (fps / stride * copies)  # over 1 where the copies are VIDEO_WRITER_MAX_COPIES
                capped = f"; at most {copies} copies, it plays {faster:.3g} times real speed" if faster > 1.001 else ""
                notes.append(f"the annotated video holds each processed frame {copies} times: its {fps / stride:.3g} "
                             f"frames a second are under the {D.VIDEO_WRITER_MIN_FPS:g} the video writer takes{capped}")
            if run.pauses_shortened:
                notes.append(f"{run.pauses_shortened} pause(s) of the {kind} over {D.VIDEO_HOLD_MAX_SECONDS:g} s "
                             f"are {D.VIDEO_HOLD_MAX_SECONDS:g} s in the annotated video; the CSV keeps their times")
            if run.frames_dropped:
                notes.append(f"{run.frames_dropped} processed frame(s) came while the annotated video was ahead of "
                             f"the clock (a {kind} faster than the {fps:g} fps taken) and are not in it; the CSV "
                             "lists them")
        summary = _write_outputs(run, outputs, output_dir, name, kind, fps, stride, score_threshold, tta, settings,
                                 video_target if run.processed else None, time.perf_counter() - started,
                                 names, csv_path, calibration, video, record)
    if journal is not None and not interrupted:  # the whole run's outputs are in place: nothing to resume
        journal.finish()
    return summary


def writer_rate(rate: float) -> tuple[float, int]:
    """(the annotated video's frame rate, copies written of each processed frame) for processed frames that come
    *rate* a second: *rate* and 1, or where *rate* is under defaults.VIDEO_WRITER_MIN_FPS, which OpenCV's writer
    takes (it refuses 0.001 fps or less), the fewest copies that reach it: the video still plays at real speed; but
    at most defaults.VIDEO_WRITER_MAX_COPIES, the rate then raised to VIDEO_WRITER_MIN_FPS (it plays faster)."""
    if rate * D.VIDEO_WRITER_MAX_COPIES <= D.VIDEO_WRITER_MIN_FPS:  # not 0.1 / rate: 0.1 / 5e-324 is inf
        return D.VIDEO_WRITER_MIN_FPS, D.VIDEO_WRITER_MAX_COPIES
    copies = max(1, math.ceil(D.VIDEO_WRITER_MIN_FPS / rate - 1e-9))  # 1e-9: 0.1 / (0.1 / 3) is 3.0000000000000004
    return rate * copies, copies


def processed_rate(run: VideoRun, fps: float, stride: int, live: bool) -> float:
    """Processed frames a second of the run's time: fps / stride where the times are the source's; for a live
    source the rate its frames' clock times show (a detector slower than the camera takes fewer)."""
    if live and run.processed > 1 and (span := run.times[-1] - run.times[0]) > 0:
        return (run.processed - 1) / span
    return fps / stride


def video_estimates(run: VideoRun, per_second: float, threshold: float, tta: bool,
                    calibration: dict | None, size: int | None = None) -> dict:
    """The pooled figure over the processed frames (detected at *threshold*, flip TTA or not, at working size
    *size* px) with its interval, resampling blocks of consecutive frames ("units" are blocks;
    "resampling" says how many frames each holds). Only whole blocks count: the frames after the last
    whole one join it, so a clip shorter than two blocks is one unit and gets no interval."""
    block = max(1, round(D.VIDEO_BLOCK_SECONDS * per_second))  # *per_second*: processed frames a second
    note = calibration_problem(calibration, threshold, tta, size)
    units = whole_blocks(Units.of(run.count_matrix(), np.frombuffer(run.soft, dtype=np.float64)), block)
    report = set_estimates(units, None if note else Calibration.from_record(calibration), note, unit="block")
    report["calibration"] = calibration_summary(calibration, note)
    report["resampling"] = {"frames": run.processed, "block_frames": block, "blocks": len(units),
                            "why": f"blocks of {D.VIDEO_BLOCK_SECONDS:g} s of consecutive processed frames: nearby "
                                   "frames show the same faces and are not independent samples"}
    return report


def whole_blocks(units: Units, size: int) -> Units:
    """Consecutive *units* summed in blocks of at least *size*: a last, shorter block joins the one before."""
    if len(units) <= size:
        return units.blocks(size)
    starts = np.arange(0, len(units) - size + 1, size)  # each start with a whole block after it
    return Units(np.add.reduceat(units.counts, starts),
                 None if units.soft is None else np.add.reduceat(units.soft, starts))


def _show(frame_bgr: np.ndarray) -> bool:
    """Show one frame; True when the viewer pressed q or Esc. InputError where there is no display."""
    try:
        cv2.imshow("mask compliance (q: quit)", frame_bgr)
        return cv2.waitKey(1) & 0xFF in (ord("q"), 27)
    except cv2.error as error:
        raise InputError(f"--show: cannot open a window here ({str(error).strip().splitlines()[-1]}); "
                         "this OpenCV build or machine has no display") from None


def _write_outputs(run: VideoRun, outputs: FileSet, output_dir: Path, source, kind, fps, stride, threshold, tta,
                   settings, video_path, seconds, names: dict, csv_path: Path, calibration: dict | None, video: dict,
                   record) -> dict:
    """Write the plot, summary and run record at their temporary paths in *outputs* (the CSV is written as the
    frames come, at *csv_path*'s); return the summary."""
    from .plots import plot_compliance_over_time

    plot_path = output_dir / names["plot"]
    counts = run.count_matrix()
    with outputs.writing(plot_path) as tmp:  # a full disk's error names the file, as predict's (FileSet.writing)
        plot_compliance_over_time(np.frombuffer(run.times), np.frombuffer(run.percents), counts.sum(axis=1), tmp,
                                  source, with_mask=counts[:, CLASSES.index("with_mask")])
    with_faces = [percent for percent in run.percents if not math.isnan(percent)]
    # the video covered: up to the last frame read, and that frame's duration at the frame rate
    covered = 0.0 if run.last_time is None else run.last_time + 1 / fps
    summary = {**(settings or {}), "source": source, "kind": kind, **video, "stride": stride,
               "score_threshold": threshold, "tta": tta, "frames_read": run.frames_read,
               "frames_processed": run.processed, "frames_with_faces": len(with_faces),
               "video_seconds": round(covered, 3), "processing_seconds": round(seconds, 2),
               "overall": merge_compliance([{"counts": dict(zip(CLASSES, counts.sum(axis=0).tolist()))}]),
               **video_estimates(run, video["processed_per_second"], threshold, tta, calibration,
                                 settings.get("working_size")),
               "mean_percent_per_frame": round(sum(with_faces) / len(with_faces), 2) if with_faces else None,
               "outputs": {"frames_csv": str(csv_path), "plot": str(plot_path),
                           "video": str(video_path) if video_path else None}}
    with outputs.writing(output_dir / names["summary"]) as tmp:
        tmp.write_text(json_text(summary), encoding="utf-8")
    if record is not None:
        with outputs.writing(output_dir / names["run_record"]) as tmp:
            tmp.write_text(json_text(record()), encoding="utf-8")
    return summary
