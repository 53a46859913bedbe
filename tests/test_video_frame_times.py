"""A video's frame times: a file's timestamps, a live source's wall clock (its annotated video held to it), and the
whole blocks of frames that an interval is resampled in."""

from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest


class _Capture:
    """Stands in for a cv2.VideoCapture after a read: the timestamps of the frames, one per frame_time call."""

    def __init__(self, msec):
        self.msec = iter(msec)

    def get(self, prop):
        assert prop == cv2.CAP_PROP_POS_MSEC
        return next(self.msec)


def test_frame_times_are_the_timestamps_when_valid_else_the_one_before_plus_a_frame():
    from utils.detection.video import VideoRun

    run, times = VideoRun(), []
    capture = _Capture([0, 50, 200, float("nan"), 100, 450])  # a variable rate; NaN and a step back: no time
    for _ in range(6):
        time_s, by_rate = run.frame_time(capture, fps=10.0)
        times.append((round(time_s, 3), by_rate))
        run.last_time, run.frames_read, run.timed_by_rate = time_s, run.frames_read + 1, run.timed_by_rate + by_rate
    assert times == [(0.0, False), (0.05, False), (0.2, False), (0.3, True), (0.4, True), (0.45, False)]
    assert run.times_from(False) == "timestamps, 2 frames without one: by the frame rate"


@pytest.mark.slow
def test_a_live_sources_frame_times_are_the_wall_clock_and_max_seconds_bounds_wall_time(clip, tiny_model_file,
                                                                                      tmp_path, monkeypatch):
    """A camera or stream whose frames come faster than the detector takes them: its frames / fps lagged the
    clock, and --max-seconds ran long (a 6 fps camera, 0.5 s a frame: --max-seconds 1 took 6 frames, 3 s)."""
    import torch

    from utils.detection import video as video_module
    from utils.detection.evaluation import load_trained_model

    model = load_trained_model(tiny_model_file, "cpu")[0]
    clock = [100.0]  # a fake wall clock that only the detector moves on: no test timing
    monkeypatch.setattr(video_module, "wall_clock", lambda: clock[0])
    detect = video_module.detect

    def slow_detect(*args, **kwargs):
        clock[0] += 0.5
        return detect(*args, **kwargs)

    monkeypatch.setattr(video_module, "detect", slow_detect)
    camera = (cv2.VideoCapture(str(clip)), "camera")  # the 6 fps clip, read as a camera gives its frames
    summary = video_module.predict_video(model, torch.device("cpu"), "0", tmp_path / "out", 0.5, max_seconds=1,
                                         opened=camera, output_video=tmp_path / "out" / "a.mp4")
    rows = list(csv.DictReader(open(tmp_path / "out" / "video_frames.csv")))
    assert [float(r["time_s"]) for r in rows] == [0.0, 0.5]  # the frame read at 1.0 s is past the run
    assert summary["ended"] == "--max-seconds" and summary["frame_times"] == "wall clock"
    assert summary["frames_read"] == 2
    # 2 frames processed a second of wall time, not the camera's 6: blocks of 10 s hold 20 of them, not 60
    assert summary["processed_per_second"] == 2.0 and summary["resampling"]["block_frames"] == 20
    # the annotated video at 6 fps holds the first frame until the second's time, 0.5 s: it plays at real speed
    # (it held 2 frames in 2, playing 3 times too fast)
    assert summary["annotated_video"] == {"fps": 6.0, "frames": 4, "frames_held": 2, "frames_dropped": 0,
                                          "pauses_shortened": 0}
    video = cv2.VideoCapture(str(tmp_path / "out" / "a.mp4"))
    assert video.get(cv2.CAP_PROP_FRAME_COUNT) == 4
    video.release()

    # a recorded video at a URL has a length: it keeps its video time, however slow the detector
    url = video_module.open_source(f"file://{clip}")
    assert url[1] == "stream"
    summary = video_module.predict_video(model, torch.device("cpu"), f"file://{clip}", tmp_path / "url", 0.5,
                                         max_seconds=0.4, opened=url)
    rows = list(csv.DictReader(open(tmp_path / "url" / "video_frames.csv")))
    assert summary["frame_times"] == "timestamps" and [float(r["time_s"]) for r in rows] == [0.0, 0.167, 0.333]


class _Writer:
    def __init__(self):
        self.frames = []

    def write(self, frame):
        self.frames.append(int(frame[0, 0, 0]))


def test_a_live_sources_video_holds_frames_to_the_clock_shortens_long_pauses_and_drops_frames_ahead_of_it(
        monkeypatch):
    # A stalled stream's hour was 90,000 copies of one frame (minutes of encoding before a stop could end the run),
    # and a camera faster than the rate it gives made the video play slow.
    from utils import defaults as D
    from utils.detection import video as video_module

    frame = lambda value: np.full((2, 2, 3), value, np.uint8)  # noqa: E731
    run, writer = video_module.VideoRun(), _Writer()
    monkeypatch.setattr(D, "VIDEO_HOLD_MAX_SECONDS", 1.0)
    for value, time_s in ((1, 0.0), (2, 0.5), (3, 10.5), (4, 11.0)):  # 4 fps: a pause of 10 s before frame 3
        run.write_live(writer, frame(value), time_s, 4.0)
    # frame 1 until 0.5 s, frame 2 held 1 s (not 10), frame 3 until 11.0 s on the video's shifted clock
    assert writer.frames == [1, 1, 2, 2, 2, 2, 3, 3, 4] and run.pauses_shortened == 1
    run, writer = video_module.VideoRun(), _Writer()
    for value in range(1, 6):  # five frames at one clock time: the video may run one frame ahead, not more
        run.write_live(writer, frame(value), 0.0, 4.0)
    assert writer.frames == [1, 2] and run.frames_dropped == 3
    # a stop during a long hold is not kept waiting by its copies
    run, writer = video_module.VideoRun(), _Writer()
    monkeypatch.setattr(video_module, "stop_reason", lambda: "SIGTERM")
    run.write_live(writer, frame(1), 0.0, 4.0)
    run.write_live(writer, frame(2), 0.9, 4.0)
    assert writer.frames == [1, 2]


def test_only_whole_blocks_count_toward_an_interval():
    """A clip of 1.5 blocks is one unit (no interval, as docs/design.md says); the frames after the last whole block
    join it."""
    from utils.detection.quantify import Units
    from utils.detection.video import whole_blocks

    def sizes(frames, block):
        return whole_blocks(Units.of(np.ones((frames, 3))), block).counts[:, 0].tolist()

    assert sizes(45, 30) == [45] and sizes(30, 30) == [30] and sizes(10, 30) == [10] and sizes(0, 30) == []
    assert sizes(60, 30) == [30, 30] and sizes(65, 30) == [30, 35]


def run_on_a_slow_video(model_file, folder, frames: int, stride: int) -> dict:
    """predict_video's summary of a *frames*-frame 64x48 file saying 0.01 fps, every *stride*-th frame processed
    and drawn into folder/out/a.mp4."""
    import torch

    from utils.detection.evaluation import load_trained_model
    from utils.detection.video import predict_video

    source = folder / "slow.avi"
    writer = cv2.VideoWriter(str(source), cv2.VideoWriter_fourcc(*"MJPG"), 0.01, (64, 48))
    for shade in range(frames):
        writer.write(np.full((48, 64, 3), (250 * shade) // frames, np.uint8))
    writer.release()
    model = load_trained_model(model_file, "cpu")[0]
    return predict_video(model, torch.device("cpu"), str(source), folder / "out", 0.5, stride=stride,
                         output_video=folder / "out" / "a.mp4")


def test_an_annotated_video_slower_than_the_writer_takes_holds_its_frames_in_copies(tiny_model_file, tmp_path):
    """Processed frames that come 0.001 a second or less (a container saying 0.01 fps, or a --stride of thousands):
    OpenCV's writer refused the rate, and the run failed after its first frame ("OpenCV cannot write this video
    file"). Each frame is now written in copies up to VIDEO_WRITER_MIN_FPS: the video still plays at real speed."""
    from utils import defaults as D

    summary = run_on_a_slow_video(tiny_model_file, tmp_path, frames=13, stride=12)  # 2 processed, 1200 s apart
    copies = round(D.VIDEO_WRITER_MIN_FPS * 1200)
    assert summary["frames_processed"] == 2
    assert summary["annotated_video"]["fps"] == D.VIDEO_WRITER_MIN_FPS
    assert summary["annotated_video"]["frames"] == 2 * copies
    assert any(f"{copies} times" in note for note in summary["notes"])
    written = cv2.VideoCapture(str(tmp_path / "out" / "a.mp4"))
    frames, rate = written.get(cv2.CAP_PROP_FRAME_COUNT), written.get(cv2.CAP_PROP_FPS)
    written.release()
    assert frames == 2 * copies and frames / rate == pytest.approx(2 * 1200, rel=0.01)  # real speed: 2 x 1200 s


def test_the_copies_of_a_frame_are_bounded_and_a_slower_video_plays_faster(tiny_model_file, tmp_path):
    """The copies were unbounded: a file saying 0.0001 fps took 1000 of each frame (21 s and 177 MB at 1080p), one
    saying 1e-300 wrote without end, and 5e-324 raised OverflowError (0.1 / 5e-324 is inf). At most
    VIDEO_WRITER_MAX_COPIES now, the video at VIDEO_WRITER_MIN_FPS playing faster, and the note says how much."""
    from utils import defaults as D
    from utils.detection.video import writer_rate

    for rate in (1e-4, 1e-300, 5e-324):
        assert writer_rate(rate) == (D.VIDEO_WRITER_MIN_FPS, D.VIDEO_WRITER_MAX_COPIES)
    summary = run_on_a_slow_video(tiny_model_file, tmp_path, frames=25, stride=24)  # 2 processed, 2400 s apart
    assert summary["frames_processed"] == 2 and summary["annotated_video"]["fps"] == D.VIDEO_WRITER_MIN_FPS
    assert summary["annotated_video"]["frames"] == 2 * D.VIDEO_WRITER_MAX_COPIES
    assert any(f"at most {D.VIDEO_WRITER_MAX_COPIES} copies, it plays 2 times real speed" in note
               for note in summary["notes"])
