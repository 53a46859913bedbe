"""What users read agrees with the code, where a claim can be checked by reading files: README's table of the
jobs' outputs against the files the workflow declares, and each bin/ script's --help exit codes against the
SIGTERM handling it has. No job runs and nothing imports torch."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from utils.data.validation import MANIFEST_NAME, REPORT_NAME
from utils.naming import OUTPUTS

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_FOLDS = ROOT / "tests" / "golden" / "workflow_folds.yml"  # pinned by test_workflow_generate.py
FILE_NAME = re.compile(r"[\w<>.-]+\.(?:json|txt|csv|png|tar|pt|html)(?:/\.\w+)*")


def readme_job_table() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text.split("## The jobs and what each writes", 1)[1].split("\n## ", 1)[0]


def named_files(text: str) -> set[str]:
    """The file names in `code spans` of *text*; `a.png/.csv` names a.png and a.csv."""
    names = set()
    for span in re.findall(r"`([^`]+)`", text):
        if FILE_NAME.fullmatch(span):
            first, *extensions = span.split("/")
            names |= {first, *(first.rsplit(".", 1)[0] + extension for extension in extensions)}
    return names


def generic_forms(name: str) -> set[str]:
    """*name* as README writes a tagged file: untagged (model_fold0.pt: model.pt, the final model's), or with its
    tag's number as a placeholder (best_0.json: best_<i>.json, predictions_shard-000000.json:
    predictions_<shard>.json)."""
    generic = re.sub(r"shard-\d+", "<shard>", re.sub(r"fold\d+", "fold<i>", re.sub(r"_\d+(?=[._])", "_<i>", name)))
    return {name, re.sub(r"_fold\d+", "", name), generic}


def workflow_outputs(staged_only: bool) -> set[str]:
    """The outputs the --folds --fold-ensemble workflow declares (every job kind but predict_video, whose names
    come from utils/naming.py), less the run records: README says once that every job writes one."""
    jobs = yaml.safe_load(GOLDEN_FOLDS.read_text(encoding="utf-8"))["jobs"]
    names = {use["lfn"] for job in jobs for use in job["uses"]
             if use["type"] == "output" and (use.get("stageOut") or not staged_only)}
    names |= set(OUTPUTS["predict_video"].values())
    return {name for name in names if not name.endswith("_run.json")}


def test_readme_names_every_file_the_workflow_stages_out():
    listed = named_files(readme_job_table())
    missing = sorted(name for name in workflow_outputs(staged_only=True) if not generic_forms(name) & listed)
    assert not missing, f"README's job table does not name {missing}"


def test_every_file_readmes_job_table_names_is_written():
    written = {form for name in workflow_outputs(staged_only=False) for form in generic_forms(name)}
    written |= {REPORT_NAME, MANIFEST_NAME, "split.csv"}  # written at generation (utils/pegasus/inputs.py)
    unknown = sorted(named_files(readme_job_table()) - written)
    assert not unknown, f"README's job table names files no job writes: {unknown}"


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "bin").glob("*.py")))
def test_a_script_that_stops_on_sigterm_gives_its_exit_code_in_help(script):
    """utils.cli.run_job exits 143 when SIGTERM stopped a job that stops on it (utils/stop.py); its --help (the
    module docstring) lists the exit codes, and train's and hpo's left 143 out."""
    source = (ROOT / "bin" / script).read_text(encoding="utf-8")
    if "stop_on_sigterm()" in source:
        assert "143" in ast.get_docstring(ast.parse(source)), f"bin/{script} --help does not say it exits 143"
