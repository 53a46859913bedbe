"""HPO killed outright (SIGKILL, out of memory), then rerun: what the killed job left in the journal's folder
does not stop the rerun, and the rerun ends with the trials an uninterrupted search gives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import optuna
import pytest
import torch
from optuna.storages.journal import JournalFileSymlinkLock

from utils.detection.hpo import HpoConfig, SearchSpace, run_study
from utils.detection.hpo_study import STALE_LOCK_S, open_study, worker_seed

CONFIG = HpoConfig(epochs=1, image_size=96, workers=0, warmup_iters=1, seed=5)
SPACE = SearchSpace(batch_sizes=(2,))

RERUN = """
from utils.detection.hpo_study import open_study
study, _ = open_study("runs/hpo.journal", "lock", seed=1)
trial = study.ask()
study.tell(trial, 0.5)
print("trials", len(study.trials))
"""


@pytest.mark.slow  # over 5 s on a quiet 2-core machine
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
    past = time.time() - STALE_LOCK_S - 1  # the rerun comes later than a write could take
    os.utime(lock, (past, past), follow_symlinks=False)

    # the rerun, in a process of its own: on a lock that dangles Optuna spins for ever, and a test must not hang
    env = {**os.environ, "PYTHONPATH": str(root)}
    rerun = subprocess.run([sys.executable, "-c", RERUN], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "trials 2" in rerun.stdout
    assert "hpo.journal.lock: a lock left by a job killed while it wrote the journal; removed" in rerun.stderr
    assert not lock.is_symlink() and not lock.exists()


def test_a_job_starting_leaves_the_lock_of_another_workers_write_in_progress(tmp_path):
    """Two workers given one journal by hand (bin/hpo.py's --checkpoint defaults to hpo.journal for every worker):
    the lock of the first one's write in progress is not the second's to remove as a dead writer's. Removed, the
    first one's release of it failed ("did not possess lock") and its search ended in that error."""
    journal = tmp_path / "hpo.journal"
    open_study(journal, "worker0", seed=1)
    writing = JournalFileSymlinkLock(str(journal))  # the other worker, in the middle of a write
    assert writing.acquire()
    released = []
    releaser = threading.Timer(0.5, lambda: released.append(writing.release() is None))
    releaser.start()
    _, storage = open_study(journal, "worker1", seed=2)  # waits for the write, then writes its own
    releaser.join()
    assert released == [True]  # the other worker's write ended as it began: with its lock
    assert sorted(optuna.get_all_study_names(storage)) == ["worker0", "worker1"]


def test_a_trial_the_journal_holds_but_the_events_lack_is_written_by_the_rerun(tmp_path):
    """Optuna writes a finished trial to the journal, then calls the callbacks (the TensorBoard events) after a
    garbage collection: a job killed in between held the trial in its journal, never in its events, and the
    rerun in that folder wrote only the events of the trials it ran (the journal's were written only into an
    empty folder), so TensorBoard lacked the trial for good."""
    from helpers import make_train_val
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from utils.detection.tensorboard_log import HpoBoard

    data = make_train_val(tmp_path / "data", num_train=2, num_val=2)
    journal, log_dir = tmp_path / "hpo.journal", tmp_path / "tensorboard" / "hpo_0"
    study, _ = open_study(journal, "tb", seed=worker_seed(CONFIG.seed, 0))

    def stand_in(trial) -> float:  # in place of training: the events are what is tested
        return SPACE.sample(trial)["momentum"]

    board = HpoBoard(log_dir, CONFIG.objective)
    study.optimize(stand_in, n_trials=2, callbacks=[board])
    board.close()
    study.optimize(stand_in, n_trials=1)  # trial 2: in the journal; the job was killed before its callback
    # the rerun: the study holds the trials asked for, so it trains nothing
    result = run_study(CONFIG, SPACE, data / "train" / "images", data / "train" / "annotations",
                       data / "val" / "images", data / "val" / "annotations", journal=journal, n_trials=3,
                       device=torch.device("cpu"), study_name="tb", tensorboard_dir=log_dir)
    assert result["trial_counts"]["complete"] == 3
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    written = [(event.step, event.value) for event in events.Scalars("hpo/fitness")]
    assert [step for step, _ in written] == [0, 1, 2]  # each trial once: the two the folder held are not again
    assert [value for _, value in written] == pytest.approx([t["value"] for t in result["trials"]])  # float32
    assert sorted(p.name for p in log_dir.iterdir() if p.is_dir()) == ["trial_0000", "trial_0001", "trial_0002"]


def hpo_command(root, data, out, n_trials: int) -> list[str]:
    return [sys.executable, str(root / "bin" / "hpo.py"), "--train-images", str(data / "train" / "images"),
            "--train-annotations", str(data / "train" / "annotations"), "--val-images", str(data / "val" / "images"),
            "--val-annotations", str(data / "val" / "annotations"), "--epochs", "2", "--n-trials", str(n_trials),
            "--image-size", "96", "--batch-sizes", "2", "--workers", "0", "--weights", "none", "--warmup-iters", "1",
            "--checkpoint", str(out / "hpo.journal"), "--output", str(out / "best.json"), "--device", "cpu"]


def finished_trials(best: dict) -> list[tuple]:
    return [(t["params"], t["value"], t["intermediate_values"]) for t in best["trials"]
            if t["state"] in ("COMPLETE", "PRUNED")]


@pytest.mark.training
def test_a_search_sigkilled_mid_trial_reruns_that_trial_and_ends_as_an_uninterrupted_one(root, tmp_path):
    """SIGKILL gives the job no chance to mark its trial failed (as a SIGTERM does): the trial is left RUNNING in
    the journal. The rerun fails it, runs its parameters again, counts only finished trials towards --n-trials,
    and ends with the trials, values and best of a search never interrupted; best.json and its run record say
    how many finished trials the journal held and which trial was run again."""
    from helpers import make_train_val, run_script
    from utils.detection.hpo_results import journal_trials

    data = make_train_val(tmp_path / "data", num_train=4, num_val=3)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir()
    killed.mkdir()
    # the uninterrupted search and the last rerun in-process (as their __main__ runs them): the claims about a process
    # are the killed one's; a process of its own added only the seconds of importing torch
    assert run_script(root, "hpo", hpo_command(root, data, whole, 2)[2:]) == 0
    process = subprocess.Popen(hpo_command(root, data, killed, 2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    for line in process.stderr:
        if line.startswith("trial 1 epoch 1/2"):  # trial 1 trains its second epoch
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    process.stderr.close()
    assert [t["state"] for t in journal_trials(killed / "hpo.journal")] == ["COMPLETE", "RUNNING"]
    assert run_script(root, "hpo", hpo_command(root, data, killed, 2)[2:]) == 0
    first, again = (json.loads((folder / "best.json").read_text()) for folder in (whole, killed))
    assert finished_trials(again) == finished_trials(first)
    assert (again["best_params"], again["best_value"]) == (first["best_params"], first["best_value"])
    assert again["requeued_stale_trials"] == [1] and again["trials_resumed"] == 1
    assert [t["state"] for t in again["trials"]] == ["COMPLETE", "FAIL", "COMPLETE"]
    record = json.loads((killed / "best_run.json").read_text())["params"]
    assert record["trials_resumed"] == 1 and record["requeued_stale_trials"] == [1]
