"""Box voting (utils/detection/inference.py: VotingRoIHeads, set_box_voting): NMS keeps the boxes torchvision's Faster
R-CNN keeps, with their scores and labels, and each kept box moves to the score-weighted mean of the boxes of its class
that overlapped it by at least the vote IoU before NMS; a model file's choice reaches the jobs that run it."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_script
from torchvision.models.detection.roi_heads import RoIHeads

from utils import defaults as D
from utils.detection.inference import VotingRoIHeads, box_voting, set_box_voting

IMAGE = (100, 100)


def heads(score_thresh: float = 0.05, nms_thresh: float = 0.5, detections: int = 100) -> RoIHeads:
    """RoI heads whose post-processing alone is tested: no pooling, box head or predictor."""
    return RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, (10.0, 10.0, 5.0, 5.0), score_thresh, nms_thresh,
                    detections)


def logits(*class_scores) -> torch.Tensor:
    """Class logits whose softmax is *class_scores* (background first) for each proposal."""
    return torch.log(torch.tensor(class_scores, dtype=torch.float32))


def postprocess(roi_heads: RoIHeads, proposals: torch.Tensor, class_logits: torch.Tensor):
    """Each proposal's box for every class is the proposal itself (no regression)."""
    regression = torch.zeros(len(proposals), class_logits.shape[1] * 4)
    return [part[0] for part in roi_heads.postprocess_detections(class_logits, regression, [proposals], [IMAGE])]


def test_a_kept_box_moves_to_the_score_weighted_mean_of_its_class_boxes_overlapping_it_enough():
    proposals = torch.tensor([[10.0, 10.0, 50.0, 50.0],    # kept: the best with_mask box
                              [12.0, 10.0, 52.0, 50.0],    # IoU 0.905 with it: suppressed, votes
                              [10.0, 10.0, 50.0, 60.0],    # IoU 0.8: suppressed, votes
                              [20.0, 10.0, 60.0, 50.0],    # IoU 0.6: suppressed by NMS (> 0.5), too far to vote
                              [70.0, 70.0, 90.0, 90.0]])   # elsewhere: kept, votes for itself only
    class_logits = logits([0.1, 0.9, 0.0001, 0.0001], [0.3, 0.6, 0.0001, 0.0001], [0.7, 0.2, 0.0001, 0.0001],
                          [0.5, 0.4, 0.0001, 0.0001], [0.2, 0.8, 0.0001, 0.0001])
    roi_heads = heads()
    plain = postprocess(roi_heads, proposals, class_logits)
    set_box_voting(_holder(roi_heads), 0.7)
    voted = postprocess(roi_heads, proposals, class_logits)
    assert torch.equal(voted[1], plain[1]) and torch.equal(voted[2], plain[2])  # same scores, same labels
    assert plain[0].tolist() == [[10.0, 10.0, 50.0, 50.0], [70.0, 70.0, 90.0, 90.0]]
    scores = torch.softmax(class_logits, dim=1)[:3, 1]  # the with_mask scores of the three voters
    expected = (scores[:, None] * proposals[:3]).sum(dim=0) / scores.sum()
    assert voted[0][0] == pytest.approx(expected, abs=1e-4)
    assert voted[0][1] == pytest.approx(torch.tensor([70.0, 70.0, 90.0, 90.0]))


def test_boxes_of_another_class_do_not_vote():
    proposals = torch.tensor([[10.0, 10.0, 50.0, 50.0], [12.0, 10.0, 52.0, 50.0]])
    # the first proposal says with_mask, the second without_mask: two classes, two kept boxes, no vote across
    class_logits = logits([0.1, 0.9, 0.0001, 0.0001], [0.3, 0.0001, 0.7, 0.0001])
    roi_heads = heads()
    set_box_voting(_holder(roi_heads), 0.7)
    boxes, scores, labels = postprocess(roi_heads, proposals, class_logits)
    assert labels.tolist() == [1, 2] and torch.allclose(boxes, proposals)


def test_at_a_vote_iou_of_one_the_heads_give_what_torchvisions_give():
    torch.manual_seed(0)
    corners = torch.rand(60, 2) * 80
    proposals = torch.cat([corners, corners + 5 + torch.rand(60, 2) * 20], dim=1)
    class_logits, regression = torch.randn(60, 4) * 2, torch.randn(60, 16) * 0.1
    roi_heads = heads(detections=10)
    plain = roi_heads.postprocess_detections(class_logits, regression, [proposals], [IMAGE])
    set_box_voting(_holder(roi_heads), 1.0)
    voted = roi_heads.postprocess_detections(class_logits, regression, [proposals], [IMAGE])
    assert len(plain[0][0]) == 10  # the cap holds after voting too
    for mine, theirs in zip(voted, plain):
        assert torch.allclose(mine[0].float(), theirs[0].float())


def test_switching_voting_on_and_off_keeps_the_modules_and_the_state_dict(tiny_model_file):
    from utils.detection.model import load_model_file

    model, _ = load_model_file(tiny_model_file)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    set_box_voting(model, 0.75)
    assert type(model.roi_heads) is VotingRoIHeads and box_voting(model) == 0.75
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())
    set_box_voting(model, None)
    assert type(model.roi_heads) is RoIHeads and box_voting(model) is None
    assert "vote_iou" not in vars(model.roi_heads)
    with pytest.raises(TypeError, match="box voting needs torchvision's RoIHeads"):
        set_box_voting(_holder(torch.nn.Linear(1, 1)), 0.7)


def test_heads_that_change_only_training_are_replaced_by_the_choice(tiny_model_file):
    """train's choice runs on the trained model: with --box-loss giou its heads are recipe.GIoURoIHeads, whose
    inference is torchvision's (the choice failed on them after the last epoch, and no model file was written)."""
    from utils.detection.model import load_model_file
    from utils.detection.recipe import GIoURoIHeads, set_box_head_training

    model, _ = load_model_file(tiny_model_file)
    set_box_head_training(model, "giou", 0.5)
    set_box_voting(model, 0.7)
    assert type(model.roi_heads) is VotingRoIHeads and box_voting(model) == 0.7
    set_box_head_training(model, "giou", 0.5)
    set_box_voting(model, None)
    assert type(model.roi_heads) is RoIHeads and box_voting(model) is None
    assert not getattr(RoIHeads, "training_only", False) and GIoURoIHeads.training_only


def chose_voting(tiny_model_file, folder):
    """The tiny model saved as one that chose box voting at IoU 0.75 on its validation images."""
    from utils.detection.model import load_model_file, save_model_file

    model, meta = load_model_file(tiny_model_file)
    return save_model_file(folder / "chose.pt", model, {
        **meta, "inference_size": {**(meta.get("inference_size") or {}), "image_size": meta["image_size"],
                                   "chosen_on": "validation", "box_voting": True, "box_vote_iou": 0.75}})


@pytest.mark.slow  # two evaluate runs: about 11 s
def test_evaluate_votes_as_the_model_chose_unless_told_otherwise(root, sample_dir, tiny_model_file, tmp_path, capsys):
    chose = chose_voting(tiny_model_file, tmp_path)
    flat = flat_set(sample_dir, tmp_path / "flat", 2)  # two photos: the untrained model's many boxes are slow
    for flags, expected, said in (([], 0.75, "box voting on (the model's, chosen on its validation images)"),
                                  (["--no-box-voting"], None, "box voting off (--no-box-voting)")):
        out = tmp_path / f"out{len(flags)}"
        assert run_script(root, "evaluate", ["--images", flat, "--annotations", flat, "--model", chose,
                                             "--output-dir", out, "--device", "cpu", "--workers", "0", *flags]) == 0
        assert said in capsys.readouterr().out
        evaluation = json.loads((out / "evaluation.json").read_text())  # the IoU as predict's outputs give it
        assert evaluation["box_voting"] is (expected is not None) and evaluation["box_vote_iou"] == expected


def flat_set(sample_dir, folder, count: int):
    """*folder* holding the first *count* sample photos and their annotations side by side, as a preprocessed set."""
    folder.mkdir()
    for stem in sorted(p.stem for p in (sample_dir / "images").iterdir())[:count]:
        for kind, suffix in (("images", ".jpg"), ("annotations", ".xml")):
            (folder / f"{stem}{suffix}").write_bytes((sample_dir / kind / f"{stem}{suffix}").read_bytes())
    return folder


def a_part(box_vote_iou, name: str = "a.jpg") -> dict:
    """A predictions part as bin/predict.py writes it (one image, one detection), made voting at *box_vote_iou*."""
    return {"model": "model.pt", "backbone": "retinaface_mnet025", "image_size": 128, "working_size": 128,
            "score_threshold": 0.5, "score_threshold_source": "--score-threshold", "tta": False,
            "box_vote_iou": box_vote_iou, "num_images": 1, "detection_floor": 0.05, "num_detections": 1,
            "calibration": None, "skipped": [],
            "images": [{"file": name, "folder": "", "width": 100, "height": 80, "annotated": None,
                        "detections": [{"box": [1.0, 2.0, 30.5, 40.0], "label": "with_mask", "score": 0.9}]}]}


def test_merged_shards_voted_alike_and_their_compliance_json_says_how(tmp_path):
    """A shard run with --no-box-voting (or an older predict) merged with shards that voted was taken as the same
    run's, and the merged compliance.json did not say that the boxes had voted, as it says flip TTA."""
    from utils.detection.merge import merge_predictions
    from utils.errors import InputError

    parts = [tmp_path / "predictions_s0.json", tmp_path / "predictions_s1.json"]
    parts[0].write_text(json.dumps(a_part(0.7)))
    parts[1].write_text(json.dumps(a_part(None, "b.jpg")))
    with pytest.raises(InputError, match=r"predictions_s1.json: made with other settings .*\(box_vote_iou\)"):
        merge_predictions(parts, tmp_path / "out", histogram=None, folder_plot=None)
    parts[1].write_text(json.dumps(a_part(0.7, "b.jpg")))
    report = merge_predictions(parts, tmp_path / "out", histogram=None, folder_plot=None)["report"]
    assert report["box_vote_iou"] == 0.7 and report["tta"] is False


def test_a_stopped_video_run_is_not_resumed_with_other_box_voting(clip):
    """predict_video's resume key held flip TTA and the working size, not box voting: a run stopped with it and
    run again with --no-box-voting took the voted frames' detections as its own."""
    from utils.detection.video_progress import run_key

    keys = [run_key([clip], "cpu", clip, 1, 0.5, False, 128, by_content=False, box_vote_iou=iou) for iou in (0.7, None)]
    assert keys[0]["box_vote_iou"] == 0.7 and keys[0] != keys[1]


@pytest.mark.slow
def test_predict_videos_summary_says_how_the_boxes_voted(root, clip, tiny_model_file, tmp_path):
    chose = chose_voting(tiny_model_file, tmp_path)
    for flags, expected in (([], 0.75), (["--no-box-voting"], None)):
        out = tmp_path / f"out{len(flags)}"
        assert run_script(root, "predict_video", ["--source", clip, "--model", chose, "--output-dir", out,
                                                  "--device", "cpu", "--max-frames", "1", *flags]) == 0
        assert json.loads((out / "video_summary.json").read_text())["box_vote_iou"] == expected


def test_a_fold_ensemble_whose_members_chose_differently_is_not_said_to_vote(tiny_model_file, tmp_path):
    """predict and predict_video printed 'box voting on' for an ensemble whose members had chosen on and off (its
    meta["box_voting"] is load_ensemble's 'mixed: True, False', a true value)."""
    from utils.detection.ensemble import box_voting_said, load_models

    chose = chose_voting(tiny_model_file, tmp_path)
    _, meta, _, _ = load_models([chose, tiny_model_file], torch.device("cpu"))
    assert meta["box_vote_iou"] == "mixed: 0.75, None"
    assert box_voting_said(meta).startswith("box voting per member (on, off) (")
    _, meta, _, _ = load_models([chose, tiny_model_file], torch.device("cpu"), box_voting=False)
    assert box_voting_said(meta) == "box voting off (--no-box-voting)"


def test_the_report_page_says_the_model_ran_with_box_voting(root, tmp_path, capsys):
    from run_folders import build, make_run_folder

    run_dir = make_run_folder(tmp_path / "run", hpo=False, statistics=False, figures=False)
    path = run_dir / "outputs" / "evaluation.json"
    for tta, said in ((True, " px with flip TTA and box voting), "), (False, " px with box voting), ")):
        path.write_text(json.dumps({**json.loads(path.read_text()), "tta": tta, "box_voting": True}))
        assert said in build(root, run_dir, capsys)


def test_the_inference_size_bench_runs_its_stored_row_as_stored_and_chooses_from_nms_alone(
        root, sample_dir, tiny_model_file, tmp_path, monkeypatch):
    """bench/inference_size.py loaded models without their box voting: its "as stored" row ran a model that chose
    voting without it (as it runs the stored TTA). Its choice must still start from NMS alone, as train's does
    (training_run.choose_on_validation), and try voting, at BOX_VOTE_IOU, only after the size and TTA."""
    import importlib.util

    import utils.detection.engine as engine

    spec = importlib.util.spec_from_file_location("inference_size_bench", root / "bench" / "inference_size.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    passes, evaluations = [], []

    def validation_pass(model, loader, device, tta=False, **_):  # one labelled face, found: no real inference
        passes.append((box_voting(model), tta))
        target = {"boxes": torch.tensor([[10.0, 10.0, 40.0, 40.0]]), "labels": torch.tensor([1])}
        return [{**target, "scores": torch.tensor([0.9])}], [target]

    monkeypatch.setattr(engine, "run_inference", validation_pass)
    monkeypatch.setattr(bench, "evaluate", lambda model, *_, **__: evaluations.append(box_voting(model)) or {})
    photos = flat_set(sample_dir, tmp_path / "flat", 1)
    bench.measure(chose_voting(tiny_model_file, tmp_path), photos, photos)
    assert evaluations == [0.75, None]  # as stored: the file's voting; as chosen: voting gained nothing here
    assert passes[-2:] == [(None, True), (D.BOX_VOTE_IOU, False)]  # flip TTA, then voting at that TTA
    assert all(vote_iou is None for vote_iou, _ in passes[:-1])


def test_the_box_voting_bench_refuses_a_model_or_set_it_cannot_read_in_one_line_before_any_pass(
        root, tiny_model_file, tmp_path, monkeypatch, capsys):
    import runpy
    import sys

    junk, empty = tmp_path / "junk.pt", tmp_path / "empty"
    junk.write_bytes(b"not a model")
    empty.mkdir()
    for model, val, named in ((junk, empty, junk), (tiny_model_file, empty, empty)):
        monkeypatch.setattr(sys, "argv", ["box_voting.py", "--model", str(model), "--val", str(val)])
        with pytest.raises(SystemExit) as stopped:
            runpy.run_path(str(root / "bench" / "box_voting.py"), run_name="__main__")
        assert stopped.value.code == 2
        error = capsys.readouterr().err.splitlines()[-1]
        assert error.startswith("box_voting.py: error: ") and str(named) in error


def _holder(module: torch.nn.Module) -> torch.nn.Module:
    """A model whose roi_heads is *module*."""
    holder = torch.nn.Module()
    holder.roi_heads = module
    return holder
