"""k-fold cross-validation: fold assignment, make_fold, aggregate_folds, the box-fusion ensemble
and the workflow's fold fan-out (--folds, --fold-ensemble)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

import workflow as generator
from helpers import run_script
from utils.classes import CLASSES, LABEL_OF, RARE_CLASS
from utils.data.folds import FoldError, assign_folds, folds_csv_text, read_folds_csv, source_stem
from utils.data.pairs import Pair
from utils.detection.cross_validation import format_summary, mean_std, summarise_folds
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


# -- aggregate -------------------------------------------------------------------------------------

def fake_evaluation(value: float, rare_ap=None) -> dict:
    per_class = {name: {"ap": value, "ap_50": value + 0.1, "ap_75": value, "recall": value} for name in CLASSES}
    per_class[RARE_CLASS] = {"ap": rare_ap, "ap_50": rare_ap, "ap_75": rare_ap, "recall": rare_ap}
    return {"map": value, "map_50": value + 0.1, "map_75": value, "mar_100": value, "test_loss": 1.0 + value,
            "compliance": {"error_points": -value * 10, "per_image_mae_points": value * 20},
            "confusion_matrix": {"score_threshold": 0.5}, "per_class": per_class, "num_images": 5, "num_faces": 9}


def test_mean_and_sample_std_per_metric_and_class():
    summary = summarise_folds([fake_evaluation(0.2, 0.4), fake_evaluation(0.4, None), fake_evaluation(0.6, 0.6)],
                              ["evaluation_fold0.json", "evaluation_fold1.json", "evaluation_fold2.json"])
    assert summary["metrics"]["map"]["mean"] == pytest.approx(0.4)
    assert summary["metrics"]["map"]["std"] == pytest.approx(0.2)  # sample std of 0.2, 0.4, 0.6
    assert summary["metrics"]["compliance_abs_error_points"]["mean"] == pytest.approx(4.0)
    rare = summary["per_class"][RARE_CLASS]["ap_50"]
    assert rare["n"] == 2 and rare["mean"] == pytest.approx(0.5) and rare["values"] == [0.4, None, 0.6]
    assert summary["per_class"]["with_mask"]["ap_50"]["mean"] == pytest.approx(0.5)
    assert mean_std([0.3])["std"] is None and mean_std([None, None])["mean"] is None
    assert mean_std(abs(v) for v in (-1.0, 3.0))["values"] == [1.0, 3.0]  # an iterator keeps its values
    assert math.isclose(mean_std([1.0, 3.0])["std"], math.sqrt(2))


def test_an_undefined_metric_is_null_in_the_summary_not_nan(tmp_path):
    """A fold's metric may be NaN (a diverged fold model's held-out loss): it was left out of the mean but kept in
    the per-fold values as NaN, which json writes as a bare NaN token that strict readers (jq, JSON.parse) refuse."""
    from utils.detection.cross_validation import write_summary

    inputs = []
    for fold, loss in enumerate((1.2, float("nan"), 1.4)):
        inputs.append(tmp_path / f"evaluation_fold{fold}.json")
        inputs[-1].write_text(json.dumps({**fake_evaluation(0.2 + fold / 10, 0.3), "test_loss": loss}))
    write_summary(inputs, tmp_path / "out", plot=None)
    text = (tmp_path / "out" / "kfold_summary.json").read_text()
    summary = json.loads(text, parse_constant=lambda token: pytest.fail(f"{token} in kfold_summary.json"))
    loss = summary["metrics"]["held_out_loss"]
    assert loss["values"] == [1.2, None, 1.4] and loss["n"] == 2 and loss["mean"] == pytest.approx(1.3)


def test_the_summary_says_how_each_fold_model_ran():
    folds = [{**fake_evaluation(0.3), "working_size": 768, "tta": True}, {**fake_evaluation(0.4), "working_size": 640,
                                                                         "tta": False}, fake_evaluation(0.5)]
    summary = summarise_folds(folds, ["a", "b", "c"])
    assert summary["inference_per_fold"] == [{"working_size": 768, "tta": True},
                                             {"working_size": 640, "tta": False},
                                             {"working_size": None, "tta": None}]
    assert "ran at (its own choice on its validation images): 768 px + flip TTA, 640 px, n/a" in format_summary(summary)


def with_estimators(evaluation: dict, errors: dict, inside: dict) -> dict:
    """*evaluation* with a quantification block: each estimator's error and whether the truth was inside."""
    estimates = {method: {"error_points": error, "truth_inside": inside[method]} for method, error in errors.items()}
    return {**evaluation, "quantification": {"estimates": estimates}}


def test_the_compliance_estimators_are_ranked_by_their_error_across_folds():
    folds = [with_estimators(fake_evaluation(0.3, 0.3), {"cc": 8.0, "pcc": -3.0, "acc": 1.0},
                             {"cc": False, "pcc": True, "acc": True}),
             with_estimators(fake_evaluation(0.5, 0.5), {"cc": 6.0, "pcc": 2.0, "acc": None},
                             {"cc": False, "pcc": True, "acc": None})]
    summary = summarise_folds(folds, ["evaluation_fold0.json", "evaluation_fold1.json"])
    estimators = summary["compliance_estimators"]
    assert estimators["estimators"]["cc"]["abs_error_points"]["mean"] == pytest.approx(7.0)
    assert estimators["estimators"]["pcc"]["error_points"]["mean"] == pytest.approx(-0.5)
    covered = {name: entry["folds_covered"] for name, entry in estimators["estimators"].items()}
    assert covered["pcc"] == 2 and covered["cc"] == 0
    # acc is undefined on one fold: it cannot win on one fold's error
    assert estimators["smallest_mean_abs_error"] == "pcc"
    text = format_summary(summary)
    assert "smallest mean |error| over every fold: pcc" in text and "2 of 2 folds" in text
    assert summarise_folds([fake_evaluation(0.3, 0.3)] * 2, ["a", "b"])["compliance_estimators"] is None  # older files


def test_aggregate_job_writes_the_summary_and_names_a_bad_file(tmp_path, root, capsys):
    inputs = []
    for fold, value in enumerate((0.3, 0.5)):
        inputs.append(tmp_path / f"evaluation_fold{fold}.json")
        inputs[-1].write_text(json.dumps(fake_evaluation(value, value)))
    assert run_script(root, "aggregate_folds", ["--inputs", *inputs, "--output-dir", tmp_path / "out"]) == 0
    summary = json.loads((tmp_path / "out" / "kfold_summary.json").read_text())
    assert summary["folds"] == 2 and summary["metrics"]["map_50"]["mean"] == pytest.approx(0.5)
    text = (tmp_path / "out" / "kfold_summary.txt").read_text()
    assert "mAP@0.5" in text and "0.5000 ± 0.1414" in text and "held-out fold" in text
    assert (tmp_path / "out" / "kfold_folds.png").stat().st_size > 0
    broken = tmp_path / "evaluation_fold9.json"
    broken.write_text(json.dumps({"map": 0.1}))
    capsys.readouterr()
    assert run_script(root, "aggregate_folds", ["--inputs", inputs[0], broken, "--output-dir", tmp_path / "o2"]) == 2
    error = capsys.readouterr().err.strip()
    assert str(broken) in error and "\n" not in error


def test_a_summary_whose_plot_cannot_be_written_leaves_the_last_runs_files_as_one_set(tmp_path, monkeypatch):
    """The summary, its text and its plot were written one after the other: a plot that failed (a full disk) left
    the new folds' summary beside the last run's plot of other folds."""
    import errno

    import matplotlib.figure

    from utils.detection.cross_validation import write_summary

    inputs = []
    for fold, value in enumerate((0.3, 0.5)):
        inputs.append(tmp_path / f"evaluation_fold{fold}.json")
        inputs[-1].write_text(json.dumps(fake_evaluation(value, value)))
    out = tmp_path / "out"
    write_summary(inputs, out)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    inputs[1].write_text(json.dumps(fake_evaluation(0.7, 0.7)))

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    with pytest.raises(OSError, match="kfold_folds.png"):
        write_summary(inputs, out)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before  # no temporary file left either


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


def test_without_folds_there_are_no_fold_jobs_and_bad_flags_fail_in_one_line(sample_dir, tmp_path, capsys):
    assert _generate(tmp_path / "plain", sample_dir) == 0
    ids = {job["id"] for job in yaml.safe_load((tmp_path / "plain" / "workflow.yml").read_text())["jobs"]}
    assert not any("fold" in job_id for job_id in ids) and not (tmp_path / "plain" / "folds.csv").exists()
    capsys.readouterr()
    assert _generate(tmp_path / "one", sample_dir, "--folds", "1") == 2
    assert "--folds 1" in capsys.readouterr().err
    assert _generate(tmp_path / "ens", sample_dir, "--fold-ensemble") == 2
    assert "add --folds" in capsys.readouterr().err


def test_aggregate_refuses_a_missing_or_repeated_fold_and_non_numeric_metrics(tmp_path, root, capsys):
    for fold in range(3):
        (tmp_path / f"evaluation_fold{fold}.json").write_text(json.dumps(fake_evaluation(0.1 * (fold + 1))))
    fold = [tmp_path / f"evaluation_fold{i}.json" for i in range(3)]
    cases = [([fold[0], fold[2]], "the folds given are [0, 2], not 0 to 1 (missing [1])"),
             ([fold[0], fold[0], fold[1]], "given twice")]
    copied = tmp_path / "copy" / "evaluation_fold1.json"  # fold 0's file under fold 1's name: one fold, not two
    copied.parent.mkdir()
    copied.write_bytes(fold[0].read_bytes())
    cases.append(([fold[0], copied], f"{copied}: the same evaluation as {fold[0]} (a fold's file copied"))
    odd = tmp_path / "evaluation_fold1b.json"
    odd.write_text(json.dumps({**fake_evaluation(0.2), "map": "abc"}))
    cases.append(([fold[0], odd], "a metric holds 'abc', not a number"))
    for inputs, words in cases:
        capsys.readouterr()
        assert run_script(root, "aggregate_folds", ["--inputs", *inputs, "--output-dir", tmp_path / "out"]) == 2
        error = capsys.readouterr().err.strip()
        assert words in error and "\n" not in error, error


def test_a_folds_csv_from_a_spreadsheet_or_of_binary_bytes(tmp_path):
    from utils.data.folds import FoldError, read_folds_csv

    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufeffimage,fold\na.jpg,0\nb.jpg,1\n".encode("utf-8"))  # a byte-order mark, as Excel writes
    assert read_folds_csv(bom) == {"a.jpg": 0, "b.jpg": 1}
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(FoldError, match="not a readable folds CSV"):
        read_folds_csv(binary)


@pytest.mark.parametrize("estimates, said", [
    (["cc"], "quantification.estimates is not a mapping"),
    ({"cc": "7.5"}, "quantification.estimates.cc is not a mapping"),
    ({"pacc2": {"error_points": "7", "truth_inside": True}}, "quantification.estimates.pacc2.error_points holds '7'"),
    ({"cc": {"error_points": 1.0, "truth_inside": "yes"}}, "quantification.estimates.cc.truth_inside holds 'yes'"),
])
def test_aggregate_job_names_a_fold_whose_estimators_are_malformed(tmp_path, root, capsys, estimates, said):
    good = tmp_path / "evaluation_fold0.json"
    good.write_text(json.dumps(with_estimators(fake_evaluation(0.3, 0.3), {"cc": 1.0}, {"cc": True})))
    bad = tmp_path / "evaluation_fold1.json"
    bad.write_text(json.dumps({**fake_evaluation(0.5, 0.5), "quantification": {"estimates": estimates}}))
    capsys.readouterr()
    assert run_script(root, "aggregate_folds", ["--inputs", good, bad, "--output-dir", tmp_path / "out"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"aggregate_folds: error: {bad}: ") and said in error and "Traceback" not in error
    assert not (tmp_path / "out" / "kfold_summary.json").exists()


def test_the_fold_plot_of_folds_without_labelled_faces_says_so_without_a_matplotlib_warning(tmp_path):
    import warnings

    from utils.detection.cross_validation import plot_folds

    empty = fake_evaluation(0.0, None)
    for key in ("map", "map_50", "map_75", "mar_100"):
        empty[key] = None
    empty["per_class"] = {name: dict.fromkeys(("ap", "ap_50", "ap_75", "recall")) for name in CLASSES}
    partial = {**fake_evaluation(0.4, 0.4), "map": None}  # fold 0's mAP undefined: the legend came from it
    for folds in ([empty, empty], [partial, fake_evaluation(0.5, 0.5)]):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # it printed "No artists with labels found to put in legend"
            plot_folds(summarise_folds(folds, ["a", "b"]), tmp_path / "folds.png")
        assert (tmp_path / "folds.png").stat().st_size > 0
