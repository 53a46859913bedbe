"""A model file is user input: each bad claim in it is one line naming the file, exit 2, for predict and
evaluate (issue #23), never a KeyError traceback at the first image or a silently empty answer."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from helpers import load_script
from utils.classes import CLASSES
from utils.cli import run_job
from utils.detection.model import ModelError, load_model_file


def rewrite(source, path, change):
    """A copy of the model file *source* at *path* with change(payload) applied to its loaded payload."""
    payload = torch.load(source, map_location="cpu", weights_only=True)
    change(payload)
    torch.save(payload, path)
    return path


def widen_to_six_classes(payload):
    """The issue's case: the box predictor widened to 6 outputs (5 classes + background), meta saying so."""
    state = payload["model"]
    for name, rows in (("cls_score", 6), ("bbox_pred", 24)):
        for kind in ("weight", "bias"):
            key = f"roi_heads.box_predictor.{name}.{kind}"
            state[key] = torch.zeros((rows, *state[key].shape[1:]))
    payload["meta"]["num_classes"] = 6
    payload["meta"]["classes"] = [*CLASSES, "face_shield", "scarf"]


def widen_without_meta(payload):
    """The predictor widened but the meta left at this project's classes: the shapes contradict it."""
    state = payload["model"]
    for name, rows in (("cls_score", 6), ("bbox_pred", 24)):
        for kind in ("weight", "bias"):
            key = f"roi_heads.box_predictor.{name}.{kind}"
            state[key] = torch.zeros((rows, *state[key].shape[1:]))


def set_meta(key, value):
    def change(payload):
        payload["meta"][key] = value
    return change


def set_postprocessing(key, value):
    """The file's inference-time settings with *key* set to *value* (None: removed)."""
    def change(payload):
        record = payload["meta"]["postprocessing"]
        if value is None:
            del record[key]
        else:
            record[key] = value
    return change


def replace_meta(value):
    def change(payload):
        payload["meta"] = value
    return change


def drop_meta(key):
    def change(payload):
        del payload["meta"][key]
    return change


# a well-formed validation record of one image with one face (quantify.calibration_record's form)
ONE_IMAGE_RATES = {"score_threshold": 0.5, "chosen_on": "validation", "classes": list(CLASSES),
                   "images": [{"truth": [1, 0, 0], "confusion": [[1, 0, 0, 0]] + [[0] * 4] * 3,
                               "soft": [[0.9, 0, 0]] + [[0] * 3] * 3}]}

CASES = {
    "six_classes": (widen_to_six_classes, "model classes"),
    "predictor_wider_than_meta": (widen_without_meta, "roi_heads.box_predictor.cls_score.weight has 6 outputs"),
    "meta_is_5": (replace_meta(5), "model metadata must be a mapping, got int 5"),
    "threshold_abc": (set_meta("operating_threshold", {"score_threshold": "abc", "chosen_on": "validation"}),
                      "operating_threshold.score_threshold must be a number between 0 and 1, got 'abc'"),
    "threshold_7": (set_meta("operating_threshold", {"score_threshold": 7.0, "chosen_on": "validation"}),
                    "operating_threshold.score_threshold must be a number between 0 and 1, got 7.0"),
    "missing_image_size": (drop_meta("image_size"), "model metadata lacks 'image_size'"),
    "image_size_text": (set_meta("image_size", "512"), "image_size must be a whole number of pixels"),
    "image_size_huge": (set_meta("image_size", 10 ** 9), "image_size must be a whole number of pixels"),
    "num_classes_bool": (set_meta("num_classes", True), "num_classes must be 4"),
    "unknown_backbone": (set_meta("backbone", "x" * 10_000), "is not one of"),
    "frozen_bn_text": (set_meta("frozen_bn", "yes"), "frozen_bn must be true or false"),
    # more than the backbone has: only building it tells (the tiny model's retinaface_mnet025 has 5)
    "trainable_layers_99": (set_meta("trainable_layers", 99), "model metadata: trainable layers must be between 0"),
    "quantification_list": (set_meta("quantification", [1, 2]), "quantification must be a mapping"),
    "inference_size_list": (set_meta("inference_size", [640]), "inference_size must be a mapping"),
    "inference_size_huge": (set_meta("inference_size", {"image_size": 10 ** 6, "chosen_on": "validation"}),
                            "inference_size.image_size must be a whole number of pixels from 32 to"),
    "inference_size_text": (set_meta("inference_size", {"image_size": "800", "chosen_on": "validation"}),
                            "inference_size.image_size must be a whole number of pixels"),
    "inference_size_tta_text": (set_meta("inference_size", {"image_size": 800, "chosen_on": "validation",
                                                             "tta": "no"}),
                                "inference_size.tta must be true or false"),
    # "false" was true: the boxes voted; an IoU above 1 left every kept box without a voter, NaN
    "inference_size_voting_text": (set_meta("inference_size", {"image_size": 800, "box_voting": "false"}),
                                   "inference_size.box_voting must be true or false"),
    "inference_size_vote_iou_2": (set_meta("inference_size", {"image_size": 800, "box_voting": True,
                                                               "box_vote_iou": 2}),
                                  "inference_size.box_vote_iou must be a number above 0 and at most 1, got 2"),
    "postprocessing_list": (set_meta("postprocessing", [100]), "postprocessing must be a mapping"),
    # a cap of a billion boxes would let one photo's NMS and records swell; a text IoU would reach NMS as text
    "postprocessing_cap_huge": (set_postprocessing("box_detections_per_img", 10 ** 9),
                                "postprocessing.box_detections_per_img must be a whole number from 1 to"),
    "postprocessing_cap_0": (set_postprocessing("box_detections_per_img", 0),
                             "postprocessing.box_detections_per_img must be a whole number from 1 to"),
    "postprocessing_nms_text": (set_postprocessing("box_nms_thresh", "0.5"),
                                "postprocessing.box_nms_thresh must be a number above 0 and at most 1, got '0.5'"),
    # torchvision keeps a box scoring above the floor: at 1 the model found no face, at 0.5 the boxes the
    # probabilistic counts read (down to DETECTION_FLOOR) were gone, each without a word
    "postprocessing_floor_1": (set_postprocessing("box_score_thresh", 1.0),
                               "postprocessing.box_score_thresh must be a number from 0 to 0.05, got 1.0"),
    "postprocessing_floor_half": (set_postprocessing("box_score_thresh", 0.5),
                                  "postprocessing.box_score_thresh must be a number from 0 to 0.05, got 0.5"),
    "postprocessing_rpn_floor_1": (set_postprocessing("rpn_score_thresh", 1.0),
                                   "postprocessing.rpn_score_thresh must be a number from 0 to under 1, got 1.0"),
    "postprocessing_nms_0": (set_postprocessing("box_nms_thresh", 0.0),
                             "postprocessing.box_nms_thresh must be a number above 0 and at most 1, got 0.0"),
    "postprocessing_count_float": (set_postprocessing("rpn_pre_nms_top_n_test", 5.0),
                                   "postprocessing.rpn_pre_nms_top_n_test must be a whole number from 1 to 10,000"),
    "postprocessing_missing": (set_postprocessing("rpn_post_nms_top_n_test", None),
                               "postprocessing.rpn_post_nms_top_n_test must be a whole number"),
    "quantification_size_text": (set_meta("quantification", {**ONE_IMAGE_RATES, "working_size": "768"}),
                                 "quantification.working_size must be a whole number of pixels"),
    "quantification_tta_text": (set_meta("quantification", {**ONE_IMAGE_RATES, "tta": "yes"}),
                                "quantification.tta must be true or false"),
    "quantification_junk": (set_meta("quantification", {"score_threshold": 0.5, "chosen_on": "validation",
                                                         "classes": list(CLASSES), "images": [1, 2, 3]}),
                            "quantification is not a calibration record"),
    # a NaN score sum passed the shape check and stopped evaluate after every image had run (a traceback)
    "quantification_nan": (set_meta("quantification", {**ONE_IMAGE_RATES, "images": [
        {**ONE_IMAGE_RATES["images"][0], "soft": [[float("nan"), 0, 0]] + [[0] * 3] * 3}]}),
        "calibration counts or scores that are negative, NaN or infinite"),
    "quantification_negative": (set_meta("quantification", {**ONE_IMAGE_RATES, "images": [
        {**ONE_IMAGE_RATES["images"][0], "truth": [-1, 0, 0]}]}),
        "calibration counts or scores that are negative, NaN or infinite"),
}


@pytest.fixture(scope="module")
def bad_model_files(tiny_model_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_models")
    files = {name: rewrite(tiny_model_file, folder / f"{name}.pt", change) for name, (change, _) in CASES.items()}
    truncated = folder / "truncated.pt"
    truncated.write_bytes(tiny_model_file.read_bytes()[:5000])
    files["truncated"] = truncated
    return files


EXPECTED = {**{name: expected for name, (_, expected) in CASES.items()}, "truncated": "not a readable model file"}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_load_model_file_refuses_each_bad_claim_naming_the_file(bad_model_files, case):
    with pytest.raises(ModelError) as caught:
        load_model_file(bad_model_files[case])
    message = str(caught.value)
    assert message.startswith(f"{bad_model_files[case]}: ") and EXPECTED[case] in message
    assert "\n" not in message and len(message) < 400  # a huge value is shown shortened


@pytest.mark.parametrize("script", ["predict", "evaluate"])
@pytest.mark.parametrize("case", ["six_classes", "meta_is_5", "threshold_abc", "threshold_7", "missing_image_size",
                                  "trainable_layers_99", "truncated"])
def test_predict_and_evaluate_exit_2_with_one_line_on_a_bad_model_file(root, bad_model_files, tmp_path, capsys,
                                                                        script, case):
    images = tmp_path / "images"
    images.mkdir()
    argv = ["--images", str(images), "--model", str(bad_model_files[case]), "--output-dir", str(tmp_path / "out"),
            "--device", "cpu"]
    if script == "evaluate":
        argv += ["--annotations", str(images)]
    module = load_script(root, script)
    assert run_job(module.main, module.get_args_parser(), argv, job=script) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and err.startswith(f"{script}: error: {bad_model_files[case]}: ")
    assert EXPECTED[case] in err and "Traceback" not in err


@pytest.mark.slow
def test_the_real_script_on_the_issues_six_class_file_exits_2_without_a_traceback(root, bad_model_files, tmp_path):
    proc = subprocess.run([sys.executable, str(root / "bin" / "predict.py"), "--images", str(tmp_path),
                           "--model", str(bad_model_files["six_classes"]), "--output-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "six_classes.pt: model classes" in proc.stderr


def test_a_good_model_file_still_loads(tiny_model_file):
    model, meta = load_model_file(tiny_model_file)
    assert meta["classes"] == list(CLASSES) and not model.training


def test_a_truncated_model_or_checkpoint_is_said_in_torchs_first_sentence_not_cut_mid_advice(tmp_path):
    # torch.load's text goes on after the problem ("This is an internal miniz error. If you are seeing this
    # error, there is a high likelihood that your checkpoint file is corrupted..."): a cut at 200 characters
    # ended the message mid-sentence.
    from utils.detection.checkpoint import CheckpointError, load_checkpoint

    whole = tmp_path / "whole.pt"
    torch.save({"weights": torch.zeros(64, 64)}, whole)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(whole.read_bytes()[:4000])
    expected = (f"{truncated}: not a readable {{}} (RuntimeError: PytorchStreamReader failed reading zip archive: "
                "failed finding central directory)")
    with pytest.raises(ModelError) as caught:
        load_model_file(truncated, torch.device("cpu"))
    assert str(caught.value) == expected.format("model file")
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(truncated)
    assert str(caught.value) == expected.format("checkpoint") + "; delete it to start afresh"


def test_a_model_or_checkpoint_cut_short_past_its_start_is_said_to_be_truncated(tmp_path):
    # Cut after its first few KB, torch's zip reader gives no reason at all: "OSError: [Errno 22] Invalid argument".
    from utils.detection.checkpoint import CheckpointError, load_checkpoint

    whole = tmp_path / "whole.pt"
    torch.save({"weights": torch.zeros(64, 64)}, whole)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(whole.read_bytes()[:whole.stat().st_size // 2])
    expected = f"{truncated}: not a readable {{}} (truncated or damaged: no zip directory at its end, where torch.save"
    with pytest.raises(ModelError) as caught:
        load_model_file(truncated, torch.device("cpu"))
    assert str(caught.value).startswith(expected.format("model file"))
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(truncated)
    assert str(caught.value).startswith(expected.format("checkpoint"))
    assert str(caught.value).endswith("; delete it to start afresh")
