#!/usr/bin/env bash
# The image, tried: build it (unless SKIP_BUILD=1), then run validate_data, a 1-epoch
# train and predict inside it with the network off (--network none: the baked weights
# must be enough) and as a non-root user (the files one job writes must be readable by
# the next, whoever it runs as); then serve that model from the image as the Dockerfile
# documents (curl /livez, /readyz, /api/predict, /metrics; SIGTERM must end in exit 0). Run by hand or with `make image-check`; not in CI (a
# build downloads ~3 GB of wheels). Skips with one line when the engine is absent or cannot run containers.
#
#   docker/check_image.sh                             # podman, mask-detection-workflow:cuda
#   ENGINE=docker IMAGE=me/mdw:1.0 SKIP_BUILD=1 docker/check_image.sh
#   BUILD_ARGS="--build-arg BASE_IMAGE=localhost/debian-python:bookworm --build-arg COCO_WEIGHTS=0" docker/check_image.sh
set -euo pipefail

ENGINE=${ENGINE:-podman}
IMAGE=${IMAGE:-mask-detection-workflow:cuda}
BUILD_ARGS=${BUILD_ARGS:-}
root=$(cd "$(dirname "$0")/.." && pwd)

if ! command -v "$ENGINE" >/dev/null 2>&1; then
    echo "image check skipped: $ENGINE is not installed (apt-get install -y podman runc; see docs/image.md)"
    exit 0
fi
if ! "$ENGINE" info >/dev/null 2>&1; then
    echo "image check skipped: $ENGINE is installed but cannot run containers here ($ENGINE info fails: for docker, is its daemon running?)"
    exit 0
fi

stamp() { date +%s; }
started=$(stamp)
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    # shellcheck disable=SC2086  # BUILD_ARGS is a list of flags
    "$ENGINE" build $BUILD_ARGS -t "$IMAGE" "$root"
fi
built=$(stamp)
size=$("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE")

work=$(mktemp -d /var/tmp/image-check.XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 0777 "$work"
inside() {
    "$ENGINE" run --rm --network none --user 1000:1000 -e HOME=/tmp -v "$work:/work" "$IMAGE" "$@"
}

inside python bin/make_sample_data.py --out /work/data --num-images 16 --seed 7
inside python bin/validate_data.py --images /work/data/images --annotations /work/data/annotations \
    --output-dir /work/validation
inside python bin/train.py --images /work/data/images --annotations /work/data/annotations \
    --epochs 1 --image-size 256 --no-progress --output /work/model.pt --checkpoint /work/ckpt.pt
inside python bin/predict.py --images /work/data/images --model /work/model.pt --output-dir /work/predictions
inside python -c "import json; c = json.load(open('/work/predictions/compliance.json')); print('compliance.json:', sorted(c))"
test -s "$work/model.pt" && test -s "$work/predictions/compliance.json"
jobs_done=$(stamp)

# The service, as the Dockerfile documents it: the model mounted read-only, published on a free
# host port; /livez, one prediction, then SIGTERM (podman stop), which must end in exit 0.
mkdir -p "$work/models" && cp "$work/model.pt" "$work/models/model.pt"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
name="image-check-serve-$$"
"$ENGINE" run -d --name "$name" --user 1000:1000 -e HOME=/tmp -p "127.0.0.1:$port:8000" \
    -v "$work/models:/models:ro" "$IMAGE" python bin/serve.py --model /models/model.pt --host 0.0.0.0 >/dev/null
trap '"$ENGINE" rm -f "$name" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
for _ in $(seq 120); do
    curl -fsS "http://127.0.0.1:$port/livez" >/dev/null 2>&1 && break
    sleep 1
done
curl -fsS "http://127.0.0.1:$port/readyz"; echo
photo=$(ls "$work"/data/images/*.jpg | head -n 1)
curl -fsS -F "files=@$photo;type=image/jpeg" "http://127.0.0.1:$port/api/predict" \
    | python3 -c "import json, sys; a = json.load(sys.stdin); print('served:', a['images'][0]['file'], a['overall'])"
curl -fsS "http://127.0.0.1:$port/metrics" | grep -q '^mask_service_requests_total{route="/api/predict",status="200"}'
"$ENGINE" stop -t 40 "$name" >/dev/null
served_exit=$("$ENGINE" wait "$name" 2>/dev/null || "$ENGINE" inspect --format '{{.State.ExitCode}}' "$name")
"$ENGINE" logs "$name" 2>&1 | tail -n 3
test "$served_exit" = 0 || { echo "image check failed: the service exited $served_exit on SIGTERM"; exit 1; }

echo "image check passed: $IMAGE, $(numfmt --to=iec "$size"), build $(( built - started )) s," \
     "validate + 1-epoch train + predict with --network none in $(( jobs_done - built )) s," \
     "served /livez + /api/predict + /metrics and stopped with exit 0 in $(( $(stamp) - jobs_done )) s"
