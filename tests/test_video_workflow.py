"""workflow.py --pred-videos: a predict_video job per video, each video's frames counted (or estimated from a
bounded scan) for its time limit, what is not taken as a video named, and job tags that are safe arguments."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest


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
    # its progress is its checkpoint, which Pegasus hands to a retry (a pool's retry did the whole video again),
    # an empty file in the catalog to start with, as train's
    (checkpoint,) = [use for use in job["uses"] if use["type"] == "checkpoint"]
    assert checkpoint["lfn"] == "predict_video_gate_a_checkpoint.jsonl" and checkpoint["stageOut"] is False
    assert job["arguments"][job["arguments"].index("--checkpoint") + 1] == checkpoint["lfn"]
    initial = Path(replicas[checkpoint["lfn"]][len("file://"):])
    assert initial.parent.name == "checkpoints" and initial.is_file() and initial.stat().st_size == 0
    # the report page shows each video's figure and plot: the report job is handed them (not the annotated video)
    shown = {use["lfn"] for use in jobs["report"]["uses"] if use["type"] == "input"}
    assert {"video_summary_gate_a.json", "compliance_over_time_gate_a.png"} <= shown
    assert "annotated_gate_a.mp4" not in shown and "video_frames_gate_a.csv" not in shown
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


def test_a_video_tag_is_ascii_and_never_reads_as_a_flag():
    # The job gets --output-tag TAG: "-intro" would be read by argparse as a flag, on every try.
    from pathlib import Path

    from utils.pegasus.config import VideoFile

    assert VideoFile(Path("-intro.mp4"), 10).tag == "_intro"
    assert VideoFile(Path("café entrée.mp4"), 10).tag == "caf__entr_e"
    assert VideoFile(Path("cam-2_day.mp4"), 10).tag == "cam-2_day"  # ordinary names unchanged
