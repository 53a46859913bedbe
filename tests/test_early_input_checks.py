"""A job refuses a missing or unreadable input before it imports torch: train, hpo, augment and evaluate found a
missing data folder or .tar, --params or --stages file, or --split-csv only after torch and the training modules
were imported (6-11 s on a 2-core machine), evaluate a missing set only after it had loaded the model too; train and
hpo found a missing --weights-file (or --weights PATH) only when the model was built, after the data sets had been
opened, paired and hashed (minutes on 100k photos); predict,
predict_video, evaluate and serve found a --model that a stopped job left as a stand-in only after torch's import.
Each refusal keeps its line and exit code 2; the checks are the loaders' own (utils.errors.require_set, which
utils.data.pairs.open_folder reads a set by, and utils.stop.require_job_output, which model_file.torch_load makes)."""

from __future__ import annotations

import socket
import tarfile
from pathlib import Path

import pytest

from helpers import run_in_one_process
from utils.cli import require_model_files, require_set_inputs
from utils.data.pairs import open_folder
from utils.detection.params import TrainingDataError, check_training_inputs
from utils.errors import InputError
from utils.stop import STAND_IN_KEY


@pytest.fixture
def inputs(tmp_path) -> dict:
    """A folder, a .tar shard, a plain file, a stand-in model file, a model file (bytes only: the checks before
    torch read no more), paths that are not there and a free port (serve checks --model before it binds one)."""
    folder = tmp_path / "set"
    folder.mkdir()
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w"):
        pass
    notes = tmp_path / "notes.txt"
    notes.write_text("not a set\n")
    stand_in = tmp_path / "stopped.pt"
    stand_in.write_text(f'{{"{STAND_IN_KEY}": "model.pt", "reason": "SIGTERM"}}')
    model = tmp_path / "model.pt"
    model.write_bytes(b"PK\x03\x04 not read before torch")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return {"DIR": folder, "TAR": shard, "TXT": notes, "STANDIN": stand_in, "MODEL": model,
            "NONE": tmp_path / "none", "NONE_TAR": tmp_path / "none.tar", "NONE_JSON": tmp_path / "none.json",
            "NONE_CSV": tmp_path / "none.csv", "NONE_YAML": tmp_path / "none.yaml", "NONE_PT": tmp_path / "none.pt",
            "OUT": tmp_path / "out",
            "PORT": port}


# argv (names of the inputs fixture), the one error line after "<job>: error: "
REFUSALS = [
    ("bin/train.py --images NONE --annotations DIR --output OUT/model.pt",
     "NONE: does not exist (expected a folder or a .tar archive)"),
    ("bin/train.py --images DIR --annotations TXT --output OUT/model.pt", "TXT: neither a folder nor a .tar archive"),
    ("bin/train.py --images DIR --annotations DIR --val-images DIR --val-annotations NONE --output OUT/model.pt",
     "NONE: does not exist (expected a folder or a .tar archive)"),
    ("bin/train.py --images DIR --annotations DIR --val-images DIR --output OUT/model.pt",
     "--val-images needs --val-annotations"),
    ("bin/train.py --images DIR --annotations DIR --params NONE_JSON --output OUT/model.pt",
     "NONE_JSON: params file not found"),
    ("bin/train.py --images DIR --annotations DIR --stages NONE_YAML --output OUT/model.pt",
     "--stages: stages file NONE_YAML not found"),
    ("bin/train.py --images DIR --annotations DIR --weights-file NONE_PT --output OUT/model.pt",
     "NONE_PT: weight file not found"),
    ("bin/train.py --images DIR --annotations DIR --weights-file DIR --output OUT/model.pt",
     "DIR: a folder, not a weight file"),  # not "not found": the folder is there
    # --weights PATH, as a mistyped kind (cocoo) is read
    ("bin/train.py --images DIR --annotations DIR --weights NONE_PT --output OUT/model.pt",
     "NONE_PT: weight file not found"),
    ("bin/train.py --images DIR --annotations DIR --weights-file STANDIN --output OUT/model.pt",
     "STANDIN: a stand-in, not a weight file: the job that writes it was stopped (SIGTERM) before it finished; "
     "rerun that job"),
    ("bin/hpo.py --train-images DIR --train-annotations DIR --val-images DIR --val-annotations DIR "
     "--weights-file NONE_PT --output OUT/best.json", "NONE_PT: weight file not found"),
    ("bin/hpo.py --train-images DIR --train-annotations DIR --val-images NONE --val-annotations DIR "
     "--output OUT/best.json", "NONE: does not exist (expected a folder or a .tar archive)"),
    ("bin/hpo.py --train-images TAR --train-annotations TXT --val-images DIR --val-annotations DIR "
     "--output OUT/best.json", "TXT: neither a folder nor a .tar archive"),
    ("bin/augment.py --images TAR NONE_TAR --output-dir OUT", "NONE_TAR: does not exist (expected a .tar shard)"),
    ("bin/augment.py --images TAR DIR --output-dir OUT", "DIR: several inputs must all be .tar shards"),
    ("bin/augment.py --images DIR --split-csv NONE_CSV --output-dir OUT", "NONE_CSV: No such file or directory"),
    ("bin/evaluate.py --images NONE --annotations DIR --model MODEL --output-dir OUT",
     "NONE: does not exist (expected a folder or a .tar archive)"),
    ("bin/evaluate.py --images DIR --annotations NONE --model MODEL --output-dir OUT",
     "NONE: does not exist (expected a folder or a .tar archive)"),
    ("bin/evaluate.py --images DIR --annotations DIR --model STANDIN --output-dir OUT",
     "STANDIN: a stand-in, not a model file: the job that writes it was stopped (SIGTERM) before it finished; "
     "rerun that job"),
    ("bin/predict.py --images DIR --model MODEL STANDIN --output-dir OUT",
     "STANDIN: a stand-in, not a model file: the job that writes it was stopped (SIGTERM) before it finished; "
     "rerun that job"),
    ("bin/predict_video.py --source TXT --model STANDIN --output-dir OUT",
     "STANDIN: a stand-in, not a model file: the job that writes it was stopped (SIGTERM) before it finished; "
     "rerun that job"),
    ("bin/serve.py --model STANDIN --port PORT",
     "STANDIN: a stand-in, not a model file: the job that writes it was stopped (SIGTERM) before it finished; "
     "rerun that job"),
]


def filled(text: str, inputs: dict) -> str:
    for name in sorted(inputs, key=len, reverse=True):  # NONE_JSON before NONE
        text = text.replace(name, str(inputs[name]))
    return text


def test_a_missing_or_unreadable_input_is_refused_before_torch_is_imported(inputs):
    ends, errors = run_in_one_process([filled(argv, inputs) for argv, _ in REFUSALS])
    assert ends == ["exit 2"] * len(REFUSALS) + ["loaded: []"], errors
    assert errors == [f"{Path(argv.split()[0]).stem}: error: {filled(line, inputs)}" for argv, line in REFUSALS]


def test_open_folder_refuses_as_the_early_check_does(inputs):
    """One rule, said the same way before torch (require_set_inputs) and when the set is read (open_folder)."""
    for given in (inputs["NONE"], inputs["TXT"], [inputs["TAR"], inputs["NONE_TAR"]], [inputs["TAR"], inputs["DIR"]]):
        with pytest.raises((InputError, OSError)) as early:
            require_set_inputs(given)
        with pytest.raises(type(early.value)) as reading, open_folder(given):
            pass
        assert str(reading.value) == str(early.value)
    require_set_inputs(inputs["DIR"], [inputs["TAR"], inputs["TAR"]])  # a folder, shards: read as sets
    with open_folder(inputs["DIR"]) as folder:
        assert folder == inputs["DIR"]


def test_annotations_read_from_the_images_own_paths_are_checked_once(inputs, monkeypatch):
    """--annotations naming the --images path (or shards) again opened each .tar's first header twice."""
    from utils import cli

    checked = []
    monkeypatch.setattr(cli, "require_set", checked.append)
    shards = [inputs["TAR"], inputs["TAR"]]
    require_set_inputs(inputs["DIR"], str(inputs["DIR"]))
    require_set_inputs(shards, tuple(shards))
    require_set_inputs(inputs["DIR"], inputs["TAR"])  # other paths: both checked
    assert checked == [inputs["DIR"], shards, inputs["DIR"], inputs["TAR"]]


def test_require_model_files_names_the_first_missing_or_stand_in(inputs):
    require_model_files([inputs["MODEL"]])
    with pytest.raises(InputError, match=f"^{inputs['NONE']}: model file not found$"):
        require_model_files([inputs["MODEL"], inputs["NONE"], inputs["STANDIN"]])
    with pytest.raises(InputError, match="stopped.pt: a stand-in, not a model file"):
        require_model_files([inputs["STANDIN"], inputs["NONE"]])
    # something there that is no file is said as what it is, not as missing
    with pytest.raises(InputError, match=f"^{inputs['DIR']}: a folder, not a model file$"):
        require_model_files([inputs["DIR"]])
    with pytest.raises(InputError, match="^/dev/null: a special file, not a model file$"):
        require_model_files(["/dev/null"])


def test_check_training_inputs_returns_what_it_read(inputs, tmp_path):
    """train reads its --params and --stages once, before torch, and hands them to resolve_training."""
    from types import SimpleNamespace

    params = tmp_path / "best.json"
    params.write_text('{"best_params": {"lr": 0.02}, "best_value": 0.5}')
    args = SimpleNamespace(images=str(inputs["DIR"]), annotations=str(inputs["TAR"]), val_images=None,
                           val_annotations=str(inputs["DIR"]), params=str(params), stages='[{"epochs": 2}]',
                           weights=None, weights_file=str(inputs["MODEL"]))
    with pytest.raises(TrainingDataError, match="^--val-annotations needs --val-images$"):
        check_training_inputs(args)
    args.val_images = str(inputs["DIR"])
    params_file, stages = check_training_inputs(args)
    assert params_file == {"lr": 0.02} and [stage.epochs for stage in stages] == [2]


def test_the_weight_file_is_refused_early_as_its_loader_refuses_it(inputs, monkeypatch):
    """train's and hpo's check of the starting weights' file before torch: the file build_model would read (none
    when --weights none sets --weights-file aside), refused in model_file.torch_load's words, an unreadable one
    too (open() refused here as a file without read permission is, which root, running the tests, reads anyway)."""
    from utils import stop
    from utils.detection.params import require_weight_file

    require_weight_file("none", inputs["NONE_PT"])  # set aside: build_model does not read it
    require_weight_file("coco", None)
    require_weight_file(None, inputs["MODEL"])
    with pytest.raises(InputError, match=f"^{inputs['NONE_PT']}: weight file not found$"):
        require_weight_file("imagenet", inputs["NONE_PT"])
    with pytest.raises(InputError, match=f"^{inputs['DIR']}: a folder, not a weight file$"):
        require_weight_file(str(inputs["DIR"]), inputs["MODEL"])  # --weights PATH wins over --weights-file

    def no_permission(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(stop, "open", no_permission, raising=False)  # utils.stop's open() only
    model = inputs["MODEL"]
    with pytest.raises(InputError) as refused:
        require_weight_file(None, model)
    # what model_file.torch_load said when torch.load's own open() raised it (checkpoint.torch_file_problem)
    assert str(refused.value) == f"{model}: not a readable weight file (PermissionError: [Errno 13] Permission " \
                                 f"denied: '{model}')"
