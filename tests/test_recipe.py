"""The training recipe's levers (utils.detection.recipe): multi-scale training, repeat-factor sampling,
photometric augmentation, weight EMA, the time budget and the GPU recipe."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection import _utils as det_utils

from utils.data.pairs import pair_folders
from utils.detection import recipe
from utils.detection.model import build_model
from utils.detection.recipe import (RepeatFactorSampler, TimeBudget, build_ema, multiscale_sizes, repeat_factors,
                                    set_roi_batch_size, set_train_sizes, train_transforms)
from utils.detection.params import TrainParams, describe, gpu_recipe
from utils.detection.checkpoint import load_checkpoint
from utils.detection.training import Trainer
from utils.detection.training_plan import PlanError, make_plan

TINY = dict(image_size=128, batch_size=2, workers=0, epochs=2, warmup_iters=2, trainable_layers=2, seed=3,
            weights="none")


def write_voc(path, names):
    objects = "".join(f"<object><name>{n}</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax>"
                      f"<ymax>9</ymax></bndbox></object>" for n in names)
    path.write_text(f"<annotation><filename>{path.stem}.jpg</filename><size><width>20</width><height>20</height>"
                    f"<depth>3</depth></size>{objects}</annotation>")


def test_multiscale_sizes_span_the_spread_in_32_px_steps():
    assert multiscale_sizes(512, 0.25) == tuple(range(384, 641, 32))
    assert multiscale_sizes(512, 0) == ()


def test_multiscale_transform_draws_sizes_in_training_and_keeps_one_size_in_eval():
    model = build_model(weights="none", image_size=128)
    set_train_sizes(model, (96, 160))
    image = torch.rand(3, 100, 200)
    model.transform.train()
    torch.manual_seed(0)
    longer = {max(model.transform([image])[0].image_sizes[0]) for _ in range(12)}
    assert longer == {96, 160}
    model.transform.eval()
    assert max(model.transform([image])[0].image_sizes[0]) == 128


def test_repeat_factors_repeat_images_of_the_rare_class(tmp_path):
    from utils.data.pairs import Pair

    pairs = []
    for i in range(10):
        names = ["with_mask"] + (["mask_weared_incorrect"] if i == 0 else [])
        write_voc(tmp_path / f"{i}.xml", names)
        pairs.append(Pair(tmp_path / f"{i}.jpg", tmp_path / f"{i}.xml"))
    factors = repeat_factors(pairs, threshold=0.4)
    assert factors[0] == pytest.approx(math.sqrt(0.4 / 0.1))  # the rare class is in 1 of 10 images
    assert factors[1:] == [1.0] * 9  # with_mask is everywhere
    assert repeat_factors(pairs, threshold=0) == [1.0] * 10


def test_repeat_factor_sampler_is_reproducible_and_repeats_by_the_factors():
    factors = [2.0, 1.0, 1.5, 1.0]
    first = list(RepeatFactorSampler(factors, torch.Generator().manual_seed(5)))
    again = list(RepeatFactorSampler(factors, torch.Generator().manual_seed(5)))
    assert first == again
    assert first.count(0) == 2 and first.count(1) == 1 and first.count(3) == 1 and first.count(2) in (1, 2)
    draws = [list(RepeatFactorSampler(factors, torch.Generator().manual_seed(s))).count(2) for s in range(200)]
    assert 1.35 < sum(draws) / len(draws) < 1.65  # 1.5 copies on average
    assert len(RepeatFactorSampler(factors, torch.Generator())) == round(5.5)  # the expected count


def test_photometric_and_flip_transforms_keep_boxes_on_the_image():
    from torchvision import tv_tensors

    transforms = train_transforms(hflip=1.0, photometric=1.0)
    image = tv_tensors.Image(torch.randint(0, 255, (3, 20, 30), dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), format="XYXY", canvas_size=(20, 30))
    out_image, out = transforms(image, {"boxes": boxes, "labels": torch.tensor([1])})
    assert out_image.shape == image.shape
    assert out["boxes"].tolist() == [[20.0, 0.0, 30.0, 10.0]]  # flipped
    assert train_transforms(0, 0) is None


def test_ema_follows_the_model_with_a_ramped_decay():
    model = torch.nn.Linear(2, 1)
    ema = build_ema(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update_parameters(model)  # the first update copies
    ema.update_parameters(model)
    assert torch.allclose(ema.module.weight, start + 1.0)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update_parameters(model)
    d = 0.9 * (1 - math.exp(-2 / recipe.EMA_RAMP_UPDATES))
    assert torch.allclose(ema.module.weight, start + 1.0 + (1 - d))
    assert build_ema(model, 0) is None


@pytest.mark.training
def test_roi_batch_size_sets_the_box_heads_sampler_and_only_when_given(tiny_dir):
    model = build_model(weights="none", image_size=128)
    own = model.roi_heads.fg_bg_sampler.batch_size_per_image
    set_roi_batch_size(model, None)
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == own == 256
    with pytest.raises(ValueError, match="at least 4"):
        set_roi_batch_size(model, 2)
    trainer = Trainer(TrainParams(**{**TINY, "roi_batch_size": 32}), pair_folders(tiny_dir / "images",
                      tiny_dir / "annotations").pairs, torch.device("cpu"), progress=False)
    assert trainer.model.roi_heads.fg_bg_sampler.batch_size_per_image == 32
    # the box head sees at most this many proposals per image in a training step
    seen = []
    trainer.model.roi_heads.box_head.register_forward_hook(lambda module, inputs, output: seen.append(len(output)))
    trainer.run_epoch()
    assert seen and max(seen) <= 32 * TINY["batch_size"]
    assert "32 RoIs/image" in describe(trainer.params)
    # None keeps the architecture's own, and the run records the number it trained with
    own_run = Trainer(TrainParams(**{**TINY, "roi_batch_size": None}), pair_folders(tiny_dir / "images",
                      tiny_dir / "annotations").pairs, torch.device("cpu"), progress=False)
    assert own_run.params.roi_batch_size == own_run.model.roi_heads.fg_bg_sampler.batch_size_per_image == 256


def test_the_giou_loss_of_offsets_decoded_on_a_unit_box_is_that_of_the_boxes_themselves():
    """giou_box_losses decodes offsets against a unit box, not each proposal: IoU and GIoU do not change under the
    shift and per-axis scaling that tells the two apart, so the loss is that of the real boxes."""
    from torchvision.models.detection._utils import BoxCoder
    from torchvision.ops import generalized_box_iou_loss

    generator = torch.Generator().manual_seed(0)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    corners = torch.rand(6, 2, generator=generator) * 300
    proposals = torch.cat([corners, corners + 8 + torch.rand(6, 2, generator=generator) * 120], dim=1)
    faces = proposals + torch.randn(6, 4, generator=generator) * 6
    targets = coder.encode_single(faces, proposals)
    labels = torch.tensor([1, 2, 3, 0, 1, 0])  # two background proposals: no box loss
    regression = torch.randn(6, 4 * 4, generator=generator) * 0.3
    regression.view(6, 4, 4)[torch.arange(6), labels] += targets  # near each face's own box, for its class
    losses = recipe.giou_box_losses(torch.zeros(6, 4), regression, [labels[:4], labels[4:]], [targets[:4],
                                                                                             targets[4:]], coder)
    kept = labels > 0
    predicted = coder.decode_single(regression.view(6, 4, 4)[torch.arange(6), labels][kept], proposals[kept])
    expected = generalized_box_iou_loss(predicted, faces[kept], reduction="sum") * recipe.GIOU_LOSS_WEIGHT / 6
    assert float(losses["loss_box_reg"]) == pytest.approx(float(expected), rel=1e-4)
    assert 0 < float(losses["loss_box_reg"]) and float(losses["loss_classifier"]) == pytest.approx(math.log(4))


def test_the_box_head_trains_from_the_iou_and_with_the_loss_given(tiny_dir):
    from torchvision.models.detection.roi_heads import RoIHeads

    model = build_model(weights="none", image_size=128)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    recipe.set_box_head_training(model, "giou", 0.6)
    matcher = model.roi_heads.proposal_matcher
    assert (matcher.high_threshold, matcher.low_threshold) == (0.6, 0.6)
    assert isinstance(model.roi_heads, recipe.GIoURoIHeads)
    assert model.state_dict().keys() == before.keys()  # the model file is the same either way
    with pytest.raises(ValueError, match="choose one of smooth_l1, giou"):
        recipe.set_box_head_training(model, "l2", 0.5)
    recipe.set_box_head_training(model, "smooth_l1", 0.5)
    assert type(model.roi_heads) is RoIHeads and model.roi_heads.proposal_matcher.high_threshold == 0.5
    # an ignore band: faces from 0.6, background below 0.5; torchvision's sampler leaves the proposals between out
    recipe.set_box_head_training(model, "smooth_l1", 0.6, 0.5)
    matcher = model.roi_heads.proposal_matcher
    assert (matcher.high_threshold, matcher.low_threshold) == (0.6, 0.5)
    matched = matcher(torch.tensor([[0.55, 0.65, 0.3]]))  # IoU of one face (row) with three proposals
    assert matched.tolist() == [det_utils.Matcher.BETWEEN_THRESHOLDS, 0, det_utils.Matcher.BELOW_LOW_THRESHOLD]
    with pytest.raises(ValueError, match="roi_bg_iou 0.7 is above roi_fg_iou 0.6"):
        recipe.set_box_head_training(model, "smooth_l1", 0.6, 0.7)
    trainer = Trainer(TrainParams(**{**TINY, "box_loss": "giou", "roi_fg_iou": 0.6}),
                      pair_folders(tiny_dir / "images", tiny_dir / "annotations").pairs, torch.device("cpu"),
                      progress=False)
    assert isinstance(trainer.model.roi_heads, recipe.GIoURoIHeads)
    assert "box loss giou from IoU 0.6" in describe(trainer.params)
    assert "from IoU 0.6, background below 0.5" in describe(TrainParams(roi_fg_iou=0.6, roi_bg_iou=0.5))
    assert "background" not in describe(TrainParams(roi_fg_iou=0.6, roi_bg_iou=0.6))  # no band
    banded = Trainer(TrainParams(**{**TINY, "roi_fg_iou": 0.6, "roi_bg_iou": 0.5}),
                     pair_folders(tiny_dir / "images", tiny_dir / "annotations").pairs, torch.device("cpu"),
                     progress=False)
    banded_matcher = banded.model.roi_heads.proposal_matcher
    assert (banded_matcher.high_threshold, banded_matcher.low_threshold) == (0.6, 0.5)
    with pytest.raises(PlanError, match="--roi-bg-iou 0.7 is above --roi-fg-iou 0.6"):
        make_plan(TrainParams(roi_fg_iou=0.6, roi_bg_iou=0.7))
    box_head = trainer.model.roi_heads.box_predictor.bbox_pred.weight
    start = box_head.detach().clone()
    row = trainer.run_epoch()
    assert math.isfinite(row.train_loss) and not torch.equal(start, box_head.detach())
    # inference is torchvision's: detections, not losses
    trainer.model.eval()
    with torch.no_grad():
        (out,) = trainer.model([torch.rand(3, 96, 96)])
    assert set(out) == {"boxes", "labels", "scores"}


def test_a_checkpoint_resumes_only_with_the_box_head_it_was_trained_with(tiny_dir, tmp_path):
    from utils.detection.training import TrainingDataError

    pairs = pair_folders(tiny_dir / "images", tiny_dir / "annotations").pairs
    trainer = Trainer(TrainParams(**{**TINY, "epochs": 1}), pairs, torch.device("cpu"), progress=False)
    trainer.checkpoint(tmp_path / "checkpoint.pt", {})
    giou = Trainer(TrainParams(**{**TINY, "epochs": 1, "box_loss": "giou"}), pairs, torch.device("cpu"),
                   progress=False)
    with pytest.raises(TrainingDataError, match="written with box_loss='smooth_l1', this run has 'giou'"):
        giou.resume(tmp_path / "checkpoint.pt")
    # a checkpoint from before the levers existed trained with their defaults: held to them too
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    for key in ("box_loss", "roi_fg_iou", "roi_bg_iou"):
        del payload["args"]["params"][key]
    torch.save(payload, tmp_path / "older.pt")
    with pytest.raises(TrainingDataError, match="written with box_loss='smooth_l1'"):
        giou.resume(tmp_path / "older.pt")
    banded = Trainer(TrainParams(**{**TINY, "epochs": 1, "roi_bg_iou": 0.4}), pairs, torch.device("cpu"),
                     progress=False)
    for checkpoint in ("checkpoint.pt", "older.pt"):
        with pytest.raises(TrainingDataError, match="written with roi_bg_iou=None, this run has 0.4"):
            banded.resume(tmp_path / checkpoint)
    assert Trainer(TrainParams(**{**TINY, "epochs": 1}), pairs, torch.device("cpu"),
                   progress=False).resume(tmp_path / "older.pt") == 0
    # a background bound equal to the face bound is no band: it resumes a checkpoint written without one
    no_band = Trainer(TrainParams(**{**TINY, "epochs": 1, "roi_bg_iou": TrainParams().roi_fg_iou}), pairs,
                      torch.device("cpu"), progress=False)
    for checkpoint in ("checkpoint.pt", "older.pt"):
        assert no_band.resume(tmp_path / checkpoint) == 0


def test_time_budget_fits_the_steps_to_the_timed_steps(monkeypatch):
    now = {"t": 0.0}
    monkeypatch.setattr(recipe.time, "perf_counter", lambda: now["t"])
    # 60 s budget, 10 steps per epoch at 1 s each, 5 validation batches twice per epoch at 0.4 s each
    budget = TimeBudget(1.0, steps_per_epoch=10, val_batches=5, validations_per_epoch=2, steps_skipped=1,
                        steps_timed=4)
    plan = None
    for iteration in range(10):
        now["t"] += 1.0
        plan = budget.fit_after_step(iteration) if plan is None else plan
    # after 5 steps (5 s): 60 - 5 - 2 s for the threshold choice = 53 s left, each step costs 1 s + 4 s / 10
    assert plan == 5 + int(53 // 1.4)
    now["t"] += 4.0  # the first epoch's validation: 14 s in all
    assert budget.fit_after_epoch(steps_done=10, train_s=10.0, validation_s=4.0) == 10 + int((60 - 14 - 2) // 1.4)
    now["t"] += 50.0  # a machine that slowed down: the budget is spent after the first epoch
    assert budget.fit_after_epoch(steps_done=10, train_s=10.0, validation_s=4.0) == 10


@pytest.mark.training
def test_trainer_with_a_time_budget_records_its_plan_and_a_resumed_run_keeps_it(tiny_dir, tmp_path):
    pairs = pair_folders(tiny_dir / "images", tiny_dir / "annotations").pairs
    levers = {**TINY, "epochs": 50, "time_budget": 0.05, "ema_decay": 0.9, "multiscale": 0.25,
              "photometric": 0.5, "repeat_threshold": 0.5}
    trainer = Trainer(TrainParams(**levers), pairs, torch.device("cpu"), val_pairs=pairs[:2], progress=False)
    trainer.run_epoch()
    steps, epochs = trainer.params.max_steps, trainer.params.epochs
    assert len(trainer.train_loader) <= steps < 50 * len(trainer.train_loader)  # 3 s: a few epochs, not 50
    assert epochs == math.ceil(steps / len(trainer.train_loader))
    assert trainer.scheduler.lr_lambdas[0].total_iters == steps
    trainer.checkpoint(tmp_path / "checkpoint.pt", {})
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["args"]["params"]["max_steps"] == steps and saved["extra"]["ema"] is not None
    assert (saved["args"]["params"]["budget_plan"] == trainer.params.budget_plan
            and trainer.params.budget_plan[1] == steps)

    again = Trainer(TrainParams(**levers), pairs, torch.device("cpu"), val_pairs=pairs[:2], progress=False)
    assert again.resume(tmp_path / "checkpoint.pt") == 1
    assert (again.params.max_steps, again.params.epochs) == (steps, epochs) and again.budget is None
    assert again.params.budget_plan == trainer.params.budget_plan  # the model file will record both plans
    for name, tensor in again.ema.module.state_dict().items():
        assert torch.equal(tensor, trainer.ema.module.state_dict()[name]), name


@pytest.mark.training
def test_max_steps_cuts_the_last_epoch_short(tiny_dir):
    pairs = pair_folders(tiny_dir / "images", tiny_dir / "annotations").pairs  # 6 images: 3 steps of 2
    trainer = Trainer(TrainParams(**{**TINY, "max_steps": 4, "repeat_threshold": 0.0}), pairs, torch.device("cpu"),
                      progress=False)
    assert trainer.params.epochs == 2
    first, second = (trainer.run_epoch(validate_loss=False) for _ in range(2))
    assert trainer.completed_epochs == 2 and trainer.scheduler.last_epoch == 4  # 3 steps, then 1


def test_gpu_recipe_changes_only_what_was_not_given(monkeypatch, tmp_path):
    cpu_params = TrainParams()
    assert gpu_recipe(cpu_params, set(), torch.device("cpu")) == (cpu_params, [])
    import utils.detection.weights as weights

    monkeypatch.setattr(weights, "cached_coco_weights", lambda backbone="resnet50_fpn_v2", directory=None:
                        tmp_path / "w.pth")
    asked = TrainParams()
    params, changes = gpu_recipe(asked, set(), torch.device("cuda"))
    assert asked == TrainParams()  # a new value: the parameters given are never written
    assert params.backbone == "resnet50_fpn_v2" and params.weights == "coco" and params.batch_size == 8
    assert params.lr == pytest.approx(TrainParams().lr * 8 / TrainParams().batch_size) and len(changes) == 5
    assert TrainParams().roi_batch_size == 128 and params.roi_batch_size is None  # the architecture's own
    given, _ = gpu_recipe(TrainParams(backbone="mobilenet_v2_fpn", batch_size=2, roi_batch_size=64),
                          {"backbone", "batch_size", "roi_batch_size"}, torch.device("cuda"))
    assert given.backbone == "mobilenet_v2_fpn" and given.batch_size == 2 and given.lr == TrainParams().lr
    assert given.roi_batch_size == 64
    monkeypatch.setattr(weights, "cached_coco_weights", lambda backbone="resnet50_fpn_v2", directory=None: None)
    uncached, _ = gpu_recipe(TrainParams(), set(), torch.device("cuda"))
    assert uncached.backbone == TrainParams().backbone  # no download: the COCO weights are not cached


@pytest.mark.training
def test_the_same_seed_twice_trains_the_same_weights_with_every_lever_on(tiny_dir):
    """CPU training is bitwise repeatable at a fixed number of epochs (the time budget's plan is the part
    that depends on the machine's speed; the next test replays a recorded one)."""
    pairs = pair_folders(tiny_dir / "images", tiny_dir / "annotations").pairs
    levers = {**TINY, "epochs": 1, "ema_decay": 0.9, "multiscale": 0.25, "photometric": 0.5,
              "repeat_threshold": 0.5}
    states = []
    for _ in range(2):
        trainer = Trainer(TrainParams(**levers), pairs, torch.device("cpu"), progress=False)
        trainer.run_epoch(validate_loss=False)
        states.append(trainer.eval_model.state_dict())
    assert states[0].keys() == states[1].keys()
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name


def train_to_the_end(trainer):
    while trainer.completed_epochs < trainer.params.epochs:
        trainer.run_epoch(validate_loss=False)
    return trainer


@pytest.mark.training
def test_a_recorded_budget_plan_replays_the_budget_run_bit_for_bit(tmp_path, monkeypatch):
    """The budget's first plan sets the cosine's length for the rest of the first epoch, so a replay needs
    both plans; given them, it ignores the clock and trains the budget run's weights."""
    from utils.data.sample_data import make_sample_dataset

    make_sample_dataset(tmp_path, num_images=16, seed=5, image_size=(64, 64))
    pairs = pair_folders(tmp_path / "images", tmp_path / "annotations").pairs  # 16 steps of 1: planned at step 12
    # a clock that moves 4 s per reading: the budget plans 76 steps after timing, 20 after the first epoch
    levers = {**TINY, "batch_size": 1, "image_size": 64, "epochs": 1, "time_budget": 0.7, "repeat_threshold": 0.0}
    clock = {"t": 0.0}

    def ticking(seconds):
        def perf_counter():
            clock["t"] += seconds
            return clock["t"]
        return perf_counter

    monkeypatch.setattr(recipe.time, "perf_counter", ticking(4.0))
    budget_run = train_to_the_end(Trainer(TrainParams(**levers), pairs, torch.device("cpu"), progress=False))
    first, final = budget_run.params.budget_plan
    assert (first > len(budget_run.train_loader) < final == budget_run.params.max_steps
            < 4 * len(budget_run.train_loader))
    assert budget_run.completed_epochs == budget_run.params.epochs > 1
    expected = budget_run.model.state_dict()

    monkeypatch.setattr(recipe.time, "perf_counter", ticking(100.0))  # a far slower machine: its clock plans 1 step
    replay = train_to_the_end(Trainer(TrainParams(**{**levers, "budget_plan": [first, final]}), pairs,
                                      torch.device("cpu"), progress=False))
    assert replay.params.budget_plan == [first, final] and replay.params.max_steps == final
    assert replay.scheduler.last_epoch == budget_run.scheduler.last_epoch == final
    for name, tensor in replay.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    # --max-steps FINAL alone trains the same number of steps, but the first epoch's tail at another rate
    final_only = train_to_the_end(Trainer(TrainParams(**{**levers, "time_budget": None, "max_steps": final}),
                                          pairs, torch.device("cpu"), progress=False))
    assert final_only.scheduler.last_epoch == final
    assert not all(torch.equal(tensor, expected[name]) for name, tensor in final_only.model.state_dict().items())


@pytest.mark.training
def test_a_budget_plan_is_checked(tiny_dir, tmp_path):
    from utils.detection.params import check_budget_plan
    from utils.errors import InputError

    assert check_budget_plan([None, 40]) == [None, 40]
    for bad in ([0, 40], [10], [10, "40"], "10,40", [10, None]):
        with pytest.raises(InputError, match="budget_plan"):
            check_budget_plan(bad)
    pairs = pair_folders(tiny_dir / "images", tiny_dir / "annotations").pairs
    with pytest.raises(InputError, match="--max-steps and --budget-plan"):
        Trainer(TrainParams(**{**TINY, "max_steps": 4, "budget_plan": [2, 4]}), pairs, torch.device("cpu"),
                progress=False)
    trainer = Trainer(TrainParams(**TINY), pairs, torch.device("cpu"), progress=False)
    trainer.run_epoch(validate_loss=False)
    trainer.checkpoint(tmp_path / "checkpoint.pt", {})
    replay = Trainer(TrainParams(**{**TINY, "budget_plan": [2, 6]}), pairs, torch.device("cpu"), progress=False)
    with pytest.raises(InputError, match="budget_plan=None"):
        replay.resume(tmp_path / "checkpoint.pt")  # another run's checkpoint is not resumed into a replay
