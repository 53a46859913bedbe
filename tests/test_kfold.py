"""k-fold cross-validation: fold assignment, make_fold, the box-fusion ensemble and the workflow's fold fan-out
(--folds, --fold-ensemble). aggregate_folds' summary: tests/test_kfold_aggregate.py."""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

import workflow as generator
from helpers import run_script
from utils.classes import LABEL_OF, RARE_CLASS
from utils.data.folds import FoldError, assign_folds, folds_csv_text, read_folds_csv, source_stem
from utils.data.pairs import Pair
from utils.detection.ensemble import BoxFusionEnsemble
from utils.detection.inference import detect
from utils.naming import tagged_name


def make_pairs(n, rare_every=0):
    pairs = [Pair(Path(f"img{k:03d}.jpg"), Path(f"img{k:03d}.xml")) for k in range(n)]
    classes_of = {p.image.name: ({RARE_CLASS, "with_mask"} if rare_every and k % rare_every == 0 else {"with_mask"})
                  for k, p in enumerate(pairs)}
    return pairs, classes_of


# -- fold assignment -------------------------------------------------------------------------------

def test_every_image_is_in_one_fold_groups_stay_together_and_rare_images_are_spread():
    pairs, classes_of = make_pairs(60, rare_every=5)  # 12 rare images
    groups = [["img000.jpg", "img001.jpg", "img002.jpg"], ["img010.jpg", "img011.jpg"], ["img030.jpg", "gone.jpg"]]
    for seed in range(5):
        folds = assign_folds(pairs, 3, groups, seed=seed, classes_of=classes_of)
        assert sorted(folds) == sorted(p.image.name for p in pairs) and set(folds.values()) == {0, 1, 2}
        assert len({folds[name] for name in groups[0]}) == 1 and folds["img010.jpg"] == folds["img011.jpg"]
        rare = Counter(folds[name] for name, classes in classes_of.items() if RARE_CLASS in classes)
        assert max(rare.values()) - min(rare.values()) <= 1 and sum(rare.values()) == 12
        sizes = Counter(folds.values())
        assert max(sizes.values()) - min(sizes.values()) <= 3  # the 3-image group may tip one fold


def test_assignment_depends_on_the_seed_not_the_order():
    pairs, classes_of = make_pairs(30, rare_every=6)
    folds = assign_folds(pairs, 3, seed=1, classes_of=classes_of)
    assert assign_folds(list(reversed(pairs)), 3, seed=1, classes_of=classes_of) == folds
    assert assign_folds(pairs, 3, seed=2, classes_of=classes_of) != folds


def test_bad_fold_counts_fail_with_one_line(tmp_path):
    pairs, classes_of = make_pairs(4)
    with pytest.raises(FoldError, match="at least 2 folds"):
        assign_folds(pairs, 1, classes_of=classes_of)
    with pytest.raises(FoldError, match="only 2 groups"):
        assign_folds(pairs, 3, [["img000.jpg", "img001.jpg"], ["img002.jpg", "img003.jpg"]], classes_of=classes_of)
    path = tmp_path / "folds.csv"
    path.write_text(folds_csv_text({"a.jpg": 0, "b.jpg": 1}))
    assert read_folds_csv(path) == {"a.jpg": 0, "b.jpg": 1}
    path.write_text("image,fold\na.jpg,x\n")
    with pytest.raises(FoldError, match="line 2"):
        read_folds_csv(path)


def test_evaluate_output_tag_names_every_file():
    from utils.naming import evaluation_output_names

    names = evaluation_output_names("fold0")
    assert names["evaluation.json"] == "evaluation_fold0.json" and names["pr_curves.png"] == "pr_curves_fold0.png"
    assert names["evaluate_run.json"] == "evaluate_fold0_run.json"
    assert evaluation_output_names(None) == {name: name for name in names}


def test_set_file_names_map_back_to_their_image():
    assert source_stem("train_img001") == ("img001", False)
    assert source_stem("val_train_x") == ("train_x", False)
    assert source_stem("aug12_img001") == ("img001", True)
    assert source_stem("img001") is None


def test_a_folds_csv_from_a_spreadsheet_or_of_binary_bytes(tmp_path):
    from utils.data.folds import FoldError, read_folds_csv

    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufeffimage,fold\na.jpg,0\nb.jpg,1\n".encode("utf-8"))  # a byte-order mark, as Excel writes
    assert read_folds_csv(bom) == {"a.jpg": 0, "b.jpg": 1}
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(FoldError, match="not a readable folds CSV"):
        read_folds_csv(binary)


# -- make_fold -------------------------------------------------------------------------------------

def _tar(path: Path, names: list[str]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name in names:
            data = name.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_make_fold_cuts_the_held_out_fold_and_drops_its_copies(tmp_path, root):
    train = _tar(tmp_path / "train_set.tar", [f"{p}{s}.{e}" for s in ("a", "b", "c") for p in ("train_", "aug1_")
                                             for e in ("jpg", "xml")])
    val = _tar(tmp_path / "val_set.tar", [f"val_{s}.{e}" for s in ("d", "e") for e in ("png", "xml")])
    folds = tmp_path / "folds.csv"
    folds.write_text(folds_csv_text({"a.jpg": 0, "b.jpg": 1, "c.jpg": 1, "d.png": 0, "e.png": 1, "f.jpg": 1}))
    out = {name: tmp_path / f"fold0_{name}.tar" for name in ("train", "val", "held_out")}
    assert run_script(root, "make_fold", ["--train-set", train, "--val-set", val, "--folds-csv", folds, "--fold", 0,
                                          "--output-train", out["train"], "--output-val", out["val"],
                                          "--output-held-out", out["held_out"]]) == 0
    names = {}
    for name, path in out.items():
        with tarfile.open(path) as tar:
            names[name] = sorted(tar.getnames())
    # The held-out fold: its originals from both splits, never a copy; nothing else sees them.
    assert names["held_out"] == ["train_a.jpg", "train_a.xml", "val_d.png", "val_d.xml"]
    # The fold model trains on the other folds' train split (with copies) and validates on their val split.
    assert names["train"] == sorted(f"{prefix}{stem}.{ext}" for stem in ("b", "c") for prefix in ("train_", "aug1_")
                                    for ext in ("jpg", "xml"))
    assert names["val"] == ["val_e.png", "val_e.xml"]
    assert not set(names["held_out"]) & (set(names["train"]) | set(names["val"]))
    report = json.loads((tmp_path / "fold0_held_out.report.json").read_text())
    assert report["copies_of_held_out_images_left_out"] == ["aug1_a.jpg", "aug1_a.xml"]
    assert report["pool_images_in_neither_set"] == ["f.jpg"]
    assert (report["train_images"], report["val_images"], report["held_out_images"]) == (4, 1, 2)
    # its run record, as every job's (README): make_fold's report had none
    assert report["run_record"]["job"] == "make_fold" and report["run_record"]["num_inputs"] == 3
    assert report["run_record"]["params"]["fold"] == 0 and report["run_record"]["inputs_sha256"]


def test_make_fold_writes_its_sets_and_report_as_one_set(tmp_path, root, capsys, monkeypatch):
    """The three sets and the report were written one after the other: a held-out set that could not be written
    (a full disk) left the new fold's train and val sets beside the last run's held-out set of another fold."""
    import errno

    train = _tar(tmp_path / "train_set.tar", [f"train_{s}.{e}" for s in ("a", "b", "c") for e in ("jpg", "xml")])
    val = _tar(tmp_path / "val_set.tar", [f"val_{s}.{e}" for s in ("d", "e") for e in ("png", "xml")])
    folds = tmp_path / "folds.csv"
    folds.write_text(folds_csv_text({"a.jpg": 0, "b.jpg": 1, "c.jpg": 1, "d.png": 0, "e.png": 1}))
    out = {name: tmp_path / f"fold_{name}.tar" for name in ("train", "val", "held_out")}

    def make_fold(fold: int) -> int:
        return run_script(root, "make_fold", ["--train-set", train, "--val-set", val, "--folds-csv", folds,
                                              "--fold", fold, "--output-train", out["train"], "--output-val",
                                              out["val"], "--output-held-out", out["held_out"]])

    assert make_fold(0) == 0
    before = {path.name: path.read_bytes() for path in tmp_path.glob("fold_*")}
    add = tarfile.TarFile.add

    def held_out_on_a_full_disk(self, name, *args, **kwargs):
        if ".fold_held_out." in str(self.name):
            raise OSError(errno.ENOSPC, "No space left on device")
        return add(self, name, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "add", held_out_on_a_full_disk)
    capsys.readouterr()
    assert make_fold(1) == 2
    assert "fold_held_out.tar: cannot write fold_held_out.tar (No space left on device)" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in tmp_path.glob("fold_*")} == before
    assert not list(tmp_path.glob(".fold_*"))  # no temporary file left


def test_make_fold_refuses_a_fold_without_validation_images(tmp_path, root, capsys):
    train = _tar(tmp_path / "train_set.tar", ["train_a.jpg", "train_b.jpg"])
    val = _tar(tmp_path / "val_set.tar", ["val_c.jpg"])
    folds = tmp_path / "folds.csv"
    folds.write_text(folds_csv_text({"a.jpg": 0, "b.jpg": 1, "c.jpg": 0}))
    assert run_script(root, "make_fold", ["--train-set", train, "--val-set", val, "--folds-csv", folds, "--fold", 0,
                                          "--output-train", tmp_path / "t.tar", "--output-val", tmp_path / "v.tar",
                                          "--output-held-out", tmp_path / "h.tar"]) == 2
    error = capsys.readouterr().err.strip()
    assert "fold 0 leaves no val images" in error and "\n" not in error and not (tmp_path / "t.tar").exists()


def test_make_fold_refuses_two_outputs_of_one_name(tmp_path, root, capsys):
    # --output-val naming the --output-train file wrote the val set over the train set: the fold model
    # trained on its few validation images alone, and nothing said so.
    train = _tar(tmp_path / "train_set.tar", ["train_a.jpg", "train_b.jpg"])
    val = _tar(tmp_path / "val_set.tar", ["val_c.jpg", "val_d.jpg"])
    folds = tmp_path / "folds.csv"
    folds.write_text(folds_csv_text({"a.jpg": 0, "b.jpg": 1, "c.jpg": 0, "d.jpg": 1}))
    assert run_script(root, "make_fold", ["--train-set", train, "--val-set", val, "--folds-csv", folds, "--fold", 0,
                                          "--output-train", tmp_path / "t.tar", "--output-val", tmp_path / "t.tar",
                                          "--output-held-out", tmp_path / "h.tar"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"make_fold: error: {tmp_path / 't.tar'}: given as --output-train and as --output-val; each output needs "
        "a file of its own")
    assert not (tmp_path / "t.tar").exists() and not (tmp_path / "h.tar").exists()


def test_each_split_is_spread_over_the_folds_so_every_fold_model_has_validation_images(sample_dir, tmp_path):
    """The train and val splits are assigned to the folds each on its own: two val images, one of them with
    the rare class, land in two folds (stratifying the pool as one put both in one fold, leaving that fold's
    model nothing to validate on); a val split smaller than the folds fails at generation."""
    from utils.pegasus.config import ConfigError, SplitEntry
    from utils.pegasus.inputs import fold_assignment_text

    def write_folds(folder, entries, report, folds, seed):  # what the generator writes as folds.csv
        path = folder / "folds.csv"
        path.write_text(fold_assignment_text(entries, report.get("duplicate_groups", []), folds, seed))
        return path

    images = sorted((sample_dir / "images").glob("*.jpg"))[:16]
    rare = [image for image in images if RARE_CLASS in (sample_dir / "annotations" / f"{image.stem}.xml").read_text()]
    plain = [image for image in images if image not in rare]
    val = {rare[0].name, plain[0].name}
    entries = [SplitEntry(image, sample_dir / "annotations" / f"{image.stem}.xml",
                          "val" if image.name in val else "train") for image in images]
    for seed in range(5):
        folds = read_folds_csv(write_folds(tmp_path, entries, {}, 2, seed))
        assert sorted(folds[name] for name in val) == [0, 1]
        assert sorted(Counter(fold for name, fold in folds.items() if name not in val).values()) == [7, 7]
    with pytest.raises(ConfigError, match="the val split has only 2 groups of images"):
        write_folds(tmp_path, entries, {}, 3, 0)


def test_make_fold_refuses_files_it_cannot_place(tmp_path, root, capsys):
    train = _tar(tmp_path / "train_set.tar", ["train_a.jpg", "stray.jpg"])
    val = _tar(tmp_path / "val_set.tar", ["val_b.jpg"])
    folds = tmp_path / "folds.csv"
    folds.write_text(folds_csv_text({"a.jpg": 0, "b.jpg": 1}))
    argv = ["--train-set", train, "--val-set", val, "--folds-csv", folds, "--fold", 0,
            "--output-train", tmp_path / "t.tar", "--output-val", tmp_path / "v.tar",
            "--output-held-out", tmp_path / "h.tar"]
    assert run_script(root, "make_fold", argv) == 2
    error = capsys.readouterr().err.strip()
    assert "stray.jpg" in error and "\n" not in error and "Traceback" not in error
    assert run_script(root, "make_fold", argv[:7] + ["5"] + argv[8:]) == 2
    assert "--fold 5" in capsys.readouterr().err


# -- the box-fusion ensemble -----------------------------------------------------------------------

class FixedDetector:
    """Returns the same boxes for every image (in a 100x50 image's pixels); flipped images get mirrored boxes."""

    def __init__(self, boxes, labels, scores):
        self.boxes, self.labels, self.scores = (torch.tensor(boxes, dtype=torch.float32), torch.tensor(labels),
                                                torch.tensor(scores))
        self.calls = 0

    def eval(self):
        return self

    def __call__(self, images):
        self.calls += 1
        return [{"boxes": self.boxes.clone(), "labels": self.labels.clone(), "scores": self.scores.clone()}
                for _ in images]


def test_boxes_of_one_face_are_fused_and_a_lone_box_loses_half_its_score():
    mask = LABEL_OF["with_mask"]
    first = FixedDetector([[10, 10, 30, 40], [60, 5, 90, 20]], [mask, mask], [0.9, 0.8])
    second = FixedDetector([[12, 10, 30, 42]], [mask], [0.7])
    ensemble = BoxFusionEnsemble([first, second]).eval()
    out = detect(ensemble, [torch.zeros(3, 50, 100)])[0]
    assert out["labels"].tolist() == [mask, mask]
    assert out["scores"].tolist() == pytest.approx([0.8, 0.4], abs=1e-4)  # mean of 0.9, 0.7; 0.8 found by 1 of 2
    # the fused box is the score-weighted mean of the two: x1 = (0.9*10 + 0.7*12) / 1.6
    assert out["boxes"][0].tolist() == pytest.approx([10.875, 10.0, 30.0, 40.875], abs=1e-3)
    assert out["boxes"][1].tolist() == pytest.approx([60, 5, 90, 20], abs=1e-3)


def test_flip_tta_fuses_each_models_flipped_pass():
    mask = LABEL_OF["with_mask"]
    model = FixedDetector([[10, 10, 30, 40]], [mask], [0.9])  # on the flipped image this box mirrors to x 70-90
    ensemble = BoxFusionEnsemble([model, model])
    out = detect(ensemble, [torch.zeros(3, 50, 100)], tta=True)[0]
    # 4 members: two plain passes find (10..30), two flipped passes find it at (70..90) in the original frame
    assert sorted(b[0] for b in out["boxes"].tolist()) == pytest.approx([10, 70], abs=1e-3)
    assert out["scores"].tolist() == pytest.approx([0.45, 0.45], abs=1e-4)
    assert model.calls == 2  # one batch per member, plain and flipped together


def test_predict_runs_two_model_files_as_one_ensemble(tiny_model_file, tmp_path, root, sample_dir):
    from utils.detection.model import build_model, save_model_file

    torch.manual_seed(1)
    second = save_model_file(tmp_path / "second.pt", build_model(backbone="mobilenet_v2_fpn", weights="none",
                                                                 image_size=128))
    images = sorted((sample_dir / "images").iterdir())[:2]
    argv = ["--images", *images, "--model", tiny_model_file, second, "--output-dir", tmp_path / "out",
            "--no-annotated", "--workers", "0", "--score-threshold", "0.0"]
    assert run_script(root, "predict", argv) == 0
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert predictions["model"] == [str(tiny_model_file), str(second)] and predictions["num_images"] == 2


# -- the workflow ----------------------------------------------------------------------------------

def _generate(run_dir: Path, data: Path, *extra: str) -> int:
    args = generator.get_args_parser().parse_args(
        ["--data", str(data), "--run-dir", str(run_dir), "--generate-only", "--hpo-jobs", "1", "--trials", "1",
         *extra])
    with contextlib.redirect_stdout(io.StringIO()):
        return generator.main(args)


def test_generated_dag_fans_out_the_folds_and_predicts_with_their_ensemble(sample_dir, tmp_path):
    from pegasus_schemas import validate_run_dir

    run_dir = tmp_path / "run"
    # a val split of 5 images: every one of the 3 fold models needs some in the other folds to validate on
    assert _generate(run_dir, sample_dir, "--folds", "3", "--fold-ensemble", "--fractions", "0.6", "0.2", "0.2") == 0
    workflow = yaml.safe_load((run_dir / "workflow.yml").read_text())
    jobs = {job["id"]: job for job in workflow["jobs"]}
    children = {entry["id"]: set(entry["children"]) for entry in workflow["jobDependencies"]}
    for fold in range(3):
        assert {"preprocess_val", "augment_train"} <= {p for p, c in children.items() if f"make_fold{fold}" in c}
        assert {f"train_fold{fold}", f"evaluate_fold{fold}"} <= children[f"make_fold{fold}"]
        assert f"evaluate_fold{fold}" in children[f"train_fold{fold}"]
        assert "aggregate_folds" in children[f"evaluate_fold{fold}"]
        assert f"train_fold{fold}" in children["hpo_merge"]
    # same settings as the final model: its arguments, with the fold's sets and renamed outputs
    fold_args, final_args = jobs["train_fold0"]["arguments"], jobs["train"]["arguments"]
    sets = {"train_set.tar": "fold0_train.tar", "val_set.tar": "fold0_val.tar"}
    assert len(fold_args) == len(final_args)
    for fold_arg, final_arg in zip(fold_args, final_args):
        assert fold_arg in (final_arg, sets.get(final_arg), f"{final_arg}_fold0",
                            tagged_name(str(final_arg), "fold0")), (fold_arg, final_arg)
    for flag, value in (("--output", "model_fold0.pt"), ("--checkpoint", "train_fold0_checkpoint.pt"),
                        ("--images", "fold0_train.tar"), ("--val-images", "fold0_val.tar"),
                        ("--params", "best_hpo_params.json")):
        assert fold_args[fold_args.index(flag) + 1] == value
    outputs = {use["lfn"] for use in jobs["train_fold0"]["uses"] if use["type"] == "output"}
    assert {"model_fold0.pt", "model_fold0_run.json", "train_metrics_fold0.csv"} <= outputs
    assert "evaluation_fold2.json" in jobs["aggregate_folds"]["arguments"]
    # the report page shows the cross-validation
    assert {"kfold_summary.json", "kfold_folds.png"} <= {use["lfn"] for use in jobs["report"]["uses"]
                                                        if use["type"] == "input"}
    predict = next(job for job in jobs.values() if job["id"].startswith("predict_shard"))
    assert [a for a in predict["arguments"] if str(a).startswith("model")] == [f"model_fold{f}.pt" for f in range(3)]
    # folds.csv covers exactly the train+val pool
    split = dict(line.rsplit(",", 1) for line in (run_dir / "split.csv").read_text().splitlines()[1:])
    pool = {Path(row.split(",")[0]).name for row, name in split.items() if name in ("train", "val")}
    assert set(read_folds_csv(run_dir / "folds.csv")) == pool
    assert all(errors == [] for errors in validate_run_dir(run_dir).values())


def test_the_videos_are_predicted_with_the_fold_ensemble_the_photos_are_predicted_with(sample_dir, tmp_path):
    """--fold-ensemble gave the predict jobs the fold models and the predict_video jobs the final model: a video's
    figure came from another model than the photos' (tests/test_figure_paths.py runs the two jobs)."""
    import cv2
    import numpy as np

    videos = tmp_path / "videos"
    videos.mkdir()
    writer = cv2.VideoWriter(str(videos / "gate.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (64, 48))
    for value in range(4):
        writer.write(np.full((48, 64, 3), 60 * value, np.uint8))
    writer.release()
    run_dir = tmp_path / "run"
    assert _generate(run_dir, sample_dir, "--folds", "2", "--fold-ensemble", "--pred-videos", str(videos)) == 0
    jobs = {job["id"]: job for job in yaml.safe_load((run_dir / "workflow.yml").read_text())["jobs"]}
    predict = next(job for job in jobs.values() if job["id"].startswith("predict_shard"))

    def models(job, uses=False):
        names = ([use["lfn"] for use in job["uses"] if use["type"] == "input"] if uses else job["arguments"])
        return sorted(str(name) for name in names if str(name).startswith("model"))

    fold_models = [f"model_fold{fold}.pt" for fold in range(2)]
    assert models(predict) == models(jobs["predict_video_gate"]) == models(jobs["predict_video_gate"], True) == \
        fold_models


def test_without_folds_there_are_no_fold_jobs_and_bad_flags_fail_in_one_line(sample_dir, tmp_path, capsys):
    assert _generate(tmp_path / "plain", sample_dir) == 0
    ids = {job["id"] for job in yaml.safe_load((tmp_path / "plain" / "workflow.yml").read_text())["jobs"]}
    assert not any("fold" in job_id for job_id in ids) and not (tmp_path / "plain" / "folds.csv").exists()
    capsys.readouterr()
    assert _generate(tmp_path / "one", sample_dir, "--folds", "1") == 2
    assert "--folds 1" in capsys.readouterr().err
    assert _generate(tmp_path / "ens", sample_dir, "--fold-ensemble") == 2
    assert "add --folds" in capsys.readouterr().err
