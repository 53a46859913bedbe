"""A run folder in the hands of a careless user: two runs at once, a rerun after an interrupt, a folder that
cannot be written. Each test here failed on the code before its fix."""

from __future__ import annotations

import fcntl
from pathlib import Path

import workflow as generator


def generate(run_dir: Path, data: Path, *extra: str) -> int:
    args = generator.get_args_parser().parse_args(
        ["--data", str(data), "--run-dir", str(run_dir), "--generate-only", *extra])
    return generator.main(args)


def test_a_second_run_into_a_folder_in_use_is_refused_before_it_writes(sample_dir, tmp_path, capsys):
    """A run rewrote the folder's workflow, settings and split while another executor ran in it, and only then
    met the executor's lock: the running one went on with files of other settings under it."""
    run_dir = tmp_path / "run"
    assert generate(run_dir, sample_dir) == 0
    before = {name: (run_dir / name).read_bytes() for name in ("workflow.yml", "config.yml", "split.csv")}
    with open(run_dir / ".executor.lock", "w") as held:  # as a running executor holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        capsys.readouterr()
        assert generate(run_dir, sample_dir, "--seed", "3", "--epochs", "5") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"workflow.py: {run_dir}: another run is using this folder (workflow.py or python -m "
                   "utils.executor); let it end, or choose another --run-dir"]
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    # once the other run has ended, the folder is free again
    assert generate(run_dir, sample_dir, "--seed", "3") == 0
