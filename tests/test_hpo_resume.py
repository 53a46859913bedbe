"""HPO killed outright (SIGKILL, out of memory), then rerun: what the killed job left in the journal's folder
does not stop the rerun, and the rerun ends with the trials an uninterrupted search gives."""

from __future__ import annotations

import os
import subprocess
import sys

from optuna.storages.journal import JournalFileSymlinkLock

from utils.detection.hpo import open_study

RERUN = """
from utils.detection.hpo import open_study
study, _ = open_study("runs/hpo.journal", "lock", seed=1)
trial = study.ask()
study.tell(trial, 0.5)
print("trials", len(study.trials))
"""


def test_a_lock_left_by_a_writer_killed_mid_write_does_not_hold_up_the_rerun(root, tmp_path, monkeypatch):
    """Optuna locks each journal write with a symlink <journal>.lock to the journal's path as given: a job given
    runs/hpo.journal linked runs/hpo.journal.lock -> runs/hpo.journal, which leads nowhere from runs/. Killed
    in the middle of a write, the job left that lock, and the rerun waited for it for ever, spinning (Optuna's
    grace period for a dead writer's lock reads the lock through the link, and gave up on one that dangles)."""
    monkeypatch.chdir(tmp_path)
    study, _ = open_study("runs/hpo.journal", "lock", seed=1)
    trial = study.ask()
    study.tell(trial, 0.25)
    with monkeypatch.context() as killed:
        killed.setattr(JournalFileSymlinkLock, "release", lambda self: None)  # the writer dies holding the lock
        study.set_user_attr("note", "the write a kill interrupted")
    lock = tmp_path / "runs" / "hpo.journal.lock"
    # the lock leads to the journal, whose age Optuna's grace period reads (another client of it is not held up)
    assert lock.is_symlink() and lock.resolve() == (tmp_path / "runs" / "hpo.journal").resolve()

    # the rerun, in a process of its own: on a lock that dangles Optuna spins for ever, and a test must not hang
    env = {**os.environ, "PYTHONPATH": str(root)}
    rerun = subprocess.run([sys.executable, "-c", RERUN], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "trials 2" in rerun.stdout
    assert "hpo.journal.lock: a lock left by a job killed while it wrote the journal; removed" in rerun.stderr
    assert not lock.is_symlink() and not lock.exists()
