"""Shared fixtures: small synthetic data made by the project's own generator."""

from __future__ import annotations

import os
import signal
import tracemalloc
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Tests run on the CPU and must never wait for a download.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Under pytest-xdist (make test, make test-fast) each worker, and the job scripts it starts, computes with its share
# of the cores: torch's default of every core in every process had two workers' OpenMP threads wait on each other
# on two cores, and a model test took 25.6 s against 2.8 s alone. xdist sets the count before this file is read.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, str(_share))

# The kinds of slow test (registered in pyproject.toml); each also counts as `slow`, so that
# `make test-fast` (-m "not slow") leaves out every kind, including one added later.
SLOW_KINDS = ("e2e", "planner", "browser", "training")


# The longest kinds first: `make test` hands the test files out to pytest-xdist workers in this
# order, and a several-minute planner run handed out last would leave the other workers idle at the end.
LONGEST_FIRST = ("planner", "e2e")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(kind) for kind in SLOW_KINDS):
            item.add_marker(pytest.mark.slow)
    rank = {kind: index for index, kind in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: min((rank[kind] for kind in LONGEST_FIRST if item.get_closest_marker(kind)),
                                    default=len(LONGEST_FIRST)))


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    """24 synthetic images (160x120) with VOC annotations, made once per test session."""
    from utils.data.sample_data import make_sample_dataset

    out = tmp_path_factory.mktemp("sample")
    make_sample_dataset(out, num_images=24, seed=7, image_size=(160, 120))
    return out


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory) -> Path:
    """An untrained retinaface_mnet025 detector (the default backbone) at image size 128, saved as a model file."""
    import torch

    from utils.detection.model import build_model, save_model_file

    torch.manual_seed(0)
    model = build_model(backbone="retinaface_mnet025", weights="none", image_size=128)
    return save_model_file(tmp_path_factory.mktemp("model") / "model.pt", model)


@pytest.fixture(scope="module")
def clip(sample_dir, tmp_path_factory):
    """A video of the sample images, made once per test module: 12 frames at 6 fps (2 s), each of 4 sample
    images held for 3 frames."""
    import cv2
    import numpy as np
    from PIL import Image

    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 6.0, (160, 120))
    for image in sorted((sample_dir / "images").glob("*.jpg"))[:4]:
        frame = cv2.cvtColor(np.asarray(Image.open(image).convert("RGB").resize((160, 120))), cv2.COLOR_RGB2BGR)
        for _ in range(3):
            writer.write(frame)
    writer.release()
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The train tests' data, made once per test module: 6 images of 96x96, enough for 3 batches, fast on two
    CPU cores."""
    from utils.data.sample_data import make_sample_dataset

    out = tmp_path_factory.mktemp("tiny")
    make_sample_dataset(out, num_images=6, seed=11, image_size=(96, 96))
    return out


@pytest.fixture(autouse=True)
def _no_stop_left_over():
    """A job stopped in-process (a SIGTERM or Ctrl-C test) leaves the process-wide stop request set, which made
    the next in-process training or study in the same worker stop at once: each test starts and ends clean."""
    import signal

    from utils import stop
    from utils.detection import video

    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    yield
    stop._requested.clear()
    stop._declared.clear()
    video._sigint.clear()
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


@pytest.fixture
def restore_signals():
    """The SIGTERM and SIGINT handlers as they were, after a test that runs a job's main() in this process
    (utils.stop installs its own)."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.fixture(autouse=True)
def _tracing_stopped():
    """A test that failed between tracemalloc.start() and helpers.peak_mb() leaves no tracing on for the next."""
    yield
    if tracemalloc.is_tracing():
        tracemalloc.stop()
