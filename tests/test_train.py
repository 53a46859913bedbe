"""Training: one epoch of bin/train.py writes a loadable model file; a non-finite loss stops with a clear error;
the loss on a loader leaves the model untouched; the model file's bytes, its writes and what it records."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import subprocess
import sys

import pytest
import torch

from helpers import TINY, run_script, tiny_pairs
from utils import defaults as D
from utils.detection.engine import NonFiniteLossError, evaluate_loss, train_one_epoch
from utils.detection.optim import lr_factor
from utils.detection.model import load_model_file
from utils.detection.params import TrainParams, read_params_file, resolve_params
from utils.detection.recipe import make_loader
from utils.detection.training import Trainer
from utils.detection.weights import job_weights
from utils.provenance import file_sha256


@pytest.mark.training
def test_train_cli_one_epoch_writes_loadable_outputs(tiny_dir, tmp_path, root, caplog):
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

    # Rerunning a finished run trains nothing more and rewrites the same model; its record says what it resumed
    # from (the record of a resumed run once looked like a fresh one's).
    assert json.loads((out / "model_run.json").read_text())["params"]["resumed_from"] is None
    saved = file_sha256(out / "checkpoint.pt")
    with caplog.at_level(logging.INFO):  # the rerun in-process (as its __main__ runs it): no torch start-up again
        assert run_script(root, "train", command[2:]) == 0
    assert f"resumed from {out / 'checkpoint.pt'} after epoch 1 of 1" in caplog.text  # its log is the one read here
    assert "epoch 1/1" not in caplog.text
    assert json.loads((out / "model_run.json").read_text())["params"]["resumed_from"] == {
        "checkpoint": str(out / "checkpoint.pt"), "sha256": saved, "after_epoch": 1}
    reloaded, _ = load_model_file(out / "model.pt")
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.training
def test_train_cli_replays_a_budget_plan_and_records_it(tiny_dir, tmp_path, root, capsys):
    from helpers import load_script

    out = tmp_path / "run"
    command = [sys.executable, str(root / "bin" / "train.py"), "--images", str(tiny_dir / "images"),
               "--annotations", str(tiny_dir / "annotations"), "--epochs", "9", "--image-size", "96",
               "--batch-size", "2", "--workers", "0", "--checkpoint", str(out / "checkpoint.pt"),
               "--output", str(out / "model.pt"), "--no-progress", "--device", "cpu"]
    with pytest.raises(SystemExit) as bad:  # the flag refused while parsing (in-process: no torch start-up to wait)
        load_script(root, "train").get_args_parser().parse_args(command[2:] + ["--budget-plan", "4"])
    assert bad.value.code == 2 and "--budget-plan: expected FIRST,FINAL" in capsys.readouterr().err.splitlines()[-1]
    result = subprocess.run(command + ["--budget-plan", "none,4"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "time budget plan: --budget-plan none,4 replays it" in result.stderr
    _, meta = load_model_file(out / "model.pt")
    assert meta["training"]["budget_plan"] == [None, 4] and meta["training"]["max_steps"] == 4
    assert meta["epochs_completed"] == 2  # 3 steps, then 1: the recorded plan, not --epochs 9


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


def test_the_same_weights_make_the_same_model_file_bytes(tmp_path):
    # A rerun that trains nothing new (or a resumed run ending where an uninterrupted one did) must give the
    # same sha256: the file was named inside by its random temporary name.
    from utils.detection.model import build_model, save_model_file

    torch.manual_seed(0)
    model = build_model(backbone="mobilenet_v2_fpn", weights="none", image_size=128)
    meta = {"created": "fixed"}
    first, second = save_model_file(tmp_path / "a.pt", model, meta), save_model_file(tmp_path / "b.pt", model, meta)
    assert first.read_bytes() == second.read_bytes()


def test_equal_meta_makes_the_same_model_file_bytes_whether_its_equal_strings_are_one_object_or_two(
        tiny_model_file, tmp_path):
    # pickle writes a string object met again as a reference to the first: train rerun in-process with a test's
    # literals ("none", "cpu": interned, the very objects the code's literals are) wrote other bytes than the same
    # command run as a process, whose command-line strings are objects of their own
    from utils.detection.model import load_model_file, save_model_file

    model, _ = load_model_file(tiny_model_file)
    one = "none"
    two = "".join(["no", "ne"])  # equal to it, another object
    assert two == one and two is not one
    first = save_model_file(tmp_path / "a.pt", model, {"asked": one, "loaded": one})
    second = save_model_file(tmp_path / "b.pt", model, {"asked": two, "loaded": one})
    assert first.read_bytes() == second.read_bytes()


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
    from utils.provenance import inputs_sha256

    data = tmp_path / "data"
    make_sample_dataset(data, num_images=2, seed=11, image_size=(64, 64))
    Image.new("RGB", (200, 2), (120, 90, 60)).save(data / "images" / "banner.png")
    write_voc(data / "annotations" / "banner.xml", VocAnnotation(filename="banner.png", width=200, height=2))
    val = tmp_path / "val"
    shutil.copytree(data, val)
    out = tmp_path / "run"
    params = tmp_path / "best_hpo_params.json"
    params.write_text('{"params": {"momentum": 0.8}}')
    set_aside = tmp_path / "unused.pt"  # --weights none sets --weights-file aside: no input of the model
    set_aside.write_bytes(b"not read")
    argv = ["--images", data / "images", "--annotations", data / "annotations", "--val-images", val / "images",
            "--val-annotations", val / "annotations", "--val-mode", "merge", "--max-steps", "1", "--params", params,
            "--image-size", "64", "--multiscale", "0", "--batch-size", "6", "--workers", "0", "--weights", "none",
            "--weights-file", set_aside, "--checkpoint", out / "checkpoint.pt", "--output", out / "model.pt",
            "--no-progress", "--device", "cpu"]
    assert run_script(root, "train", argv) == 0
    meta = load_model_file(out / "model.pt")[1]
    assert (meta["num_train_images"], meta["skipped_inputs"]) == (4, 2)  # --val-mode merge: val is trained on
    record = json.loads((out / "model_run.json").read_text())
    assert [item["file"] for item in record["params"]["skipped"]] == [str(data / "images" / "banner.png"),
                                                                      str(val / "images" / "banner.png")]
    # the hyperparameters file shapes the model as the images do: its hash is among the record's inputs; the
    # weights file set aside is not (it was, with its flags' names taken for the files the model started from)
    trained = [path for folder in (data, val) for path in sorted(folder.rglob("sample_*"))]
    assert record["inputs_sha256"] == inputs_sha256([*trained, params]) and record["num_inputs"] == 9
    assert record["params"]["skipped"][0]["problem"] == ("200x2 px is too thin to train on: at the smallest "
                                                         "training size (64 px) the shorter side would shrink to "
                                                         "0.64 px")


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
