"""Every job that skips inputs names the first SKIPPED_PRINTED of them on the terminal, then one line counting the
rest and naming the output that lists every one; a job that fails for want of data, and so writes no such output,
names them all. preprocess, augment, predict, merge_predictions: tests/test_collection_scale.py and their own tests;
here train, hpo, plot_class_distribution and evaluate, which printed a line for each one."""

from __future__ import annotations

import argparse
import logging
import shutil

import pytest

from helpers import make_train_val, run_script
from utils.cli import SKIPPED_PRINTED

BROKEN = SKIPPED_PRINTED + 3


def add_broken_pairs(images, annotations, count: int = BROKEN) -> None:
    """*count* image/annotation pairs whose image is not a picture, beside the folder's good ones."""
    for k in range(count):
        (images / f"broken{k:02d}.jpg").write_bytes(b"not a jpeg")
        shutil.copy(next(annotations.glob("*.xml")), annotations / f"broken{k:02d}.xml")


def said(capsys, caplog, start: str) -> list[str]:
    """The lines starting with *start* on stderr or in the log (where the jobs logged each skipped input)."""
    lines = capsys.readouterr().err.splitlines() + caplog.messages
    caplog.clear()
    return [line for line in lines if line.startswith(start)]


def test_train_names_the_first_skipped_inputs_and_counts_the_rest(tmp_path, capsys, caplog):
    from utils.detection.params import TrainParams
    from utils.detection.training_run import TrainingDataError, open_training_data

    data = make_train_val(tmp_path / "data", num_train=2, num_val=1)
    images, annotations = data / "train" / "images", data / "train" / "annotations"
    add_broken_pairs(images, annotations)
    args = argparse.Namespace(images=images, annotations=annotations, val_images=None, val_annotations=None,
                              val_mode="holdout", label_map=None)
    settings = argparse.Namespace(params=TrainParams(image_size=64, multiscale=0.5), device="cpu")
    caplog.set_level(logging.INFO)
    record = tmp_path / "model_run.json"
    with open_training_data(args, settings, listed_in=record) as data_opened:
        assert len(data_opened.skipped) == BROKEN and len(data_opened.train_pairs) == 2
    lines = said(capsys, caplog, "skipped ")
    assert len(lines) == SKIPPED_PRINTED + 1, lines
    assert lines[-1] == f"skipped 3 more files (all {BROKEN} with their reasons in {record})"
    # nothing usable: the job fails and writes no record, so every skipped input is named
    for good in [*images.glob("sample_*"), *annotations.glob("sample_*")]:
        good.unlink()
    with pytest.raises(TrainingDataError), open_training_data(args, settings, listed_in=record):
        pass
    assert len(said(capsys, caplog, f"skipped {images / 'broken'}")) == BROKEN


def test_hpo_names_the_first_skipped_inputs_and_counts_the_rest(tmp_path, capsys, caplog):
    import torch

    from utils.detection.hpo import HpoConfig, SearchSpace, run_study
    from utils.detection.hpo_study import open_study, worker_seed

    config, space = HpoConfig(epochs=1, image_size=96, workers=0, warmup_iters=1, seed=5), SearchSpace(batch_sizes=(2,))
    data = make_train_val(tmp_path / "data", num_train=2, num_val=1)
    add_broken_pairs(data / "train" / "images", data / "train" / "annotations")
    journal, best = tmp_path / "hpo.journal", tmp_path / "best.json"
    study, _ = open_study(journal, "s", seed=worker_seed(config.seed, 0))
    study.optimize(lambda trial: space.sample(trial)["momentum"], n_trials=1)  # the study is done: nothing trains
    caplog.set_level(logging.INFO)
    train, val = data / "train", data / "val"
    result = run_study(config, space, train / "images", train / "annotations", val / "images", val / "annotations",
                       journal=journal, n_trials=1, device=torch.device("cpu"), study_name="s", skipped_listed_in=best)
    assert len(result["skipped_inputs"]) == BROKEN  # best.json's list
    lines = said(capsys, caplog, "skipped ")
    assert len(lines) == SKIPPED_PRINTED + 1, lines
    assert lines[-1] == f"skipped 3 more files (all {BROKEN} with their reasons in {best})"


def test_plot_class_distribution_names_the_first_unreadable_annotations_and_counts_the_rest(root, tmp_path, capsys):
    from utils.data.pairs import write_pairs_csv
    from utils.data.sample_data import make_sample_dataset

    make_sample_dataset(tmp_path, num_images=1, seed=1, image_size=(64, 64))
    rows = [{"image": "images/sample_0000.jpg", "annotation": "annotations/sample_0000.xml", "split": "train"}]
    for k in range(BROKEN):
        (tmp_path / "annotations" / f"broken{k:02d}.xml").write_text("<annotation>")
        rows.append({"image": f"images/broken{k:02d}.jpg", "annotation": f"annotations/broken{k:02d}.xml",
                     "split": "train"})
    split_csv = write_pairs_csv(tmp_path / "split.csv", rows, fields=("image", "annotation", "split"))
    out = tmp_path / "out"
    assert run_script(root, "plot_class_distribution", ["--split-csv", split_csv, "--output", out / "dist.png",
                                                        "--output-csv", out / "dist.csv"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("plot_class_distribution: ")]
    assert len(lines) == SKIPPED_PRINTED + 1, lines
    assert lines[-1] == (f"plot_class_distribution: warning: 3 more files (all {BROKEN} with their reasons in "
                         f"{out / 'dist_run.json'})")


def test_evaluate_prints_the_first_skipped_files_and_its_text_file_lists_them_all(root, sample_dir, tiny_model_file,
                                                                                  tmp_path, capsys):
    folder = tmp_path / "set"
    folder.mkdir()
    for path in sorted((sample_dir / "images").iterdir())[:2]:
        shutil.copy(path, folder / path.name)
        shutil.copy(sample_dir / "annotations" / f"{path.stem}.xml", folder / f"{path.stem}.xml")
    add_broken_pairs(folder, folder)
    out = tmp_path / "out"
    assert run_script(root, "evaluate", ["--images", folder, "--annotations", folder, "--model", tiny_model_file,
                                         "--output-dir", out, "--device", "cpu", "--workers", "0"]) == 0
    printed = capsys.readouterr().out.splitlines()
    listed = printed[printed.index(f"Skipped {BROKEN} files:") + 1:]
    assert [line.startswith(f"  {folder / 'broken'}") for line in listed[:SKIPPED_PRINTED + 1]] == (
        [True] * SKIPPED_PRINTED + [False])
    assert listed[SKIPPED_PRINTED] == f"  and 3 more: all listed in {out / 'evaluation.txt'}"
    assert (out / "evaluation.txt").read_text().count(f"  {folder / 'broken'}") == BROKEN
