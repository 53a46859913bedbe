"""Staged training: the --stages specification (parsing, one-line errors, canonical JSON, budget scaling),
and a two-stage run whose resume after stage 1 continues in stage 2 exactly as an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import run_script
from utils.data.pairs import pair_folders
from utils.detection.stages import Stage, StagesError, parse_stages, scale_stages, stage_at, stages_to_json
from utils.detection.params import TrainParams
from utils.detection.training import Trainer, TrainingDataError

TWO_STAGES = [{"epochs": 1, "lr": 0.02, "trainable_layers": 0, "name": "head"},
              {"epochs": 1, "lr": 0.004, "trainable_layers": 2}]
TINY = dict(image_size=96, batch_size=2, workers=0, warmup_iters=1, weights="none", seed=5, lr=0.01,
            trainable_layers=1)


# ----------------------------------------------------------------------------- the specification

def test_the_three_forms_of_a_spec_give_the_same_stages(tmp_path):
    expected = [Stage(epochs=1, lr=0.02, trainable_layers=0, name="head"), Stage(epochs=1, lr=0.004,
                                                                                 trainable_layers=2)]
    yml = tmp_path / "stages.yml"
    yml.write_text("- {epochs: 1, lr: 0.02, trainable_layers: 0, name: head}\n"
                   "- epochs: 1\n  lr: 4e-3\n  trainable_layers: 2\n")  # PyYAML reads 4e-3 as text
    as_json = tmp_path / "stages.json"
    as_json.write_text(json.dumps(TWO_STAGES))
    for spec in (TWO_STAGES, json.dumps(TWO_STAGES), str(yml), as_json):
        assert parse_stages(spec) == expected
    text = stages_to_json(expected)
    assert " " not in text and parse_stages(text) == expected
    assert stages_to_json([Stage(epochs=2)]) == '[{"epochs":2}]'  # unset keys left out: the run's values


@pytest.mark.parametrize("spec, message", [
    ([], "--stages: the list of stages is empty"),
    ({"epochs": 1}, "--stages: expected a list of stages, got dict"),
    ([{"epochs": 1}, {"lr": 0.1}], "--stages: stage 2: key 'epochs' is required"),
    ([{"epochs": 0}], "--stages: stage 1: key 'epochs' must be an integer >= 1, got 0"),
    ([{"epochs": 2.5}], "--stages: stage 1: key 'epochs' must be an integer >= 1, got 2.5"),
    ([{"epochs": 1, "lr": -0.1}], "--stages: stage 1: key 'lr' must be a number > 0, got -0.1"),
    ([{"epochs": 1, "lr": "fast"}], "--stages: stage 1: key 'lr' must be a number > 0, got 'fast'"),
    ([{"epochs": 1}, {"epochs": 1, "trainable_layers": 7}], "--stages: stage 2: key 'trainable_layers' must be"),
    ([{"epochs": 1, "trainable_layers": True}], "--stages: stage 1: key 'trainable_layers' must be"),
    ([{"epochs": 1, "learning_rate": 0.1}], "--stages: stage 1: unknown key 'learning_rate'"),
    ([{"epochs": 1, "name": 3}], "--stages: stage 1: key 'name' must be text"),
    (["3 epochs"], "--stages: stage 1: expected a mapping"),
    ("[{epochs: 1}]", "--stages: neither a .json/.yml/.yaml file nor a JSON list of stages"),
    ("missing.yml", "--stages: stages file missing.yml not found"),
])
def test_a_bad_spec_is_one_line_naming_the_stage_and_key(spec, message):
    with pytest.raises(StagesError) as caught:
        parse_stages(spec)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_a_bad_stages_file_names_the_file(tmp_path):
    path = tmp_path / "stages.yaml"
    path.write_text("- epochs: 1\n- epochs: 2\n  lrr: 0.1\n")
    with pytest.raises(StagesError, match=rf"^train_stages \({path}\): stage 2: unknown key 'lrr'"):
        parse_stages(str(path), where="train_stages")


def test_scaling_keeps_proportions_the_total_and_one_epoch_per_stage():
    stages = [Stage(epochs=3, lr=0.02, trainable_layers=0), Stage(epochs=10, lr=0.005)]
    assert [s.epochs for s in scale_stages(stages, 26)] == [6, 20]
    assert [s.epochs for s in scale_stages(stages, 6)] == [1, 5]
    assert [s.epochs for s in scale_stages(stages, 1)] == [1, 1]  # every stage keeps one epoch
    for total in range(2, 40):
        assert sum(s.epochs for s in scale_stages(stages, total)) == total
    assert scale_stages(stages, 13) == stages and scale_stages(stages, 6)[0].lr == 0.02
    assert [stage_at(stages, epoch) for epoch in (0, 2, 3, 12)] == [(0, 0), (0, 2), (1, 0), (1, 9)]


def test_train_cli_refuses_a_bad_spec_in_one_line(root, tmp_path, capsys):
    base = ["--images", tmp_path, "--annotations", tmp_path, "--checkpoint", tmp_path / "c.pt",
            "--output", tmp_path / "model.pt", "--device", "cpu"]
    assert run_script(root, "train", [*base, "--stages", '[{"epochs": 1, "lr": 0}]']) == 2
    assert "train: error: --stages: stage 1: key 'lr' must be a number > 0, got 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------- training in stages

@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from utils.data.sample_data import make_sample_dataset

    out = tmp_path_factory.mktemp("stages")
    make_sample_dataset(out, num_images=4, seed=13, image_size=(96, 96))
    return pair_folders(out / "images", out / "annotations").pairs


def backbone_body(model) -> dict:
    return {name: value.detach().clone() for name, value in model.backbone.body.named_parameters()}


@pytest.mark.training
def test_stages_train_their_own_layers_and_a_resume_after_stage_1_continues_in_stage_2(pairs, tmp_path):
    device = torch.device("cpu")
    checkpoint = tmp_path / "checkpoint.pt"

    whole = Trainer(TrainParams(**TINY, epochs=99, stages=TWO_STAGES), pairs, device, progress=False)
    assert whole.params.epochs == 2  # the stages replace epochs
    before = backbone_body(whole.model)
    first = whole.run_epoch()
    assert first.stage == 1 and first.backbone_frozen
    assert all(torch.equal(before[k], v) for k, v in backbone_body(whole.model).items())  # stage 1: frozen
    assert whole.scheduler.lr_lambdas[0].total_iters == 2  # a cosine as long as the stage (2 steps)
    whole.checkpoint(checkpoint, {})
    second = whole.run_epoch()
    assert second.stage == 2 and not second.backbone_frozen
    assert whole.optimizer.defaults["lr"] == 0.004 and whole.stage_index == 1
    assert sum(not torch.equal(before[k], v) for k, v in backbone_body(whole.model).items()) > 0  # now trained
    assert [row["stage"] for row in whole.history] == [1, 2]

    # A new process after stage 1: the same command resumes into stage 2 with the same result.
    resumed = Trainer(TrainParams(**TINY, epochs=99, stages=TWO_STAGES), pairs, device, progress=False)
    assert resumed.resume(checkpoint) == 1 and resumed.stage_index == 0
    row = resumed.run_epoch()
    assert row.stage == 2 and resumed.stage_index == 1 and resumed.optimizer.defaults["lr"] == 0.004
    assert row.train_loss == pytest.approx(second.train_loss, rel=1e-4)
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name

    # Another --stages (or none) does not resume this checkpoint.
    other = [{**TWO_STAGES[0], "epochs": 2}, TWO_STAGES[1]]
    with pytest.raises(TrainingDataError, match="written with stages=.*match --stages"):
        Trainer(TrainParams(**TINY, stages=other), pairs, device, progress=False).resume(checkpoint)
    with pytest.raises(TrainingDataError, match="written with stages="):
        Trainer(TrainParams(**TINY, epochs=2), pairs, device, progress=False).resume(checkpoint)


def test_a_time_budget_scales_the_stages_and_the_running_cosine(pairs):
    stages = [{"epochs": 1, "trainable_layers": 0}, {"epochs": 3}]
    trainer = Trainer(TrainParams(**TINY, stages=stages), pairs, torch.device("cpu"), progress=False)
    steps_per_epoch = len(trainer.train_loader)
    trainer.set_plan(8 * steps_per_epoch + 1)  # what TimeBudget would return: 8 whole epochs fit
    assert [s.epochs for s in trainer.stages] == [2, 6] and trainer.params.epochs == 8
    assert trainer.params.stages == [{"epochs": 2, "trainable_layers": 0}, {"epochs": 6}]  # recorded as trained
    assert trainer.scheduler.lr_lambdas[0].total_iters == 2 * steps_per_epoch
    assert trainer.params.max_steps is None  # whole epochs: the stages are the plan


def test_stages_refuse_more_layers_than_the_backbone_has_and_a_freeze_schedule(pairs):
    device = torch.device("cpu")
    with pytest.raises(StagesError, match="freeze_backbone_epochs=1"):
        Trainer(TrainParams(**TINY, freeze_backbone_epochs=1, stages=TWO_STAGES), pairs, device, progress=False)
    # mobilenet_v2_fpn has 6 backbone stages (all of them: 6), retinaface_mnet025 and the resnets 5
    whole_backbone = [{"epochs": 1, "trainable_layers": 6}]
    assert Trainer(TrainParams(**{**TINY, "backbone": "mobilenet_v2_fpn"}, stages=whole_backbone), pairs, device,
                   progress=False).stage_layers(Stage(epochs=1, trainable_layers=6)) == 6
    for backbone in ("resnet50_fpn", "retinaface_mnet025"):
        with pytest.raises(StagesError, match=rf"stage 1: key 'trainable_layers' is 6, but backbone {backbone} has "
                                              r"5 stages"):
            Trainer(TrainParams(**{**TINY, "backbone": backbone}, stages=whole_backbone), pairs, device,
                    progress=False)
