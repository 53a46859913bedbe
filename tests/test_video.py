"""bin/predict_video.py on a short synthetic video written with OpenCV from sample images."""

from __future__ import annotations

import csv
import json
import shutil

import cv2
import numpy as np
import pytest
from PIL import Image

from helpers import run_script
from utils.errors import InputError


@pytest.fixture(scope="module")
def clip(sample_dir, tmp_path_factory):
    """12 frames at 6 fps (2 s): each of 4 sample images held for 3 frames."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 6.0, (160, 120))
    for image in sorted((sample_dir / "images").glob("*.jpg"))[:4]:
        frame = cv2.cvtColor(np.asarray(Image.open(image).convert("RGB").resize((160, 120))), cv2.COLOR_RGB2BGR)
        for _ in range(3):
            writer.write(frame)
    writer.release()
    return path


@pytest.mark.slow
def test_video_gives_per_frame_csv_plot_summary_and_annotated_video(root, clip, tiny_model_file, tmp_path, capsys):
    out = tmp_path / "out"
    rc = run_script(root, "predict_video", ["--source", clip, "--model", tiny_model_file, "--output-dir", out,
                                            "--output-video", out / "annotated.mp4", "--stride", "2",
                                            "--score-threshold", "0.05", "--device", "cpu"])
    assert rc == 0
    assert "compliance:" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "video_frames.csv")))
    assert [int(r["frame"]) for r in rows] == [0, 2, 4, 6, 8, 10]
    assert [float(r["time_s"]) for r in rows] == pytest.approx([0, 1 / 3, 2 / 3, 1, 4 / 3, 5 / 3], abs=1e-3)
    for row in rows:
        assert int(row["faces"]) == sum(int(row[c]) for c in ("with_mask", "without_mask", "mask_weared_incorrect"))
    summary = json.loads((out / "video_summary.json").read_text())
    assert summary["frames_read"] == 12 and summary["frames_processed"] == 6 and summary["fps"] == 6.0
    assert summary["overall"]["faces"] == sum(int(r["faces"]) for r in rows)
    # frames are resampled in blocks of 10 s of video (30 processed frames at 6 fps / 2): this 2-second
    # clip is one block, and one block gives a figure but no interval, said so
    assert summary["resampling"]["block_frames"] == 30 and summary["resampling"]["blocks"] == 1
    estimate = summary["estimate"]
    assert estimate["unit"] == "block" and estimate["units"] == 1 and estimate["method"] == "cc"
    assert estimate["percent"] == summary["overall"]["percent_properly_masked"] and estimate["low"] is None
    assert set(summary["estimates"]) == {"cc", "pcc"} and summary["calibration"]["used"] is False
    assert (out / "compliance_over_time.png").stat().st_size > 0
    video = cv2.VideoCapture(str(out / "annotated.mp4"))
    assert video.get(cv2.CAP_PROP_FRAME_COUNT) == 6 and video.get(cv2.CAP_PROP_FPS) == 3.0
    video.release()
    assert (out / "predict_video_run.json").is_file()


@pytest.mark.slow
def test_max_frames_bounds_a_run(root, clip, tiny_model_file, tmp_path):
    out = tmp_path / "out"
    assert run_script(root, "predict_video", ["--source", clip, "--model", tiny_model_file, "--output-dir", out,
                                              "--stride", "1", "--max-frames", "3", "--device", "cpu"]) == 0
    assert json.loads((out / "video_summary.json").read_text())["frames_processed"] == 3
    assert run_script(root, "predict_video", ["--source", clip, "--model", tiny_model_file, "--output-dir", out,
                                              "--max-seconds", "0.5", "--stride", "1", "--device", "cpu"]) == 0
    summary = json.loads((out / "video_summary.json").read_text())
    assert summary["frames_processed"] == 3  # frames 0-2 at 6 fps
    # frame 3 (at 0.5 s) is past the run: not read as part of it
    assert summary["frames_read"] == 3 and summary["video_seconds"] == 0.5 and summary["ended"] == "--max-seconds"
    assert summary["frame_times"] == "timestamps" and summary["fps_assumed"] is False and summary["notes"] == []


@pytest.mark.slow
def test_video_counts_are_corrected_only_at_the_size_the_rates_were_measured_at(clip, tiny_model_file, tmp_path):
    import torch

    from helpers import calibrated_model_file
    from utils.detection.evaluation import load_trained_model
    from utils.detection.inference_size import set_inference_size
    from utils.detection.video import predict_video

    model, meta, _, _ = load_trained_model(calibrated_model_file(tiny_model_file, tmp_path / "calibrated.pt", 0.05,
                                                                 working_size=128), torch.device("cpu"))
    for size, used in ((128, True), (96, False)):
        set_inference_size(model, size)
        summary = predict_video(model, torch.device("cpu"), str(clip), tmp_path / f"out_{size}", 0.05,
                                max_frames=2, calibration=meta["quantification"])
        assert summary["working_size"] == size and summary["calibration"]["used"] is used
    assert "measured at a working size of 128 px, these counts at 96 px" in summary["calibration"]["why_not"]


@pytest.mark.parametrize("source, problem", [("missing.mp4", "video file not found"),
                                             ("notes.mp4", "cannot open the file"),
                                             ("99", "cannot open the camera")])
def test_unreadable_sources_fail_with_one_line(root, tiny_model_file, tmp_path, capsys, source, problem):
    (tmp_path / "notes.mp4").write_text("not a video")
    given = source if source.isdigit() else str(tmp_path / source)
    rc = run_script(root, "predict_video", ["--source", given, "--model", tiny_model_file,
                                            "--output-dir", tmp_path / "out", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and problem in err and "Traceback" not in err


def test_a_stream_urls_password_is_never_shown(root, tiny_model_file, tmp_path, capsys):
    """rtsp://user:password@camera: the args line, the error and (when it runs) the summary and run record are
    read and kept by others than the camera's owner; the password is shown as ***."""
    from utils.errors import without_password

    assert without_password("rtsp://admin:p@ss:w0rd@10.0.0.5:554/live") == "rtsp://admin:***@10.0.0.5:554/live"
    assert without_password('{"a": "rtsp://cam/live", "b": "me@home"}') == '{"a": "rtsp://cam/live", "b": "me@home"}'
    url = "http://admin:s3cret@127.0.0.1:1/live.mp4"  # nothing listens on port 1: refused at once
    rc = run_script(root, "predict_video", ["--source", url, "--model", tiny_model_file,
                                            "--output-dir", tmp_path / "out", "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 2 and "http://admin:***@127.0.0.1:1/live.mp4: cannot open the stream" in captured.err
    assert '"source": "http://admin:***@127.0.0.1:1/live.mp4"' in captured.out  # the args line
    assert "s3cret" not in captured.out + captured.err


def test_workflow_pred_videos_fans_out_one_job_per_video(root, sample_dir, clip, tmp_path):
    import shutil

    import yaml

    import workflow as generator

    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copyfile(clip, videos / "gate a.mp4")
    shutil.copyfile(clip, videos / "gate-b.mp4")
    run_dir = tmp_path / "run"
    args = generator.get_args_parser().parse_args(["--data", str(sample_dir), "--run-dir", str(run_dir),
                                                   "--generate-only", "--pred-videos", str(videos),
                                                   "--video-stride", "3"])
    assert generator.main(args) == 0
    jobs = {job["id"]: job for job in yaml.safe_load((run_dir / "workflow.yml").read_text())["jobs"]}
    assert {"predict_video_gate_a", "predict_video_gate-b"} <= set(jobs)
    job = jobs["predict_video_gate_a"]
    # the input is named by the tag (no space in a job argument); the replica keeps the real path
    assert job["arguments"][:2] == ["--source", "video_gate_a.mp4"] and "--stride" in job["arguments"]
    replicas = {entry["lfn"]: entry["pfns"][0]["pfn"]
                for entry in yaml.safe_load((run_dir / "replicas.yml").read_text())["replicas"]}
    assert replicas["video_gate_a.mp4"] == (videos / "gate a.mp4").resolve().as_uri()
    assert replicas["video_gate-b.mp4"] == (videos / "gate-b.mp4").resolve().as_uri()
    outputs = {use["lfn"] for use in job["uses"] if use["type"] == "output" and use["stageOut"]}
    assert outputs == {"video_frames_gate_a.csv", "compliance_over_time_gate_a.png", "video_summary_gate_a.json",
                       "predict_video_gate_a_run.json", "annotated_gate_a.mp4"}
    # the declared outputs are the names bin/predict_video.py --output-tag gives its files
    from utils.detection.video import video_output_names

    assert outputs == {*video_output_names("gate_a").values(), "annotated_gate_a.mp4"}
    # two videos whose names reduce to one tag: refused before the run folder is touched
    shutil.copyfile(clip, videos / "gate_a.mp4")
    before = {path: path.stat().st_mtime_ns for path in run_dir.rglob("*") if path.is_file()}
    args = generator.get_args_parser().parse_args(["--data", str(sample_dir), "--run-dir", str(run_dir),
                                                   "--generate-only", "--pred-videos", str(videos), "--seed", "7"])
    assert generator.main(args) == 2
    assert {path: path.stat().st_mtime_ns for path in run_dir.rglob("*") if path.is_file()} == before
    (videos / "gate_a.mp4").unlink()
    # a video OpenCV cannot read stops the generator with one line
    (videos / "notes.mp4").write_text("not a video")
    args = generator.get_args_parser().parse_args(["--data", str(sample_dir), "--run-dir", str(tmp_path / "bad"),
                                                   "--generate-only", "--pred-videos", str(videos)])
    assert generator.main(args) == 2 and not (tmp_path / "bad").exists()


def test_frames_over_the_pixel_limit_are_refused_in_one_line_naming_the_source(root, clip, tiny_model_file,
                                                                                 tmp_path, capsys, monkeypatch):
    """Video frames have the images' pixel limit (defaults.IMAGE_MAX_PIXELS), read from the header on opening."""
    from utils import defaults as D
    from utils.detection.video import open_source

    capture, kind = open_source(str(clip))  # 160 x 120: under the limit
    capture.release()
    monkeypatch.setattr(D, "IMAGE_MAX_PIXELS", 160 * 120 - 1)
    with pytest.raises(InputError, match=r"clip\.mp4: the file's frames are 160x120 = 19,200 pixels, over the limit"):
        open_source(str(clip))
    rc = run_script(root, "predict_video", ["--source", clip, "--model", tiny_model_file,
                                            "--output-dir", tmp_path / "out", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "19,200 pixels, over the limit of 19,199" in err, err


def _signal_on_call(monkeypatch, module, name, signum, call):
    """Patch module.name to send *signum* to this process on its *call*-th call (1-based)."""
    import os

    original, calls = getattr(module, name), []

    def patched(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, patched)


@pytest.fixture
def restore_signals():
    import signal

    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.mark.slow
@pytest.mark.parametrize("signame, rc", [("SIGTERM", 143), ("SIGINT", 0)])
def test_a_signal_stops_at_the_next_frame_and_keeps_the_frames_done(root, clip, tiny_model_file, tmp_path, capsys,
                                                                     monkeypatch, restore_signals, signame, rc):
    """SIGTERM (a pool stopping the job: 143, retried) or Ctrl-C (the user ending a run: 0) stops the run at the
    next frame; the CSV, plot, summary and annotated video hold the frames done, the summary says interrupted."""
    import signal

    from utils.detection import video as video_module

    out = tmp_path / "out"
    argv = ["--source", clip, "--model", tiny_model_file, "--output-dir", out, "--output-video", out / "a.mp4",
            "--stride", "1", "--device", "cpu"]
    assert run_script(root, "predict_video", [*argv, "--max-frames", "1"]) == 0  # a previous run's outputs
    _signal_on_call(monkeypatch, video_module, "detect", getattr(signal, signame), 3)
    assert run_script(root, "predict_video", argv) == rc
    err = capsys.readouterr().err
    assert "Traceback" not in err and "interrupted by" in err
    summary = json.loads((out / "video_summary.json").read_text())
    assert summary["interrupted"] == ("SIGTERM" if signame == "SIGTERM" else "Ctrl-C (SIGINT)")
    assert summary["frames_processed"] == 3 and summary["frames_read"] == 3  # the frame in progress is finished
    assert len(list(csv.DictReader(open(out / "video_frames.csv")))) == 3
    video = cv2.VideoCapture(str(out / "a.mp4"))
    assert video.get(cv2.CAP_PROP_FRAME_COUNT) == 3
    video.release()
    assert sorted(p.name for p in out.iterdir()) == ["a.mp4", "compliance_over_time.png", "predict_video_run.json",
                                                     "video_frames.csv", "video_summary.json"]  # no temp files


@pytest.mark.slow
def test_a_sigterm_before_the_first_frame_still_replaces_the_previous_outputs(root, clip, tiny_model_file, tmp_path,
                                                                               monkeypatch, restore_signals):
    import signal

    from utils.detection import video as video_module

    out = tmp_path / "out"
    argv = ["--source", clip, "--model", tiny_model_file, "--output-dir", out, "--device", "cpu"]
    assert run_script(root, "predict_video", [*argv, "--max-frames", "2"]) == 0
    _signal_on_call(monkeypatch, video_module, "open_source", signal.SIGTERM, 1)
    assert run_script(root, "predict_video", argv) == 143
    summary = json.loads((out / "video_summary.json").read_text())
    assert summary["interrupted"] == "SIGTERM" and summary["frames_processed"] == 0


@pytest.mark.slow
def test_a_second_ctrl_c_while_the_outputs_are_written_leaves_the_last_runs_outputs(root, clip, tiny_model_file,
                                                                                    tmp_path, monkeypatch,
                                                                                    restore_signals):
    """The first Ctrl-C stops the run, the second comes while its outputs are written: the annotated video and CSV
    were new, the plot, summary and run record the last run's. Now all stay the last run's, with no temporary."""
    import hashlib
    import signal

    from utils.detection import plots
    from utils.detection import video as video_module

    out = tmp_path / "out"
    argv = ["--source", clip, "--model", tiny_model_file, "--output-dir", out, "--output-video", out / "a.mp4",
            "--stride", "1", "--device", "cpu"]
    assert run_script(root, "predict_video", [*argv, "--max-frames", "1"]) == 0  # the last run's outputs
    before = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in out.iterdir()}
    _signal_on_call(monkeypatch, video_module, "detect", signal.SIGINT, 3)
    _signal_on_call(monkeypatch, plots, "plot_compliance_over_time", signal.SIGINT, 1)
    assert run_script(root, "predict_video", argv) == 130  # one line, no traceback (utils.cli.run_job)
    assert {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in out.iterdir()} == before


@pytest.mark.slow
def test_a_sigterm_after_ctrl_c_still_exits_143(root, clip, tiny_model_file, tmp_path, monkeypatch, restore_signals,
                                                capsys):
    """Ctrl-C stopped the run, then a pool's SIGTERM came while the outputs were written: the outputs are written
    for the frames done (the summary names the Ctrl-C that stopped the run), and the exit is 143, as after any
    SIGTERM (it was 0: the pool read a job it had stopped as done)."""
    import signal

    from utils.detection import plots
    from utils.detection import video as video_module

    out = tmp_path / "out"
    argv = ["--source", clip, "--model", tiny_model_file, "--output-dir", out, "--stride", "1", "--device", "cpu"]
    _signal_on_call(monkeypatch, video_module, "detect", signal.SIGINT, 2)
    _signal_on_call(monkeypatch, plots, "plot_compliance_over_time", signal.SIGTERM, 1)
    assert run_script(root, "predict_video", argv) == 143
    summary = json.loads((out / "video_summary.json").read_text())
    assert summary["interrupted"] == "Ctrl-C (SIGINT)" and summary["frames_processed"] == 2
    # one that comes once the run ended of itself: its outputs are whole, exit 0 (a retry would redo the video)
    monkeypatch.undo()
    _signal_on_call(monkeypatch, plots, "plot_compliance_over_time", signal.SIGTERM, 1)
    assert run_script(root, "predict_video", [*argv, "--max-frames", "2"]) == 0
    assert "SIGTERM received once the run had ended (--max-frames); its outputs are complete" in \
        capsys.readouterr().err
    assert json.loads((out / "video_summary.json").read_text())["interrupted"] is None


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
    """A clip of 1.5 blocks is one unit (no interval, as the README says); the frames after the last whole block
    join it."""
    from utils.detection.quantify import Units
    from utils.detection.video import whole_blocks

    def sizes(frames, block):
        return whole_blocks(Units.of(np.ones((frames, 3))), block).counts[:, 0].tolist()

    assert sizes(45, 30) == [45] and sizes(30, 30) == [30] and sizes(10, 30) == [10] and sizes(0, 30) == []
    assert sizes(60, 30) == [30, 30] and sizes(65, 30) == [30, 35]


@pytest.mark.slow
def test_annotated_video_plays_at_real_speed_when_the_stride_exceeds_the_frame_rate(root, clip, tiny_model_file,
                                                                                     tmp_path):
    out = tmp_path / "out"
    assert run_script(root, "predict_video", ["--source", clip, "--model", tiny_model_file, "--output-dir", out,
                                              "--output-video", out / "a.mp4", "--stride", "12",
                                              "--device", "cpu"]) == 0
    video = cv2.VideoCapture(str(out / "a.mp4"))
    assert video.get(cv2.CAP_PROP_FPS) == 0.5  # 6 fps / 12: one frame for 2 s of video
    video.release()


@pytest.mark.slow
def test_an_assumed_frame_rate_and_a_file_shorter_than_its_header_are_said(root, sample_dir, tiny_model_file,
                                                                           tmp_path, capsys, monkeypatch):
    from utils.detection import video as video_module

    path = tmp_path / "cut.avi"  # Motion JPEG: 20 frames declared, the file cut in half
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (160, 120))
    images = sorted((sample_dir / "images").glob("*.jpg"))[:4]
    for index in range(20):
        image = Image.open(images[index % 4]).convert("RGB").resize((160, 120))
        writer.write(cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR))
    writer.release()
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    out = tmp_path / "out"
    argv = ["--source", path, "--model", tiny_model_file, "--output-dir", out, "--stride", "4", "--device", "cpu"]
    assert run_script(root, "predict_video", argv) == 0
    summary = json.loads((out / "video_summary.json").read_text())
    assert summary["frames_declared"] == 20 and 0 < summary["frames_read"] < 20
    assert "frames its header declares" in capsys.readouterr().err

    class NoRate:  # a source that says 0 fps
        def __init__(self, capture):
            self.capture = capture

        def get(self, prop):
            return 0.0 if prop == cv2.CAP_PROP_FPS else self.capture.get(prop)

        def __getattr__(self, name):
            return getattr(self.capture, name)

    original = video_module.open_source
    monkeypatch.setattr(video_module, "open_source", lambda source: (NoRate(original(source)[0]), "file"))
    assert run_script(root, "predict_video", argv) == 0
    summary = json.loads((out / "video_summary.json").read_text())
    assert summary["fps_assumed"] is True and summary["fps"] == 25.0 and summary["fps_reported"] == 0.0
    assert "gives no usable frame rate (0); 25 fps assumed" in capsys.readouterr().err


def test_pred_videos_counts_frames_the_header_cannot_tell_refuses_frameless_videos_and_names_what_it_skips(
        clip, tmp_path, caplog):
    import logging

    from utils.pegasus.config import ConfigError
    from utils.pegasus.inputs import find_videos

    videos = tmp_path / "videos"
    videos.mkdir()
    # an MKV without its Duration element: OpenCV's frame count is negative; the frames are counted instead
    writer = cv2.VideoWriter(str(tmp_path / "full.mkv"), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (160, 120))
    for index in range(30):
        writer.write(np.full((120, 160, 3), index * 8, np.uint8))
    writer.release()
    data = bytearray((tmp_path / "full.mkv").read_bytes())
    at = data.find(bytes([0x44, 0x89]))  # Duration: ID, size (1 byte), value; overwritten by a Void element
    size = data[at + 2] & 0x7F
    data[at:at + 3 + size] = bytes([0xEC, 0x80 | (size + 1)]) + bytes(size + 1)
    (videos / "nodur.mkv").write_bytes(data)
    cv2_capture = cv2.VideoCapture(str(videos / "nodur.mkv"))
    assert not cv2_capture.get(cv2.CAP_PROP_FRAME_COUNT) > 0  # what this test is about
    cv2_capture.release()
    shutil.copyfile(clip, videos / "clip.mp4")
    (videos / "notes.txt").write_text("not a video")
    (videos / "more").mkdir()
    with caplog.at_level(logging.WARNING):
        found = {video.path.name: video.frames for video in find_videos(videos)}
    assert found == {"nodur.mkv": 30, "clip.mp4": 12}
    assert "2 entries not taken as videos" in caplog.text and "more/, notes.txt" in caplog.text
    # a video that opens but gives no frame is refused at generation, not at run time
    y4m = b"YUV4MPEG2 W160 H120 F10:1 Ip A1:1 C420jpeg\n"
    (videos / "header_only.y4m").write_bytes(y4m)
    with pytest.raises(ConfigError, match=r"header_only\.y4m: the video opened but gave no frame"):
        find_videos(videos)
    (videos / "header_only.y4m").write_bytes(y4m + b"FRAME\n" + bytes(160 * 120 * 3 // 2))  # now one frame
    assert {video.path.name: video.frames for video in find_videos(videos)}["header_only.y4m"] == 1


def test_a_long_video_without_a_frame_count_is_sized_from_a_bounded_scan_not_decoded_in_full(tmp_path, caplog,
                                                                                            monkeypatch):
    """Raw Motion JPEG has no header to count: every frame was decoded (an hour took minutes). Now its packets
    are counted in its first VIDEO_SCAN_BYTES, undecoded, and the rest estimated at the same bytes a frame."""
    import logging
    import re

    from utils.pegasus import inputs

    rng = np.random.default_rng(3)
    path = tmp_path / "door.mjpeg"
    with open(path, "wb") as handle:  # 200 JPEGs of noise, about the same size each
        for _ in range(200):
            handle.write(cv2.imencode(".jpg", rng.integers(0, 256, (72, 96, 3), np.uint8))[1].tobytes())
    capture = cv2.VideoCapture(str(path))
    assert not capture.get(cv2.CAP_PROP_FRAME_COUNT) > 0  # what this test is about
    capture.release()
    monkeypatch.setattr(inputs, "VIDEO_SCAN_BYTES", path.stat().st_size // 10)
    grabs, video_capture = [], cv2.VideoCapture

    class CountingCapture:  # a wrapper: a Python subclass of cv2.VideoCapture crashed the interpreter's last GC
        def __init__(self, *args):
            self.capture = video_capture(*args)

        def grab(self):
            grabs.append(1)
            return self.capture.grab()

        def __getattr__(self, name):
            return getattr(self.capture, name)

    monkeypatch.setattr(cv2, "VideoCapture", CountingCapture)
    with caplog.at_level(logging.INFO):
        frames = inputs.video_frames(path)
    assert 190 <= frames <= 210 and len(grabs) < 40  # about a tenth read: 1 + 20 or so
    assert re.search(rf"door\.mjpeg: its header gives no frame count \(\S+\); {frames} frames assumed for its job's "
                     r"time limit: \d+ frames in its first [\d.]+ MB, and the rest of its [\d.]+ MB", caplog.text)


@pytest.mark.parametrize("argv, problem", [
    (["--show"], "--show: no display here"),
    (["--source", "²"], "²: video file not found"),  # a digit to str.isdigit(), no camera number
    (["--output-tag", "t" * 250], "--output-tag: too long"),
])
def test_flags_that_cannot_work_are_refused_in_one_line_before_the_model_loads(root, clip, tmp_path, capsys,
                                                                               monkeypatch, argv, problem):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr("sys.platform", "linux")
    given = ["--source", str(clip), *argv] if argv[0] != "--source" else argv
    rc = run_script(root, "predict_video", [*given, "--model", tmp_path / "no_model.pt",  # never read
                                            "--output-dir", tmp_path / "out", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and problem in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["a.gif", "a.png", "a.txt", "a", "a.webm"])
def test_output_video_takes_only_the_containers_the_writer_fills(root, clip, tmp_path, capsys, name):
    with pytest.raises(SystemExit) as stopped:
        run_script(root, "predict_video", ["--source", clip, "--model", tmp_path / "no_model.pt", "--output-dir",
                                           tmp_path / "out", "--output-video", tmp_path / name])
    assert stopped.value.code == 2 and "--output-video: expected a video file name ending .mp4" in \
        capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_video_tag_is_ascii_and_never_reads_as_a_flag():
    # The job gets --output-tag TAG: "-intro" would be read by argparse as a flag, on every try.
    from pathlib import Path

    from utils.pegasus.config import VideoFile

    assert VideoFile(Path("-intro.mp4"), 10).tag == "_intro"
    assert VideoFile(Path("café entrée.mp4"), 10).tag == "caf__entr_e"
    assert VideoFile(Path("cam-2_day.mp4"), 10).tag == "cam-2_day"  # ordinary names unchanged


@pytest.mark.slow
def test_a_run_that_draws_no_frame_keeps_the_earlier_annotated_video(clip, tiny_model_file, tmp_path,
                                                                       monkeypatch):
    # Stopped before its first frame (a Ctrl-C while the model loaded), the run committed an empty annotated
    # video over the last run's.
    from utils.detection import video as video_module
    from utils.detection.evaluation import load_trained_model

    model = load_trained_model(tiny_model_file, "cpu")[0]
    out, annotated = tmp_path / "out", tmp_path / "annotated.mp4"
    annotated.write_bytes(b"an earlier run's video")
    monkeypatch.setattr(video_module, "stop_reason", lambda: video_module.SIGINT)
    summary = video_module.predict_video(model, "cpu", str(clip), out, 0.5, output_video=annotated)
    assert summary["frames_processed"] == 0 and summary["interrupted"]
    assert annotated.read_bytes() == b"an earlier run's video"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".annotated.")]  # no temporary file left


def _long_clip(folder, frames: int):
    """A 16x16 MJPG clip of *frames* frames at 25 fps: cheap to decode, so a test can be hours long in frames."""
    path = folder / f"long_{frames}.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (16, 16))
    for index in range(frames):
        writer.write(np.full((16, 16, 3), index % 250, np.uint8))
    writer.release()
    return path


def _three_faces(model, images, tta=False, score_threshold=0.0):
    import torch

    return [{"boxes": torch.tensor([[1.0, 1, 5, 5], [6, 6, 9, 9], [2, 2, 8, 8]]), "labels": torch.tensor([1, 2, 1]),
             "scores": torch.tensor([0.9, 0.8, 0.3])}]


def test_a_long_video_keeps_a_small_record_a_frame_and_writes_its_csv_as_it_goes(tmp_path, monkeypatch):
    # Every processed frame kept its CSV row, its compliance dicts and its score sums (~1.1 kB) until the end, and
    # the CSV was then rendered whole as one string: a camera's day at the default stride (432,000 frames) held
    # ~0.5 GB for the summary. Now 8 numbers a frame stay (64 bytes) and each row goes to the file at once.
    import tracemalloc
    from types import SimpleNamespace

    from utils.detection import plots
    from utils.detection import video as video_module

    monkeypatch.setattr(video_module, "detect", _three_faces)
    # the plot has its own test
    monkeypatch.setattr(plots, "plot_compliance_over_time", lambda *args, **kwargs: args[3].write_bytes(b""))
    model = SimpleNamespace(transform=SimpleNamespace(max_size=64))
    peaks = {}
    for frames in (500, 2000):
        clip = _long_clip(tmp_path, frames)
        tracemalloc.start()
        summary = video_module.predict_video(model, "cpu", str(clip), tmp_path / f"out{frames}", 0.5)
        peaks[frames] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert summary["frames_processed"] == frames and summary["overall"]["faces"] == 2 * frames
        with open(tmp_path / f"out{frames}" / "video_frames.csv") as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == frames and rows[-1]["frame"] == str(frames - 1) and rows[-1]["faces"] == "2"
    per_frame = (peaks[2000] - peaks[500]) / 1500
    assert per_frame < 400, f"{per_frame:.0f} bytes a processed frame"  # the old code: ~1,100


def test_a_long_videos_plot_draws_a_bounded_number_of_points(tmp_path, monkeypatch):
    # compliance_over_time.png drew a bar a processed frame: ~10 kB and ~2.4 ms each (a day of a camera at the
    # default stride, 432,000 frames: ~4 GB and ~17 minutes). Past VIDEO_PLOT_MAX_POINTS frames a point is the
    # pooled figure of that many consecutive frames.
    from types import SimpleNamespace

    from utils import defaults as D
    from utils.detection import plots
    from utils.detection import video as video_module

    drawn, write_figure = [], plots._write_figure

    def count(fig, path):
        ax, twin = fig.axes
        drawn.append((len(twin.patches), len(ax.lines[0].get_xdata()), ax.lines[0].get_ydata()[0]))
        write_figure(fig, path)

    monkeypatch.setattr(plots, "_write_figure", count)
    monkeypatch.setattr(video_module, "detect", _three_faces)
    monkeypatch.setattr(D, "VIDEO_PLOT_MAX_POINTS", 100)
    model = SimpleNamespace(transform=SimpleNamespace(max_size=64))
    for frames in (90, 500, 2000):
        video_module.predict_video(model, "cpu", str(_long_clip(tmp_path, frames)), tmp_path / f"out{frames}", 0.5)
    assert drawn[0] == (90, 90, 50.0)  # up to the limit, a bar and a point a frame, as before
    assert [bars for bars, _, _ in drawn[1:]] == [100, 100] and [points for _, points, _ in drawn[1:]] == [100, 100]
    assert drawn[2][2] == 50.0  # a point's percent is its frames' faces pooled: 1 of 2 properly masked


@pytest.mark.parametrize("name", ["video_frames.csv", "video_summary.json", "predict_video_run.json",
                                  "compliance_over_time.png"])
def test_an_output_written_while_the_disk_fills_names_it_and_keeps_the_last_runs_set(clip, tiny_model_file, tmp_path,
                                                                                  monkeypatch, name):
    # Written through FileSet.path, a full disk's error reached the job's line as 'predict_video: error: [Errno 28]
    # No space left on device', naming no file (predict's: d3ea379).
    import errno
    from pathlib import Path

    from utils.cli import error_message
    from utils.detection import plots
    from utils.detection.evaluation import load_trained_model
    from utils.detection.video import predict_video

    model = load_trained_model(tiny_model_file, "cpu")[0]
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text("the last run's")
    write_text, write_figure = Path.write_text, plots._write_figure

    def fills(path) -> bool:  # the file of *name*'s write fills the disk, half written
        if name.rsplit(".", 1)[0] not in Path(path).name:
            return False
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", lambda path, *args, **kwargs: fills(path) or write_text(path, *args,
                                                                                                    **kwargs))
    monkeypatch.setattr(plots, "_write_figure", lambda figure, path: fills(path) or write_figure(figure, path))
    if name == "video_frames.csv":  # its rows are written a frame at a time, as the frames come
        from utils.detection import video

        class FullDisk(csv.DictWriter):
            def writerow(self, row):
                raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(video.csv, "DictWriter", FullDisk)
    with pytest.raises(OSError) as raised:
        predict_video(model, "cpu", str(clip), out, 0.5, max_frames=2, record=lambda: {"job": "predict_video"})
    assert error_message(raised.value) == (f"{out / name}: cannot write {name} (No space left on device); "
                                           "the file there, if any, is as it was")
    assert [p.name for p in out.iterdir()] == [name] and (out / name).read_text() == "the last run's"


def test_an_error_of_the_frame_loop_is_not_taken_for_a_failed_write_of_the_frames_csv(clip, tiny_model_file, tmp_path):
    # The frame loop ran inside the CSV's FileSet.writing block, so any OSError of the loop with no file name and a
    # write errno (the progress bar's write to a stderr file on a full disk, EIO from a device) was told as
    # 'video_frames.csv: cannot write video_frames.csv (...)'. Only the CSV's own writes name it.
    import errno

    from utils.cli import error_message
    from utils.detection.evaluation import load_trained_model
    from utils.detection.video import predict_video

    model = load_trained_model(tiny_model_file, "cpu")[0]

    def progress(_):  # tqdm's update, its stderr a file on a full disk
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as raised:
        predict_video(model, "cpu", str(clip), tmp_path / "out", 0.5, max_frames=2, progress=progress)
    assert "video_frames.csv" not in error_message(raised.value)
    assert raised.value.errno == errno.ENOSPC and not list((tmp_path / "out").iterdir())
