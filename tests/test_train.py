"""Training: one epoch writes a loadable checkpoint and model file; resuming continues with the same state;
a non-finite loss stops with a clear error; the loss on a loader leaves the model untouched."""

from __future__ import annotations

import argparse
import copy
import csv
import json
import subprocess
import sys

import pytest
import torch

from utils import defaults as D
from utils.detection.engine import NonFiniteLossError, evaluate_loss, train_one_epoch
from utils.detection.evaluation import load_trained_model
from utils.detection.optim import lr_factor
from utils.detection.model import load_model_file
from utils.data.pairs import pair_folders
from utils.detection.params import TrainParams, read_params_file, resolve_params
from utils.detection.recipe import make_loader
from utils.detection.training import Trainer
from utils.detection.weights import job_weights

TINY = dict(image_size=128, batch_size=2, workers=0, epochs=2, warmup_iters=2, trainable_layers=2, seed=3)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """6 images of 96x96: enough for 3 batches, fast on two CPU cores."""
    from utils.data.sample_data import make_sample_dataset

    out = tmp_path_factory.mktemp("tiny")
    make_sample_dataset(out, num_images=6, seed=11, image_size=(96, 96))
    return out


def tiny_pairs(tiny_dir):
    return pair_folders(tiny_dir / "images", tiny_dir / "annotations").pairs


@pytest.mark.training
def test_train_cli_one_epoch_writes_loadable_outputs(tiny_dir, tmp_path, root):
    out = tmp_path / "run"
    command = [sys.executable, str(root / "bin" / "train.py"), "--images", str(tiny_dir / "images"),
               "--annotations", str(tiny_dir / "annotations"), "--epochs", "1", "--image-size", "128",
               "--batch-size", "2", "--workers", "0", "--checkpoint", str(out / "checkpoint.pt"),
               "--output", str(out / "model.pt"), "--seed", "1", "--no-progress", "--device", "cpu"]
    out.mkdir()
    (out / "checkpoint.pt").touch()  # the workflow's initial checkpoint is an empty file
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    args_line, params_line = result.stdout.splitlines()[:2]
    assert args_line.startswith("train: args: {") and f'"images": "{tiny_dir / "images"}"' in args_line
    params = json.loads(params_line.removeprefix("train: params: "))
    assert params["epochs"] == 1 and params["lr"] == TrainParams().lr  # resolved: flag, then default
    banners = ["Loading data", "Creating model", "Start training", "Writing the model"]
    assert [line for line in result.stderr.splitlines() if line in banners] == banners
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert {"model", "optimizer", "scheduler", "rng", "args"} <= set(checkpoint)
    assert isinstance(checkpoint["rng"]["torch"], torch.Tensor)
    model, meta = load_model_file(out / "model.pt")
    # the default backbone, or the one it falls back to where its weights are not provisioned
    assert meta["backbone"] == job_weights(D.BACKBONE)[0] and meta["image_size"] == 128
    assert meta["training"]["epochs"] == 1 and meta["num_train_images"] == 6
    assert meta["inputs_sha256"] and meta["packages"]["torch"]
    # without held-out images nothing can choose the threshold: the default, and the file says so
    assert meta["operating_threshold"]["score_threshold"] == D.SCORE_THRESHOLD
    assert meta["operating_threshold"]["chosen_on"] is None
    assert "quantification" not in meta  # and no validation rates: the adjusted estimators fall back, said so
    with open(out / "training_metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and float(rows[0]["train_loss"]) > 0
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "model_run.json").is_file()

    # Rerunning a finished run trains nothing more and rewrites the same model.
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "epoch 1/1" not in again.stderr
    reloaded, _ = load_model_file(out / "model.pt")
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.training
def test_train_cli_replays_a_budget_plan_and_records_it(tiny_dir, tmp_path, root):
    out = tmp_path / "run"
    command = [sys.executable, str(root / "bin" / "train.py"), "--images", str(tiny_dir / "images"),
               "--annotations", str(tiny_dir / "annotations"), "--epochs", "9", "--image-size", "96",
               "--batch-size", "2", "--workers", "0", "--checkpoint", str(out / "checkpoint.pt"),
               "--output", str(out / "model.pt"), "--no-progress", "--device", "cpu"]
    bad = subprocess.run(command + ["--budget-plan", "4"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--budget-plan: expected FIRST,FINAL" in bad.stderr.splitlines()[-1]
    result = subprocess.run(command + ["--budget-plan", "none,4"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "time budget plan: --budget-plan none,4 replays it" in result.stderr
    _, meta = load_model_file(out / "model.pt")
    assert meta["training"]["budget_plan"] == [None, 4] and meta["training"]["max_steps"] == 4
    assert meta["epochs_completed"] == 2  # 3 steps, then 1: the recorded plan, not --epochs 9


@pytest.mark.training
def test_training_with_held_out_validation_images_chooses_and_stores_the_operating_threshold(tiny_dir, tmp_path,
                                                                                              root):
    out = tmp_path / "run"
    command = [sys.executable, str(root / "bin" / "train.py"), "--images", str(tiny_dir / "images"),
               "--annotations", str(tiny_dir / "annotations"), "--val-images", str(tiny_dir / "images"),
               "--val-annotations", str(tiny_dir / "annotations"), "--epochs", "1", "--image-size", "128",
               "--batch-size", "2", "--workers", "0", "--checkpoint", str(out / "checkpoint.pt"),
               "--output", str(out / "model.pt"), "--seed", "1", "--no-progress", "--device", "cpu", "--keep", "best"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Choosing the operating threshold on the validation images" in result.stderr
    model, meta = load_model_file(out / "model.pt")
    # the working size: tried at 1x-2x the training size on the validation images, the chosen one stored
    size = meta["inference_size"]
    assert size["chosen_on"] == "validation" and size["images"] == 6
    assert [row["image_size"] for row in size["candidates"]] == [128, 160, 192, 224, 256]
    best = max(row["fitness"] for row in size["candidates"])
    within = [row["image_size"] for row in size["candidates"] if row["fitness"] >= best - D.INFERENCE_SIZE_TOLERANCE]
    assert size["image_size"] == min(within)
    assert model.transform.max_size == 128  # the file rebuilds at the training size; the jobs set the chosen one
    _, loaded, _, _ = load_trained_model(out / "model.pt", torch.device("cpu"))
    assert (loaded["working_size"], loaded["working_size_source"]) == (size["image_size"],
                                                                       "the model's, chosen on its validation images")
    _, given, _, _ = load_trained_model(out / "model.pt", torch.device("cpu"), working_size=96)
    assert (given["working_size"], given["working_size_source"]) == (96, "--image-size")
    # flip TTA: tried at the chosen size, kept only when it beats the plain pass by more than the tolerance;
    # the threshold and the estimators' rates are measured the way the model will run
    plain, flip = size["tta_fitness"]["plain"], size["tta_fitness"]["flip"]
    assert size["tta"] == (flip > plain + D.INFERENCE_SIZE_TOLERANCE)
    assert meta["quantification"]["tta"] == size["tta"] and loaded["tta"] == size["tta"]
    assert meta["quantification"]["working_size"] == size["image_size"]
    assert "flip TTA" in result.stderr
    assert meta["val_mode"] == "monitor" and meta["num_val_images"] == 6  # held out, not trained on
    assert (meta["kept_weights"]["rule"], meta["kept_weights"]["epoch"]) == ("best", 1)  # one epoch: the best
    assert "weights of epoch 1 kept (best)" in result.stdout
    chosen = meta["operating_threshold"]
    assert chosen["chosen_on"] == "validation" and chosen["images"] == 6
    assert chosen["score_threshold"] in [row["score_threshold"] for row in chosen["candidates"]]
    best_f1 = max(row["f1"] for row in chosen["candidates"])
    assert chosen["f1"] >= best_f1 - 0.01
    # the adjusted compliance estimators' rates: per validation image, at the chosen threshold
    record = meta["quantification"]
    assert record["chosen_on"] == "validation" and record["score_threshold"] == chosen["score_threshold"]
    assert len(record["images"]) == 6
    for image in record["images"]:
        assert len(image["truth"]) == 3 and len(image["confusion"]) == 4 and len(image["soft"]) == 4
        assert [sum(row) for row in image["confusion"][:3]] == image["truth"]  # each face once: found or missed


@pytest.mark.training
def test_resume_continues_at_next_epoch_with_same_state(tiny_dir, tmp_path):
    pairs = tiny_pairs(tiny_dir)
    device = torch.device("cpu")
    params = TrainParams(**TINY, freeze_backbone_epochs=1)
    checkpoint = tmp_path / "checkpoint.pt"

    first = Trainer(params, pairs, device, progress=False)
    row = first.run_epoch()
    assert row.backbone_frozen
    first.checkpoint(checkpoint, {"test": True})
    optimizer_after_1 = copy.deepcopy(first.optimizer.state_dict())  # state_dict() shares the tensors
    lr_after_1 = first.optimizer.param_groups[0]["lr"]
    row_a = first.run_epoch()  # the uninterrupted run goes on

    # A new process would start here: build afresh, resume from the file.
    resumed = Trainer(params, pairs, device, progress=False)
    assert resumed.resume(checkpoint) == 1
    assert torch.equal(torch.get_rng_state(), torch.load(checkpoint, weights_only=True)["rng"]["torch"])
    assert resumed.scheduler.state_dict()["last_epoch"] == 3  # 3 iterations of epoch 1
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(lr_after_1)
    state_a, state_b = optimizer_after_1["state"], resumed.optimizer.state_dict()["state"]
    assert state_a.keys() == state_b.keys() and state_a
    for key in state_a:
        assert torch.equal(state_a[key]["momentum_buffer"], state_b[key]["momentum_buffer"])

    # The resumed run's epoch 2 (backbone unfrozen) ends where the uninterrupted one did.
    row_b = resumed.run_epoch()
    assert row_a.epoch == row_b.epoch == 2 and not row_b.backbone_frozen
    assert row_b.train_loss == pytest.approx(row_a.train_loss, rel=1e-4)
    for (name, a), b in zip(first.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name
    assert [r["epoch"] for r in resumed.history] == [1, 2]


@pytest.mark.training
def test_a_resume_with_auto_workers_keeps_the_count_the_run_started_with(tiny_dir, tmp_path, monkeypatch):
    """--workers -1 resolves per machine; each loader worker draws the flips of its own images, so a pool's retry
    on a node where -1 gave another count trained on other draws than the run never stopped."""
    import utils.detection.training as training

    pairs = tiny_pairs(tiny_dir)
    device = torch.device("cpu")
    params = TrainParams(**{**TINY, "workers": -1, "hflip": 0.5})
    monkeypatch.setattr(training, "auto_workers", lambda device: 2)  # the first node
    first = Trainer(params, pairs, device, progress=False)
    first.run_epoch(validate_loss=False)
    first.checkpoint(tmp_path / "checkpoint.pt", {})
    first.run_epoch(validate_loss=False)  # the run never stopped
    monkeypatch.setattr(training, "auto_workers", lambda device: 0)  # the retry's node
    resumed = Trainer(params, pairs, device, progress=False)
    resumed.resume(tmp_path / "checkpoint.pt")
    assert resumed.train_loader.num_workers == 2
    resumed.run_epoch(validate_loss=False)
    for (name, a), b in zip(first.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name
    # a count asked for is kept as asked (the checkpoint's check refuses another one)
    fixed = Trainer(TrainParams(**{**TINY, "workers": 0}), pairs, device, progress=False)
    fixed.checkpoint(tmp_path / "fixed.pt", {})
    again = Trainer(TrainParams(**{**TINY, "workers": 0}), pairs, device, progress=False)
    again.resume(tmp_path / "fixed.pt")
    assert again.train_loader.num_workers == 0


@pytest.mark.training
def test_checkpoint_of_another_backbone_is_refused(tiny_dir, tmp_path):
    pairs = tiny_pairs(tiny_dir)
    trainer = Trainer(TrainParams(**{**TINY, "epochs": 1}), pairs, torch.device("cpu"), progress=False)
    trainer.checkpoint(tmp_path / "c.pt", {})
    other = Trainer(TrainParams(**{**TINY, "epochs": 1, "image_size": 160}), pairs, torch.device("cpu"),
                    progress=False)
    with pytest.raises(ValueError, match="image_size"):
        other.resume(tmp_path / "c.pt")


@pytest.mark.training
def test_checkpoint_of_other_data_or_another_learning_rate_is_refused(tiny_dir, tmp_path):
    # A finished checkpoint resumed on other data, or with another learning rate, would hand back the old
    # model as if it had been trained on this run's data and settings.
    pairs = tiny_pairs(tiny_dir)
    trainer = Trainer(TrainParams(**{**TINY, "epochs": 1}), pairs, torch.device("cpu"), progress=False)
    trainer.checkpoint(tmp_path / "c.pt", {"inputs_sha256": "a" * 64})
    again = Trainer(TrainParams(**{**TINY, "epochs": 1}), pairs, torch.device("cpu"), progress=False)
    with pytest.raises(ValueError, match="written for other training data"):
        again.resume(tmp_path / "c.pt", inputs_sha256="b" * 64)
    assert again.resume(tmp_path / "c.pt", inputs_sha256="a" * 64) == 0  # the same data: resumed
    faster = Trainer(TrainParams(**{**TINY, "epochs": 1, "lr": TrainParams().lr * 2}), pairs,
                     torch.device("cpu"), progress=False)
    with pytest.raises(ValueError, match="written with lr="):
        faster.resume(tmp_path / "c.pt")
    longer = Trainer(TrainParams(**{**TINY, "epochs": 3}), pairs, torch.device("cpu"), progress=False)
    with pytest.raises(ValueError, match=r"written for 1 epochs \(0 done\), this run asks for 3"):
        longer.resume(tmp_path / "c.pt")
    with pytest.raises(ValueError, match="written with val_mode='monitor', this run has 'merge'"):
        trainer.checkpoint(tmp_path / "v.pt", {"val_mode": "monitor"})
        again.resume(tmp_path / "v.pt", run_args={"val_mode": "merge"})


@pytest.mark.training
def test_checkpoint_of_other_pretrained_weights_or_another_label_map_is_refused(tiny_dir, tmp_path):
    # Resumed with another --weights, the model file said it started from weights it never saw; with another
    # --label-map, the same files' faces became other classes half way through, and nothing said so.
    from utils.classes import LabelMap

    pairs = tiny_pairs(tiny_dir)
    cpu = torch.device("cpu")
    scratch = Trainer(TrainParams(**{**TINY, "epochs": 1, "weights": "none"}), pairs, cpu, progress=False,
                      label_map=LabelMap.parse("mask=with_mask"))
    scratch.checkpoint(tmp_path / "c.pt", {})
    pretrained = Trainer(TrainParams(**{**TINY, "epochs": 1, "weights": "widerface"}), pairs, cpu, progress=False,
                         label_map=LabelMap.parse("mask=with_mask"))
    with pytest.raises(ValueError, match="written with weights='none', this run has 'widerface'"):
        pretrained.resume(tmp_path / "c.pt")
    remapped = Trainer(TrainParams(**{**TINY, "epochs": 1, "weights": "none"}), pairs, cpu, progress=False,
                       label_map=LabelMap.parse("mask=without_mask"))
    with pytest.raises(ValueError, match=r"written with label_map=\{'mask': 'with_mask'\}, this run has "
                                         r"\{'mask': 'without_mask'\}"):
        remapped.resume(tmp_path / "c.pt")
    same = Trainer(TrainParams(**{**TINY, "epochs": 1, "weights": "none"}), pairs, cpu, progress=False,
                   label_map=LabelMap.parse("mask=with_mask"))
    assert same.resume(tmp_path / "c.pt") == 0


@pytest.mark.training
def test_checkpoint_of_another_loader_worker_count_is_refused(tiny_dir, tmp_path):
    # The loader's worker processes draw the augmentation (flips, sizes) from seeds of their own: a run resumed
    # with another --workers trained weights that neither count gives. Compared as asked: -1 (a few on a GPU)
    # means another count on a pool node with other cores, and a retry there must resume.
    pairs = tiny_pairs(tiny_dir)
    cpu = torch.device("cpu")
    Trainer(TrainParams(**{**TINY, "epochs": 1, "workers": 0}), pairs, cpu, progress=False).checkpoint(
        tmp_path / "c.pt", {})
    with pytest.raises(ValueError, match="written with workers=0, this run has 2"):
        Trainer(TrainParams(**{**TINY, "epochs": 1, "workers": 2}), pairs, cpu, progress=False).resume(
            tmp_path / "c.pt")
    assert Trainer(TrainParams(**{**TINY, "epochs": 1, "workers": 0}), pairs, cpu, progress=False).resume(
        tmp_path / "c.pt") == 0


class NaNDetector(torch.nn.Module):
    """Returns a NaN loss on the second batch, like a diverging detector."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.calls = 0

    def forward(self, images, targets=None):
        self.calls += 1
        value = self.weight * (float("nan") if self.calls == 2 else 1.0)
        return {"loss_classifier": value, "loss_box_reg": self.weight * 0.5}


def test_non_finite_loss_is_a_clear_error(tiny_dir):
    loader = make_loader(tiny_pairs(tiny_dir), batch_size=2, workers=0, shuffle=False)
    model = NaNDetector()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteLossError, match=r"epoch 4, iteration 2 .*loss_classifier=nan.*--lr"):
        train_one_epoch(model, optimizer, loader, torch.device("cpu"), epoch=3, progress=False)


@pytest.mark.slow
def test_evaluate_loss_changes_nothing(tiny_dir):
    params = TrainParams(**{**TINY, "weights": "none"})  # plain BatchNorm: the case where train mode would update
    trainer = Trainer(params, tiny_pairs(tiny_dir), torch.device("cpu"), progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    rng = torch.get_rng_state()
    loader = make_loader(tiny_pairs(tiny_dir), batch_size=2, workers=0, shuffle=False)
    first = evaluate_loss(trainer.model, loader, torch.device("cpu"))
    second = evaluate_loss(trainer.model, loader, torch.device("cpu"))
    assert first["loss"] > 0 and first == second  # repeatable
    assert torch.equal(rng, torch.get_rng_state())
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed"


def test_schedule_warms_up_then_decays():
    factors = [lr_factor(i, 100, 10, "cosine") for i in range(100)]
    assert factors[0] < 0.01 and factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    steps = [lr_factor(i, 100, 0, "step") for i in (0, 66, 67, 89)]
    assert steps == pytest.approx([1.0, 1.0, 0.1, 0.01])


def test_training_data_is_hashed_by_the_read_that_checks_it_and_its_run_record_reads_it_no_more(tiny_dir, tmp_path,
                                                                                              monkeypatch):
    # Before its epochs train read each image four times: the full decode that checks it (scan_pairs), a header
    # read (object problems), the data hash and the run record's hash. The hash now comes from the decode's read
    # and serves both, with the values a fresh read gives.
    # The check that an image is not too thin to train on takes the size from that decode too.
    from helpers import count_opens
    from utils.detection.params import TrainParams
    from utils.detection.training_run import open_training_data
    from utils.provenance import inputs_sha256, sets_sha256, write_run_record

    args = argparse.Namespace(images=tiny_dir / "images", annotations=tiny_dir / "annotations", val_images=None,
                              val_annotations=None, val_mode="holdout", label_map=None)
    settings = argparse.Namespace(params=TrainParams(image_size=64, multiscale=0.5), device="cpu")
    images = sorted(str(path) for path in (tiny_dir / "images").glob("*.jpg"))
    with monkeypatch.context() as patch:
        opens = count_opens(patch, tiny_dir)
        with open_training_data(args, settings) as data:
            assert {image: opens.get(image, 0) for image in images} == dict.fromkeys(images, 2)  # decode, header
            opens.clear()
            record = write_run_record(tmp_path / "train_run.json", "train", {}, data.input_files, data.files_sha256)
    assert not opens
    assert data.inputs_sha256 == sets_sha256(data.input_files, [])
    assert record["inputs_sha256"] == inputs_sha256(data.input_files)


def test_params_file_then_flags_override(tmp_path):
    path = tmp_path / "best_hpo_params.json"
    path.write_text('{"params": {"lr": 0.003, "momentum": 0.85, "trainable_layers": 4, "unknown": 1}}')
    values = read_params_file(path)
    assert values == {"lr": 0.003, "momentum": 0.85, "trainable_layers": 4}
    flags = {"lr": 0.05, "momentum": None, "trainable_layers": None, "images": "not a hyperparameter"}
    params = resolve_params(flags, values)
    assert (params.lr, params.momentum, params.trainable_layers) == (0.05, 0.85, 4)
    assert params.weight_decay == TrainParams().weight_decay


@pytest.mark.training
def test_keep_best_loads_the_epoch_of_the_highest_validation_fitness_and_a_resume_keeps_it(tiny_dir, tmp_path):
    pairs = tiny_pairs(tiny_dir)
    device = torch.device("cpu")
    params = TrainParams(**{**TINY, "epochs": 4, "lr": 0.05})
    checkpoint = tmp_path / "checkpoint.pt"
    trainer = Trainer(params, pairs, device, val_pairs=pairs, progress=False, keep="best")
    snapshots, fitnesses = [], []
    while not trainer.finished:
        row = trainer.run_epoch(validate_map=True)
        snapshots.append(copy.deepcopy(trainer.eval_model.state_dict()))
        fitnesses.append(row.val_fitness)
        if row.epoch == 2:
            trainer.checkpoint(checkpoint, {"test": True})
    assert all(value is not None for value in fitnesses)
    best_epoch = fitnesses.index(max(fitnesses)) + 1  # the first of equals: a later tie is no improvement
    assert [row["val_fitness"] for row in trainer.history] == fitnesses

    kept = trainer.load_kept_weights()
    assert (kept["rule"], kept["epoch"], kept["last_epoch"]) == ("best", best_epoch, 4)
    assert kept["val_fitness"] == max(fitnesses) and kept["last_val_fitness"] == fitnesses[-1]
    for name, value in trainer.eval_model.state_dict().items():
        assert torch.equal(value, snapshots[best_epoch - 1][name]), name
    assert trainer.record().kept == kept
    # whichever epoch the numbers made best here, an earlier best's weights replace the last ones
    trainer.best = {"epoch": 1, "fitness": float("inf"), "model": snapshots[0]}
    assert trainer.load_kept_weights()["epoch"] == 1
    for name, value in trainer.eval_model.state_dict().items():
        assert torch.equal(value, snapshots[0][name]), name

    # the checkpoint carries the best so far: a resumed run keeps choosing among every epoch
    resumed = Trainer(params, pairs, device, val_pairs=pairs, progress=False, keep="best")
    assert resumed.resume(checkpoint) == 2
    best_of_two = fitnesses[:2].index(max(fitnesses[:2])) + 1
    assert resumed.best["epoch"] == best_of_two
    for name, value in resumed.best["model"].items():
        assert torch.equal(value, snapshots[best_of_two - 1][name]), name


@pytest.mark.training
def test_keep_best_without_validation_keeps_the_last_epoch_and_says_why(tiny_dir):
    trainer = Trainer(TrainParams(**{**TINY, "epochs": 1}), tiny_pairs(tiny_dir), torch.device("cpu"),
                      progress=False, keep="best")
    trainer.run_epoch()
    before = copy.deepcopy(trainer.eval_model.state_dict())
    kept = trainer.load_kept_weights()
    assert (kept["rule"], kept["epoch"]) == ("last", 1) and "no validation fitness" in kept["note"]
    for name, value in trainer.eval_model.state_dict().items():
        assert torch.equal(value, before[name]), name
    with pytest.raises(ValueError, match="keep must be"):
        Trainer(TrainParams(**TINY), tiny_pairs(tiny_dir), torch.device("cpu"), progress=False, keep="first")


def test_train_steps_closed_early_draws_the_next_batch_as_the_loop_always_did():
    """A cut epoch's loop drew the batch after its last step before it learnt the epoch had ended: the draw (and
    the augmentation's global RNG draws with it) is kept, so that recorded --budget-plan runs replay."""
    from utils.data.dataset import collate
    from utils.detection.engine import train_steps

    drawn = []

    class Counting(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, index):
            drawn.append(index)
            return torch.zeros(3, 4, 4), {"boxes": torch.zeros(0, 4)}

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(1))

        def forward(self, images, targets):
            return {"loss_classifier": self.weight.sum() * len(images)}

    model = Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(Counting(), batch_size=2, collate_fn=collate)
    steps = train_steps(model, optimizer, loader, torch.device("cpu"), epoch=0, clip_grad=None, progress=False)
    for iteration, (_, running) in enumerate(steps):
        totals = running
        if iteration + 1 >= 2:
            break
    steps.close()
    assert len(drawn) == 6  # two batches trained, the third drawn and dropped
    assert (totals["steps"], totals["images"]) == (2, 4) and totals["seconds"] >= 0 and "images_per_s" in totals
    drawn.clear()
    assert train_one_epoch(model, optimizer, loader, torch.device("cpu"), epoch=1, clip_grad=None,
                           progress=False)["steps"] == 5
    assert len(drawn) == 10  # a whole pass draws nothing more


@pytest.mark.training
def test_keep_best_resumed_from_a_keep_last_checkpoint_says_which_epochs_it_chose_among(tiny_dir, tmp_path):
    pairs = tiny_pairs(tiny_dir)
    params = TrainParams(**{**TINY, "epochs": 2})
    checkpoint = tmp_path / "checkpoint.pt"
    first = Trainer(params, pairs, torch.device("cpu"), val_pairs=pairs, progress=False)  # keep="last"
    first.run_epoch(validate_map=True)
    first.checkpoint(checkpoint, {"test": True})
    done = Trainer(params, pairs, torch.device("cpu"), val_pairs=pairs, progress=False, keep="best")
    done.resume(checkpoint)
    kept = done.kept_weights()  # nothing trained since: the last epoch, and why
    assert (kept["rule"], kept["epoch"]) == ("last", 1)
    assert "resumed from a checkpoint that holds no best epoch" in kept["note"]
    done.run_epoch(validate_map=True)
    kept = done.kept_weights()
    assert (kept["rule"], kept["epoch"], kept["chosen_from_epoch"]) == ("best", 2, 2)


def test_the_same_weights_make_the_same_model_file_bytes(tmp_path):
    # A rerun that trains nothing new (or a resumed run ending where an uninterrupted one did) must give the
    # same sha256: the file was named inside by its random temporary name.
    from utils.detection.model import build_model, save_model_file

    torch.manual_seed(0)
    model = build_model(backbone="mobilenet_v2_fpn", weights="none", image_size=128)
    meta = {"created": "fixed"}
    first, second = save_model_file(tmp_path / "a.pt", model, meta), save_model_file(tmp_path / "b.pt", model, meta)
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize("case", ["tensor", "args_text", "epoch_text", "stand_in", "weights_only_refuses"])
def test_a_checkpoint_that_is_not_trains_dict_is_one_line_naming_it(tmp_path, case):
    # A tensor, or a checkpoint whose args were text, ended in a traceback ('Tensor.__contains__ only supports
    # Tensor', "'str' object has no attribute 'get'"); a stand-in's line was torch's paragraph on weights_only.
    from utils.detection.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    path = tmp_path / "checkpoint.pt"
    model = torch.nn.Linear(2, 1)
    save_checkpoint(path, model, torch.optim.SGD(model.parameters(), lr=0.1), None, 1, {"val_mode": "monitor"})
    payload = torch.load(path, weights_only=True)
    if case == "tensor":
        torch.save(torch.zeros(3), path)
    elif case == "args_text":
        torch.save({**payload, "args": "x"}, path)
    elif case == "epoch_text":
        torch.save({**payload, "epoch": "3"}, path)
    elif case == "stand_in":
        path.write_text('{"stand_in_for": "checkpoint.pt", "job": "train"}\n')
    else:
        torch.save({**payload, "extra": {"args": argparse.Namespace(x=1)}}, path)  # weights_only refuses it
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and len(message) < 400, message
    assert "weights_only` set to `False`" not in message and "delete it" in message


def test_a_model_file_written_while_the_disk_fills_names_it_and_keeps_the_old_one(tmp_path, monkeypatch):
    # The line was 'train: error: [Errno 28] No space left on device': no file named.
    import errno

    from utils.cli import error_message
    from utils.detection.model_file import save_model_file

    model = torch.nn.Linear(2, 1)
    model.architecture = {}
    path = tmp_path / "model.pt"
    path.write_bytes(b"the last run's model")
    # an OSError, and what torch really raises on a full disk (a 256 kB tmpfs): a RuntimeError, which was a
    # traceback and exit 1
    for failure, said in ((OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
                          (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
                           "the write failed: a full disk?")):
        def full_disk(obj, handle, *args, failure=failure, **kwargs):
            handle.write(b"PK\x03\x04 half a model")
            raise failure

        with monkeypatch.context() as patch, pytest.raises(OSError) as raised:
            patch.setattr(torch, "save", full_disk)
            save_model_file(path, model, {})
        assert error_message(raised.value) == (f"{path}: cannot write model.pt ({said}); the file there, if any, "
                                               "is as it was")
        assert raised.value.errno == (errno.ENOSPC if isinstance(failure, OSError) else errno.EIO)
        assert path.read_bytes() == b"the last run's model" and [p.name for p in tmp_path.iterdir()] == ["model.pt"]

@pytest.mark.parametrize(("script", "flags", "said"), [
    ("train", ["--output", "{d}/checkpoint.pt"], "{d}/checkpoint.pt: given as --output and as --checkpoint"),
    ("train", ["--metrics-csv", "{d}/model.pt"], "{d}/model.pt: given as --output and as --metrics-csv"),
    ("hpo", ["--output", "{d}/hpo.journal"], "{d}/hpo.journal: given as --output and as --checkpoint"),
])
def test_two_outputs_named_alike_are_refused_before_anything_is_written(root, tmp_path, capsys, script, flags, said):
    # --output naming the checkpoint trained, then wrote the model file over the checkpoint: the rerun said
    # 'checkpoint lacks optimizer, ...' (hpo: the journal became best.json, 'not a readable Optuna journal').
    from helpers import run_script

    data = tmp_path / "nowhere"  # never read: the outputs are checked first
    common = {"train": ["--images", data, "--annotations", data, "--checkpoint", tmp_path / "checkpoint.pt",
                        "--output", tmp_path / "model.pt"],
              "hpo": ["--train-images", data, "--train-annotations", data, "--val-images", data,
                      "--val-annotations", data, "--checkpoint", tmp_path / "hpo.journal", "--device", "cpu"]}
    argv = [*common[script], *(flag.format(d=tmp_path) for flag in flags)]
    assert run_script(root, script, argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"{script}: error: {said.format(d=tmp_path)}; each " \
                                                              "output needs a file of its own"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.training
def test_validation_images_without_a_labelled_face_keep_the_default_threshold(tiny_dir, tmp_path, root):
    # F1 was 0 and the compliance error undefined at every threshold, so the lowest, 0.05, was stored as chosen
    # on validation, and predict and evaluate counted every faint box as a face.
    import re
    import shutil

    from helpers import run_script

    val = tmp_path / "val"
    shutil.copytree(tiny_dir, val)
    for xml in (val / "annotations").glob("*.xml"):
        xml.write_text(re.sub(r"<object>.*?</object>", "", xml.read_text(), flags=re.S))
    out = tmp_path / "run"
    argv = ["--images", tiny_dir / "images", "--annotations", tiny_dir / "annotations", "--val-images",
            val / "images", "--val-annotations", val / "annotations", "--epochs", "1", "--image-size", "96",
            "--batch-size", "2", "--workers", "0", "--weights", "none", "--keep", "best", "--checkpoint",
            out / "checkpoint.pt", "--output", out / "model.pt", "--no-progress", "--device", "cpu"]
    assert run_script(root, "train", argv) == 0
    meta = load_model_file(out / "model.pt")[1]
    assert meta["operating_threshold"] == {"score_threshold": D.SCORE_THRESHOLD, "chosen_on": None,
                                           "criterion": "the default: the validation images hold no labelled face"}
    assert "quantification" not in meta
    assert meta["kept_weights"]["note"].startswith("no validation fitness was measured (the validation images "
                                                   "hold no labelled face)")


def test_a_sigterm_while_the_working_size_tta_and_threshold_are_chosen_stops_at_the_next_validation_batch(
        tiny_dir, monkeypatch):
    # After the last epoch, bin/train.py runs about 20 inference passes over the validation images (a pass per
    # candidate working size, then a flip TTA pass at up to 4 times the cost) before the model file exists. A
    # SIGTERM there was only recorded: every pass still ran, so a pool's kill after its grace period found the job
    # with no stand-ins (HTCondor holds it) and the retry made every pass again anyway.
    import signal

    import utils.detection.engine as engine
    from utils.detection.training_run import choose_on_validation
    from utils.stop import StopRequested, stop_on_sigterm

    pairs = tiny_pairs(tiny_dir)
    trainer = Trainer(TrainParams(**{**TINY, "weights": "none", "image_size": 64, "batch_size": 3}), pairs,
                      torch.device("cpu"), val_pairs=pairs[:3], progress=False)
    trainer.completed_epochs = 2  # as after training
    batches, detect = [], engine.detect

    def detect_then_sigterm(model, images, tta=False):
        batches.append(len(images))
        if len(batches) == 1:
            signal.raise_signal(signal.SIGTERM)  # arrives during the first candidate size's pass
        return detect(model, images, tta=tta)

    monkeypatch.setattr(engine, "detect", detect_then_sigterm)
    stop_on_sigterm()  # conftest puts the handler back and clears the request
    with pytest.raises(StopRequested, match="working size, flip TTA and score threshold abandoned; the checkpoint "
                                            "holds all 2 epochs"):
        choose_on_validation(trainer, has_val=True)
    assert batches == [3]  # the rest of the pass and the other sizes' passes were not run


def test_an_image_too_thin_to_train_at_is_a_listed_skip_not_a_crash(tmp_path, root):
    # A 200x2 px image at a 64 px training size shrinks to 0.64 px, floored to no pixel row: torchvision refused
    # the whole batch (RuntimeError 'Input and output sizes should be greater than 0'), a traceback (exit 1) at
    # whichever step drew it (with --multiscale, only when a small size was drawn). Inference already gave such an
    # image no detections (inference.too_thin); training and its validation now skip it, listed as skipped.
    import shutil

    from PIL import Image

    from helpers import run_script
    from utils.data.sample_data import make_sample_dataset
    from utils.data.voc import VocAnnotation, write_voc

    data = tmp_path / "data"
    make_sample_dataset(data, num_images=2, seed=11, image_size=(64, 64))
    Image.new("RGB", (200, 2), (120, 90, 60)).save(data / "images" / "banner.png")
    write_voc(data / "annotations" / "banner.xml", VocAnnotation(filename="banner.png", width=200, height=2))
    val = tmp_path / "val"
    shutil.copytree(data, val)
    out = tmp_path / "run"
    argv = ["--images", data / "images", "--annotations", data / "annotations", "--val-images", val / "images",
            "--val-annotations", val / "annotations", "--val-mode", "merge", "--max-steps", "1",
            "--image-size", "64", "--multiscale", "0", "--batch-size", "6", "--workers", "0", "--weights", "none",
            "--checkpoint", out / "checkpoint.pt", "--output", out / "model.pt", "--no-progress", "--device", "cpu"]
    assert run_script(root, "train", argv) == 0
    meta = load_model_file(out / "model.pt")[1]
    assert (meta["num_train_images"], meta["skipped_inputs"]) == (4, 2)  # --val-mode merge: val is trained on
    skipped = json.loads((out / "model_run.json").read_text())["params"]["skipped"]
    assert [item["file"] for item in skipped] == [str(data / "images" / "banner.png"),
                                                  str(val / "images" / "banner.png")]
    assert skipped[0]["problem"] == ("200x2 px is too thin to train on: at the smallest training size (64 px) the "
                                     "shorter side would shrink to 0.64 px")


def test_the_model_file_records_the_loader_worker_count_the_run_trained_with(tiny_dir, tmp_path, root):
    # --workers -1 (the default) resolves per machine (none on a CPU, up to 4 on a GPU by the CPUs there), and each
    # worker process draws its own images' flips and colours: the model file recorded only the -1, so the same
    # flags on another machine trained other weights with nothing recorded to tell which count made these.
    from helpers import run_script

    out = tmp_path / "run"
    argv = ["--images", tiny_dir / "images", "--annotations", tiny_dir / "annotations", "--max-steps", "1",
            "--image-size", "64", "--batch-size", "2", "--workers", "-1", "--weights", "none", "--checkpoint",
            out / "checkpoint.pt", "--output", out / "model.pt", "--no-progress", "--device", "cpu"]
    assert run_script(root, "train", argv) == 0
    meta = load_model_file(out / "model.pt")[1]
    assert meta["training"]["workers"] == -1 and meta["loader_workers"] == 0  # as asked, as resolved on a CPU
