"""--label-map: another data set's class names (with_incorrect_mask, mask, no_mask) read as this project's
classes by every job that reads VOC XML, parsed once (utils.classes.LabelMap) and applied in parse_voc."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter

import pytest
import yaml

from helpers import generate, jobs_by_id, load_script, run_script
from utils import defaults as D
from utils.classes import CLASSES, NO_LABEL_MAP, LabelMap, LabelMapError
from utils.data.class_distribution import count_objects
from utils.data.dataset import VocDetectionDataset
from utils.data.pairs import pair_folders, write_pairs_csv
from utils.data.split import image_classes
from utils.data.validation import format_summary, validate_dataset, write_clean_outputs
from utils.data.voc import parse_voc
from utils.detection.model import load_model_file
from utils.errors import InputError

# How the other data set names our classes, and the map that reads its names back as ours.
FOREIGN_NAME = {"with_mask": "mask", "without_mask": "no_mask", "mask_weared_incorrect": "with_incorrect_mask"}
MAP_TEXT = "with_incorrect_mask=mask_weared_incorrect,mask=with_mask,no_mask=without_mask"
LABEL_MAP = LabelMap.parse(MAP_TEXT)
XML_READING_SCRIPTS = ("validate_data", "split_data", "plot_class_distribution", "preprocess", "augment", "train",
                       "hpo", "evaluate")


@pytest.fixture(scope="module")
def data_sets(tmp_path_factory):
    """(ours, foreign, objects per class): 12 synthetic images, and the same images whose XML uses the
    other data set's names."""
    from utils.data.sample_data import make_sample_dataset

    ours = tmp_path_factory.mktemp("ours")
    summary = make_sample_dataset(ours, num_images=12, seed=5, image_size=(128, 96))
    assert all(summary["objects"][name] > 0 for name in CLASSES)  # every class is there to be renamed
    foreign = tmp_path_factory.mktemp("foreign")
    shutil.copytree(ours / "images", foreign / "images")
    (foreign / "annotations").mkdir()
    for xml in (ours / "annotations").iterdir():
        text = re.sub(r"<name>(\w+)</name>", lambda m: f"<name>{FOREIGN_NAME[m.group(1)]}</name>", xml.read_text())
        (foreign / "annotations" / xml.name).write_text(text)
    return ours, foreign, summary["objects"]


def pairs_of(folder):
    return pair_folders(folder / "images", folder / "annotations").pairs


def names_in(folder, pattern: str = "*.xml") -> Counter:
    return Counter(obj.name for xml in folder.glob(pattern) for obj in parse_voc(xml).objects)


# ----------------------------------------------------------------------------- parsing

def test_a_label_map_parses_source_class_pairs_in_the_order_given():
    label_map = LabelMap.parse(" with_incorrect_mask = mask_weared_incorrect, mask=with_mask,no_mask=without_mask ")
    assert label_map == LABEL_MAP and str(label_map) == MAP_TEXT  # spaces around names do not matter
    assert label_map.as_dict() == {source: name for name, source in FOREIGN_NAME.items()}
    assert label_map.class_name("with_incorrect_mask") == "mask_weared_incorrect"
    assert label_map.class_name("helmet") == "helmet" and label_map.class_name("with_mask") == "with_mask"
    assert LabelMap.parse(D.LABEL_MAP) == LabelMap.parse(None) == NO_LABEL_MAP and not NO_LABEL_MAP


@pytest.mark.parametrize("text, problem", [
    ("mask=face", "--label-map: 'mask=face' maps to 'face', which is not one of with_mask, without_mask, "
                  "mask_weared_incorrect"),
    ("mask", "--label-map: 'mask' is not a SOURCE=CLASS pair"),
    ("mask=with_mask=x", "--label-map: 'mask=with_mask=x' is not a SOURCE=CLASS pair"),
    ("=with_mask", "--label-map: '=with_mask' has an empty source name"),
    ("mask=with_mask,mask=without_mask", "--label-map: 'mask=without_mask' maps 'mask' a second time"),
    ("mask=with_mask,", "--label-map: 'mask=with_mask,' has an empty pair (a stray comma)"),
    ("with_mask=without_mask", "--label-map: 'with_mask=without_mask' renames 'with_mask', which is already a class"),
])
def test_a_bad_label_map_is_one_input_error_naming_the_flag_and_the_pair(text, problem):
    with pytest.raises(LabelMapError) as raised:
        LabelMap.parse(text)
    assert isinstance(raised.value, InputError) and str(raised.value) == problem


def test_a_bad_label_map_stops_a_job_with_one_line_and_exit_2(root, data_sets, tmp_path, capsys):
    _, foreign, _ = data_sets
    code = run_script(root, "validate_data", ["--images", foreign / "images", "--annotations",
                                              foreign / "annotations", "--output-dir", tmp_path,
                                              "--label-map", "mask=face"])
    assert code == 2
    assert capsys.readouterr().err == ("validate_data: error: --label-map: 'mask=face' maps to 'face', which is "
                                       "not one of with_mask, without_mask, mask_weared_incorrect\n")


@pytest.mark.parametrize("name", XML_READING_SCRIPTS)
def test_every_job_that_reads_xml_takes_the_label_map_flag_defaulting_to_none(root, name):
    parser = load_script(root, name).get_args_parser()
    assert {action.dest: action.default for action in parser._actions}["label_map"] == D.LABEL_MAP
    help_text = " ".join(parser.format_help().split())
    assert "with_incorrect_mask=mask_weared_incorrect" in help_text
    writes_xml = name in ("validate_data", "preprocess", "augment")
    assert ("the XML written holds the class names" in help_text) == writes_xml


# ----------------------------------------------------------------------------- validation and split

def test_without_a_map_the_other_names_are_unknown_classes(data_sets):
    _, foreign, objects = data_sets
    report = validate_dataset(foreign / "images", foreign / "annotations", progress=False).report
    assert report["problem_counts"]["unknown_class"] == sum(objects.values())
    assert report["images_usable"] == 0 and report["labels_mapped"] == {} and report["label_map"] == ""
    assert "labels mapped" not in format_summary(report)


def test_with_the_map_the_other_names_are_counted_as_mapped_and_the_images_are_usable(data_sets, tmp_path):
    ours, foreign, objects = data_sets
    result = validate_dataset(foreign / "images", foreign / "annotations", progress=False, label_map=LABEL_MAP)
    report, reference = result.report, validate_dataset(ours / "images", ours / "annotations", progress=False).report
    assert report["labels_mapped"] == {f"{FOREIGN_NAME[name]} -> {name}": objects[name] for name in CLASSES}
    assert report["problem_counts"]["unknown_class"] == 0 and report["label_map"] == MAP_TEXT
    assert report["images_usable"] == reference["images_usable"] > 0
    assert report["objects_per_class"] == reference["objects_per_class"]
    summary_line = [line for line in format_summary(report).splitlines() if line.startswith("labels mapped: ")]
    assert summary_line == [f"labels mapped: mask -> with_mask ({objects['with_mask']}), "
                            f"no_mask -> without_mask ({objects['without_mask']}), "
                            f"with_incorrect_mask -> mask_weared_incorrect ({objects['mask_weared_incorrect']})"]
    # The clean annotations hold the class names, so jobs reading them need no map.
    outputs = write_clean_outputs(result, tmp_path)
    assert names_in(outputs["annotations_clean"]) == Counter(report["objects_per_class"])


def test_a_map_that_matches_no_name_says_so_in_the_summary(data_sets):
    ours, _, _ = data_sets
    report = validate_dataset(ours / "images", ours / "annotations", progress=False, label_map=LABEL_MAP).report
    assert report["labels_mapped"] == {} and report["annotations_cleaned"] == 0
    assert f"labels mapped: none (no object name matches --label-map {MAP_TEXT})" in format_summary(report)


def test_the_split_and_the_class_counts_read_mapped_names(data_sets, tmp_path):
    ours, foreign, objects = data_sets
    assert image_classes(pairs_of(foreign), LABEL_MAP) == image_classes(pairs_of(ours))
    assert "with_incorrect_mask" in set().union(*image_classes(pairs_of(foreign)).values())
    split_csv = write_pairs_csv(tmp_path / "split.csv", [{"image": p.image, "annotation": p.annotation,
                                                          "split": "train"} for p in pairs_of(foreign)],
                                fields=("image", "annotation", "split"))
    counts, problems = count_objects(split_csv, label_map=LABEL_MAP)
    assert problems == [] and counts["train"]["objects"] == objects
    _, problems = count_objects(split_csv)
    assert len(problems) == sum(objects.values())  # without the map: every object an unknown class


# ----------------------------------------------------------------------------- the jobs

@pytest.mark.parametrize("job, flags, originals", [("preprocess", ["--prefix", "val_"], "val_*.xml"),
                                                    ("augment", ["--copies", "0"], "train_*.xml")])
def test_preprocess_and_augment_write_the_class_names(root, data_sets, tmp_path, job, flags, originals):
    ours, foreign, objects = data_sets
    out, report = tmp_path / "out", tmp_path / "report.json"
    assert run_script(root, job, ["--images", foreign / "images", "--annotations", foreign / "annotations",
                                  *flags, "--output-dir", out, "--report", report, "--no-progress",
                                  "--label-map", MAP_TEXT]) == 0
    assert names_in(out, originals) == Counter(objects) and set(names_in(out)) == set(CLASSES)
    written = json.loads(report.read_text())
    assert written["object_problems"] == [] and written["run_record"]["params"]["label_map"] == MAP_TEXT
    if job == "augment":  # the rare class is recognised under its other name, and gets its extra copies
        rare_images = sum("mask_weared_incorrect" in names for names in image_classes(pairs_of(ours)).values())
        assert written["rare_images"] == rare_images > 0


def test_the_dataset_gives_mapped_names_their_class_labels(data_sets):
    ours, foreign, _ = data_sets
    mapped = VocDetectionDataset(pairs_of(foreign), label_map=LABEL_MAP)
    reference = VocDetectionDataset(pairs_of(ours))
    for index in range(len(mapped)):
        assert mapped[index][1]["labels"].tolist() == reference[index][1]["labels"].tolist() != []
    unmapped = VocDetectionDataset(pairs_of(foreign))
    assert unmapped[0][1]["labels"].tolist() == [] and "unknown class name" in str(unmapped.object_problems)


@pytest.mark.training
def test_train_records_the_label_map_in_the_model_file_and_its_run_record(root, data_sets, tmp_path):
    _, foreign, _ = data_sets
    assert run_script(root, "train", ["--images", foreign / "images", "--annotations", foreign / "annotations",
                                      "--epochs", "1", "--image-size", "64", "--batch-size", "4", "--workers", "0",
                                      "--weights", "none", "--device", "cpu", "--no-progress",
                                      "--checkpoint", tmp_path / "checkpoint.pt", "--output", tmp_path / "model.pt",
                                      "--label-map", MAP_TEXT]) == 0
    _, meta = load_model_file(tmp_path / "model.pt")
    assert meta["data_label_map"] == LABEL_MAP.as_dict()
    assert meta["label_map"]["mask_weared_incorrect"] == 3  # the class -> label table is left as it was
    record = json.loads((tmp_path / "model_run.json").read_text())
    assert record["params"]["label_map"] == MAP_TEXT


@pytest.mark.slow
def test_evaluate_reads_mapped_names(root, data_sets, tiny_model_file, tmp_path):
    _, foreign, objects = data_sets
    out = tmp_path / "eval"
    assert run_script(root, "evaluate", ["--images", foreign / "images", "--annotations", foreign / "annotations",
                                         "--model", tiny_model_file, "--output-dir", out, "--device", "cpu",
                                         "--workers", "0", "--label-map", MAP_TEXT]) == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert report["faces_per_class"] == objects and report["objects_dropped"] == []
    assert json.loads((out / "evaluate_run.json").read_text())["params"]["label_map"] == MAP_TEXT


# ----------------------------------------------------------------------------- the workflow

JOBS_GIVEN_THE_MAP = {"plot_class_distribution", "preprocess_val", "preprocess_test", "augment_train", "train"}


def test_the_workflow_validates_splits_and_hands_the_map_to_the_jobs_that_read_xml(data_sets, tmp_path, capsys):
    _, foreign, objects = data_sets
    assert generate(tmp_path / "unmapped", foreign) == 2  # no usable image without the map
    assert "no usable image/annotation pairs" in capsys.readouterr().err
    run_dir = tmp_path / "mapped"
    assert generate(run_dir, foreign, "--label-map", MAP_TEXT) == 0
    report = json.loads((run_dir / "validation_report.json").read_text())
    assert report["images_usable"] == 12 and sum(report["labels_mapped"].values()) == sum(objects.values())
    for job_id, job in jobs_by_id(run_dir).items():
        arguments = [str(argument) for argument in job["arguments"]]
        given = [arguments[i + 1] for i, argument in enumerate(arguments) if argument == "--label-map"]
        assert given == ([MAP_TEXT] if job_id in JOBS_GIVEN_THE_MAP else []), job_id


def test_without_a_map_the_generated_workflow_is_what_it_was(data_sets, tmp_path):
    ours, _, _ = data_sets
    # Both runs have one name (the report job is given it), so only the map can differ.
    assert generate(tmp_path / "plain" / "run", ours) == 0
    assert generate(tmp_path / "mapped" / "run", ours, "--label-map", MAP_TEXT) == 0
    plain = (tmp_path / "plain" / "run" / "workflow.yml").read_text()
    assert "--label-map" not in plain
    # The map is the only difference: take its two arguments out and the jobs are the same.
    mapped = yaml.safe_load((tmp_path / "mapped" / "run" / "workflow.yml").read_text())
    for job in mapped["jobs"]:
        arguments = job["arguments"]
        if "--label-map" in arguments:
            at = arguments.index("--label-map")
            del arguments[at:at + 2]
    assert mapped["jobs"] == yaml.safe_load(plain)["jobs"]
