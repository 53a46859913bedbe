"""Resuming training from its checkpoint: the run goes on with the same state, and a checkpoint of other
settings, data or weights, or one that is not train's, is refused in one line."""

from __future__ import annotations

import argparse
import copy

import pytest
import torch

from helpers import TINY, tiny_pairs
from utils.detection.params import TrainParams
from utils.detection.training import Trainer


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
