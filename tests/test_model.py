"""The model factory: label map, every backbone builds offline, model files round-trip, trainable layers."""

from __future__ import annotations

import logging

import pytest
import torch

from utils.classes import CLASSES, LABEL_OF, NUM_CLASSES
from utils.detection.model import (BACKBONES, ModelError, build_model, freeze_backbone, load_model_file,
                                   save_model_file, set_trainable_layers)


def body_trainable(model) -> int:
    return sum(p.numel() for p in model.backbone.body.parameters() if p.requires_grad)


def test_label_map_has_no_real_class_at_zero():
    assert LABEL_OF["background"] == 0
    assert sorted(LABEL_OF[name] for name in CLASSES) == [1, 2, 3]
    assert NUM_CLASSES == 4


@pytest.mark.parametrize("backbone", BACKBONES)
def test_each_backbone_builds_offline_and_predicts(backbone, caplog):
    # The big backbones without weights keep this fast and offline; mobilenet_v2_fpn uses the cached ImageNet file
    # or says it has none.
    weights = "imagenet" if backbone == "mobilenet_v2_fpn" else "none"
    with caplog.at_level(logging.INFO, logger="utils.detection.model"):
        model = build_model(backbone, weights=weights, image_size=128, trainable_layers=2)
    assert any(backbone in r.getMessage() for r in caplog.records), "the weights decision is logged"
    assert model.roi_heads.box_predictor.cls_score.out_features == NUM_CLASSES
    assert model.transform.min_size == (128,) and model.transform.max_size == 128
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 90, 120)])[0]
    assert set(out) == {"boxes", "labels", "scores"}
    assert out["boxes"].shape[1] == 4
    if len(out["labels"]):
        assert int(out["labels"].min()) >= 1 and int(out["labels"].max()) <= 3


def test_mobilenet_v2_uses_cached_imagenet_weights_when_present():
    from utils.detection.weights import cached_weights

    path = cached_weights()
    if path is None:
        pytest.skip("MobileNetV2 ImageNet weights not cached (run `python -m utils.detection.weights provision`)")
    model = build_model("mobilenet_v2_fpn", weights="imagenet", image_size=128)
    assert model.weights_report.loaded == "imagenet"
    reference = torch.load(path, weights_only=True)
    body = model.backbone.body.state_dict()
    assert torch.equal(body["features.0.0.weight"], reference["features.0.0.weight"])
    assert torch.equal(body["features.18.1.running_var"], reference["features.18.1.running_var"])
    # the same file given explicitly (as workflow jobs do) gives the same weights
    explicit = build_model("mobilenet_v2_fpn", weights_file=str(path), image_size=128)
    assert explicit.weights_report.source == str(path)
    assert torch.equal(explicit.backbone.body.state_dict()["features.5.conv.0.0.weight"],
                       reference["features.5.conv.0.0.weight"])


def test_unavailable_coco_weights_fall_back_with_one_log_line(caplog):
    # MobileNetV2 has no COCO detector: the factory falls back to ImageNet (or none) and says so.
    with caplog.at_level(logging.INFO, logger="utils.detection.model"):
        model = build_model("mobilenet_v2_fpn", weights="coco", image_size=128)
    lines = [r.getMessage() for r in caplog.records if r.name == "utils.detection.model"]
    assert len(lines) == 1 and "no COCO detector exists" in lines[0]
    assert model.weights_report.loaded in ("imagenet", "none")


def test_bad_weight_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="weights.pth"):
        build_model("mobilenet_v2_fpn", weights_file=str(bad), image_size=128)
    with pytest.raises(ModelError, match="not found"):
        build_model("mobilenet_v2_fpn", weights=str(tmp_path / "missing.pth"), image_size=128)
    with pytest.raises(ModelError, match="unknown backbone"):
        build_model("vgg", image_size=128)


def test_detector_weights_file_loads_all_but_mismatched_predictor(tmp_path):
    source = build_model("mobilenet_v2_fpn", weights="none", image_size=128, num_classes=7)
    path = save_model_file(tmp_path / "other.pt", source)
    model = build_model("mobilenet_v2_fpn", weights=str(path), image_size=128)
    assert model.weights_report.loaded == "coco"  # a whole detector's weights
    assert torch.equal(model.rpn.head.conv[0][0].weight, source.rpn.head.conv[0][0].weight)
    assert model.roi_heads.box_predictor.cls_score.out_features == NUM_CLASSES


@pytest.mark.parametrize("backbone", ["mobilenet_v2_fpn", "resnet50_fpn"])
def test_model_file_round_trip_without_pretrained_weights(tmp_path, backbone):
    weights = "imagenet" if backbone == "mobilenet_v2_fpn" else "none"
    model = build_model(backbone, weights=weights, image_size=160)
    path = save_model_file(tmp_path / "model.pt", model, {"training": {"lr": 0.01, "epochs": 1}})
    payload = torch.load(path, weights_only=True)  # plain types only
    assert payload["meta"]["backbone"] == backbone
    assert payload["meta"]["classes"] == list(CLASSES)
    assert payload["meta"]["label_map"]["background"] == 0
    loaded, meta = load_model_file(path)
    assert meta["image_size"] == 160 and meta["training"]["lr"] == 0.01
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_load_model_file_errors_name_the_file(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_model_file(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    torch.save({"weights": 1}, junk)
    with pytest.raises(ModelError, match="junk.pt: not a model file"):
        load_model_file(junk)


def test_trainable_layers_and_two_stage_freeze():
    model = build_model("mobilenet_v2_fpn", weights="imagenet", image_size=128, trainable_layers=0)
    assert body_trainable(model) == 0
    assert all(p.requires_grad for p in model.backbone.fpn.parameters())
    counts = []
    for layers in range(len(model.backbone_stages) + 1):
        set_trainable_layers(model, layers)
        counts.append(body_trainable(model))
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] > counts[1] > 0
    assert counts[-1] == sum(p.numel() for p in model.backbone.body.parameters())
    freeze_backbone(model)
    assert body_trainable(model) == 0
    with pytest.raises(ModelError, match="between 0 and"):
        set_trainable_layers(model, 99)


def test_a_pretrained_weight_file_given_by_path_is_recorded_with_its_sha256(tmp_path):
    # The run record hashes the images and annotations only, and the model file named a --weights-file by its path:
    # another file at that path (a retrained backbone, a newer conversion) trained another model, unrecorded.
    # torchvision's and the provisioned RetinaFace files carry their sha256 in their names; a path given need not.
    from utils.provenance import file_sha256

    source = build_model("mobilenet_v2_fpn", weights="none", image_size=128)
    path = save_model_file(tmp_path / "pretrained.pt", source)
    model = build_model("mobilenet_v2_fpn", weights_file=str(path), image_size=128)
    meta = torch.load(save_model_file(tmp_path / "model.pt", model), weights_only=True)["meta"]
    assert meta["pretrained"] == {"requested": "imagenet", "loaded": "coco", "source": str(path),
                                  "sha256": file_sha256(path)}
    unpretrained = torch.load(save_model_file(tmp_path / "none.pt", source), weights_only=True)["meta"]
    assert "sha256" not in unpretrained["pretrained"]  # nothing read: the file's metadata is as it was


@pytest.mark.parametrize("backbone", ["mobilenet_v2_fpn", "retinaface_mnet025"])
def test_the_detectors_sizes_are_read_from_the_defaults_table(backbone, monkeypatch):
    # utils/defaults.py holds every default: a value changed there reaches the two detectors model.py builds itself
    from utils import defaults as D

    for name, value in (("DETECTIONS_PER_IMAGE", 7), ("RPN_PRE_NMS_TOP_N_TEST", 11), ("RPN_POST_NMS_TOP_N_TEST", 13),
                        ("OWN_ROI_BATCH_SIZE", 17)):
        monkeypatch.setattr(D, name, value)
    model = build_model(backbone, weights="none", image_size=128)
    assert model.roi_heads.detections_per_img == 7
    assert model.rpn._pre_nms_top_n["testing"] == 11 and model.rpn._post_nms_top_n["testing"] == 13
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 17


@pytest.mark.parametrize("backbone", ["retinaface_mnet025", "resnet50_fpn"])
def test_a_model_file_detects_with_the_settings_it_was_written_with(tmp_path, monkeypatch, backbone):
    """The detections cap, the proposals and the NMS IoUs are the file's, not today's defaults: its threshold and the
    estimators' rates were measured with them (the cap went from 200 to 1,000 boxes without old files saying so)."""
    from utils import defaults as D

    model = build_model(backbone, weights="none", image_size=128)
    own = torch.load(save_model_file(tmp_path / "model.pt", model), weights_only=True)["meta"]["postprocessing"]
    assert own["box_detections_per_img"] == model.roi_heads.detections_per_img  # torchvision's 100 for resnet50_fpn
    assert own["rpn_post_nms_top_n_test"] == model.rpn._post_nms_top_n["testing"]
    model.roi_heads.detections_per_img, model.roi_heads.nms_thresh, model.rpn._pre_nms_top_n["testing"] = 37, 0.45, 99
    path = save_model_file(tmp_path / "tuned.pt", model)
    for name, value in (("DETECTIONS_PER_IMAGE", 7), ("RPN_PRE_NMS_TOP_N_TEST", 11), ("RPN_POST_NMS_TOP_N_TEST", 13)):
        monkeypatch.setattr(D, name, value)  # the defaults have moved on since the file was written
    loaded, meta = load_model_file(path)
    assert loaded.roi_heads.detections_per_img == 37 and loaded.roi_heads.nms_thresh == 0.45
    assert loaded.rpn._pre_nms_top_n["testing"] == 99
    assert loaded.rpn._post_nms_top_n["testing"] == own["rpn_post_nms_top_n_test"]
    assert meta["postprocessing"] == {**own, "box_detections_per_img": 37, "box_nms_thresh": 0.45,
                                      "rpn_pre_nms_top_n_test": 99}
    loaded.roi_heads.detections_per_img = 41  # a loaded model changed and saved with its file's meta: its own win
    assert torch.load(save_model_file(tmp_path / "again.pt", loaded, meta), weights_only=True)["meta"][
        "postprocessing"]["box_detections_per_img"] == 41
    payload = torch.load(path, weights_only=True)
    del payload["meta"]["postprocessing"]  # a file from before the record: today's values
    torch.save(payload, tmp_path / "old.pt")
    old, _ = load_model_file(tmp_path / "old.pt")
    if backbone == "retinaface_mnet025":  # model.py's own sizes follow the table; torchvision's builder its own
        assert old.roi_heads.detections_per_img == 7 and old.rpn._pre_nms_top_n["testing"] == 11
    else:
        assert old.roi_heads.detections_per_img == 100 and old.rpn._pre_nms_top_n["testing"] == 1000


@pytest.mark.parametrize("backbone", ["mobilenet_v2_fpn", "retinaface_mnet025"])
def test_a_crowd_photo_keeps_every_box_above_the_detection_floor(backbone):
    """The real test split's most crowded photo holds 115 faces, and a face can give a box per class: with 200 boxes
    a photo, boxes scoring up to 0.14 were cut from it (and boxes above the floor from two photos of 26 and 29 faces),
    which the score-sum estimators and the recall lost without a word."""
    from utils import defaults as D

    heads = build_model(backbone, weights="none", image_size=128).roi_heads
    faces = 115
    corners = torch.arange(faces, dtype=torch.float32)[:, None] * 10
    proposals = torch.cat([corners, torch.zeros(faces, 1), corners + 8, torch.full((faces, 1), 8.0)], dim=1)
    # each face: background 0.1, then 0.7 / 0.1 / 0.1 over the three classes: three boxes above the floor
    logits = torch.log(torch.tensor([[0.1, 0.7, 0.1, 0.1]])).expand(faces, NUM_CLASSES)  # background included
    regression = torch.zeros(faces, NUM_CLASSES * 4)
    boxes, scores, labels = (part[0] for part in heads.postprocess_detections(logits, regression, [proposals],
                                                                               [(16, faces * 10)]))
    assert len(scores) == 3 * faces and bool((scores >= D.DETECTION_FLOOR).all())
    assert sorted(labels.tolist()) == sorted(list(range(1, NUM_CLASSES)) * faces)
