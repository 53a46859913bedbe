#!/usr/bin/env bash
# The image, tried: build it (unless SKIP_BUILD=1), then run validate_data, a 1-epoch
# train and predict inside it with the network off (--network none: the baked weights
# must be enough) and as a non-root user (the files one job writes must be readable by
# the next, whoever it runs as). Run by hand or with `make image-check`; not in CI (a
# build downloads ~3 GB of wheels). Skips with one line when the engine is absent.
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
    echo "image check skipped: $ENGINE is not installed (apt-get install -y podman runc; see README 'The image')"
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

echo "image check passed: $IMAGE, $(numfmt --to=iec "$size"), build $(( built - started )) s," \
     "validate + 1-epoch train + predict with --network none in $(( $(stamp) - built )) s"
