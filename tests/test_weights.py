"""COCO detector weights: found in the torch hub cache only when intact, fetched only by image builds."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import pytest
from test_dockerfile import instructions
from torchvision.models import detection

from utils.detection import weights


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache under a temporary $TORCH_HOME; returns its checkpoints folder."""
    import torch.hub

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # get_dir() honours $TORCH_HOME only then
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    assert weights.hub_checkpoints_dir() == checkpoints
    return checkpoints


@pytest.mark.parametrize("env", [{}, {"XDG_CACHE_HOME": "/xdg"}, {"TORCH_HOME": "~/th"},
                                 {"TORCH_HOME": "/th", "XDG_CACHE_HOME": "/xdg"}])
def test_the_hub_folder_before_torch_is_loaded_is_the_one_torch_hub_gives(env, monkeypatch):
    import torch.hub

    for name in ("TORCH_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    loaded = weights.hub_checkpoints_dir()
    monkeypatch.delitem(sys.modules, "torch.hub")  # as `provision` sees it, torch not yet imported
    assert weights.hub_checkpoints_dir() == loaded == Path(torch.hub.get_dir()) / "checkpoints"



def test_provision_with_the_weights_in_the_cache_does_not_import_torch(tmp_path, root):
    """make setup's weights step runs at every make test and make run: with the weights already in the cache
    (here a converted RetinaFace, named by its hash) provision finds the folder and answers without torch."""
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    data = b"a converted RetinaFace"  # provision checks a cached file's sha256 against its name's hash only
    (checkpoints / f"{weights.RETINAFACE_STEM}-{hashlib.sha256(data).hexdigest()[:8]}.pth").write_bytes(data)
    code = "import sys\nfrom utils.detection.weights import main\nmain(['provision'])\nprint('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root,
                          env={**os.environ, "TORCH_HOME": str(tmp_path)})
    assert "RetinaFace WIDER FACE weights already cached" in proc.stderr, proc.stderr
    assert proc.stdout.splitlines()[-1] == "False", proc.stdout + proc.stderr


def offline(*args, **kwargs):
    raise URLError("[Errno -3] Temporary failure in name resolution")


def test_coco_weights_file_is_torchvisions_name():
    assert weights.coco_weights_file() == "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth"
    assert weights.coco_weights_file("resnet50_fpn") == "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"
    assert weights.coco_weights_file("mobilenet_v3_large_fpn") == "fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth"
    with pytest.raises(ValueError, match="no COCO weights"):
        weights.coco_weights_file("mobilenet_v2_fpn")


def test_cached_coco_weights_absent(hub):
    assert weights.cached_coco_weights() is None


def test_cached_coco_weights_rejects_a_file_whose_sha256_does_not_match_its_name(hub, caplog):
    hub.mkdir(parents=True)
    (hub / weights.coco_weights_file()).write_bytes(b"not the COCO weights")
    with caplog.at_level(logging.WARNING, logger=weights.__name__):
        assert weights.cached_coco_weights() is None
    assert "ignoring it" in caplog.text


def test_cached_coco_weights_accepts_a_file_whose_sha256_starts_with_its_name_hash(hub, monkeypatch):
    content = b"stand-in weights"
    name = f"fake-{hashlib.sha256(content).hexdigest()[:8]}.pth"
    monkeypatch.setattr(weights, "coco_weights_file", lambda backbone="resnet50_fpn_v2": name)
    hub.mkdir(parents=True)
    (hub / name).write_bytes(content)
    assert weights.cached_coco_weights() == hub / name


def test_fetch_coco_offline_exits_1_with_one_line(hub, monkeypatch, capsys):
    monkeypatch.setattr(detection.FasterRCNN_ResNet50_FPN_V2_Weights, "get_state_dict", offline)
    assert weights.main(["fetch-coco", "--backbone", "resnet50_fpn_v2"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith("fetch-coco: fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth not downloaded (URLError")
    assert not hub.exists() or not any(hub.iterdir())


def test_fetch_coco_prints_the_cached_path(hub, monkeypatch, capsys):
    content = b"stand-in weights"
    name = f"fake-{hashlib.sha256(content).hexdigest()[:8]}.pth"
    monkeypatch.setattr(weights, "coco_weights_file", lambda backbone="resnet50_fpn_v2": name)

    def download(self, *args, **kwargs):  # what torchvision's loader leaves behind
        hub.mkdir(parents=True, exist_ok=True)
        (hub / name).write_bytes(content)
        return {}

    monkeypatch.setattr(detection.FasterRCNN_ResNet50_FPN_V2_Weights, "get_state_dict", download)
    assert weights.main(["fetch-coco"]) == 0
    assert capsys.readouterr().out.strip() == str(hub / name)
    assert weights.main(["path", "--coco"]) == 0
    assert capsys.readouterr().out.strip() == str(hub / name)


def test_path_coco_says_not_cached(hub, capsys):
    assert weights.main(["path", "--coco"]) == 1
    assert capsys.readouterr().err.strip() == "not cached"


def test_dockerfile_fetches_coco_weights_under_the_build_arg(root):
    steps = instructions(root / "Dockerfile")
    arg = steps.index(("ARG", "COCO_WEIGHTS=1"))
    run = next(args for keyword, args in steps[arg:] if keyword == "RUN" and "fetch-coco" in args)
    assert 'if [ "$COCO_WEIGHTS" = "1" ]; then python -m utils.detection.weights fetch-coco ' \
           "--backbone resnet50_fpn_v2; fi" in run
    # after the ImageNet weights, before the cache is made readable for every user
    assert run.index("weights provision") < run.index("fetch-coco") < run.index("chmod -R a+rX /opt/torch")
