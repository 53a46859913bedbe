"""bin/predict_video.py on a short synthetic video written with OpenCV from sample images: its outputs, the
bounds of a run, the sources and flags it refuses, long videos in bounded memory and full disks."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest
from PIL import Image

from helpers import run_script
from utils.errors import InputError


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
