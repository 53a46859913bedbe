"""A job refuses a missing or unreadable input before it imports torch: predict, predict_video, evaluate and serve
found a --model that a stopped job left as a stand-in only after torch's import. Each refusal keeps its line and
exit code 2; the check is the loader's own (utils.stop.require_job_output, which model_file.torch_load makes)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from utils.cli import require_model_files
from utils.errors import InputError
from utils.stop import STAND_IN_KEY

ROOT = Path(__file__).resolve().parents[1]

# runs each argv as the script's __main__ in one process, as test_edge_flags' torch test does, then says whether
# torch was imported by any of them
RUN_ALL = ("import runpy, sys\n"
           "for argv in sys.argv[1:]:\n"
           "    sys.argv = argv.split()\n"
           "    try:\n"
           "        runpy.run_path(sys.argv[0], run_name='__main__')\n"
           "    except SystemExit as end:\n"
           "        print('exit', end.code)\n"
           "print('loaded:', sorted(m for m in ('torch', 'torchvision') if m in sys.modules))\n")


@pytest.fixture
def inputs(tmp_path) -> dict:
    """A folder, a .tar shard, a plain file, a stand-in model file, a model file (bytes only: the checks before
    torch read no more) and paths that are not there."""
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
    return {"DIR": folder, "TAR": shard, "TXT": notes, "STANDIN": stand_in, "MODEL": model,
            "NONE": tmp_path / "none", "NONE_TAR": tmp_path / "none.tar", "NONE_JSON": tmp_path / "none.json",
            "NONE_CSV": tmp_path / "none.csv", "NONE_YAML": tmp_path / "none.yaml", "OUT": tmp_path / "out"}


# argv (names of the inputs fixture), the one error line after "<job>: error: "
REFUSALS = [
    ("bin/evaluate.py --images DIR --annotations DIR --model STANDIN --output-dir OUT",
     "STANDIN: a stand-in, not a model file: the job that writes it was stopped (SIGTERM) before it finished; "
     "rerun that job"),
    ("bin/predict.py --images DIR --model MODEL STANDIN --output-dir OUT",
     "STANDIN: a stand-in, not a model file: the job that writes it was stopped (SIGTERM) before it finished; "
     "rerun that job"),
    ("bin/predict_video.py --source TXT --model STANDIN --output-dir OUT",
     "STANDIN: a stand-in, not a model file: the job that writes it was stopped (SIGTERM) before it finished; "
     "rerun that job"),
]


def filled(text: str, inputs: dict) -> str:
    for name in sorted(inputs, key=len, reverse=True):  # NONE_JSON before NONE
        text = text.replace(name, str(inputs[name]))
    return text


def test_a_missing_or_unreadable_input_is_refused_before_torch_is_imported(inputs):
    argvs = [filled(argv, inputs) for argv, _ in REFUSALS]
    done = subprocess.run([sys.executable, "-c", RUN_ALL, *argvs], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    ends = [line for line in done.stdout.splitlines() if line.startswith(("exit ", "loaded: "))]
    assert ends == ["exit 2"] * len(REFUSALS) + ["loaded: []"], done.stderr
    errors = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    assert errors == [f"{Path(argv.split()[0]).stem}: error: {filled(line, inputs)}" for argv, line in REFUSALS]


def test_require_model_files_names_the_first_missing_or_stand_in(inputs):
    require_model_files([inputs["MODEL"]])
    with pytest.raises(InputError, match=f"^{inputs['NONE']}: model file not found$"):
        require_model_files([inputs["MODEL"], inputs["NONE"], inputs["STANDIN"]])
    with pytest.raises(InputError, match="stopped.pt: a stand-in, not a model file"):
        require_model_files([inputs["STANDIN"], inputs["NONE"]])
