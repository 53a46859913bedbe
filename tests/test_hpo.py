"""HPO: a killed study resumes with --n-trials counting the total; workers get disjoint lr slices; merging."""

from __future__ import annotations

import json
import math
import re

import optuna
import pytest
import torch
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from helpers import load_script, run_script
from utils import defaults as D
from utils.detection.hpo import HpoConfig, HpoError, SearchSpace, fitness, run_study
from utils.detection.hpo_study import open_study, recover_stale_trials, worker_seed
from utils.detection.hpo_results import journal_trials, merge_results, read_worker_results
from utils.detection.plots import write_hpo_plots
from utils.provenance import file_sha256

CONFIG = HpoConfig(epochs=1, image_size=96, workers=0, warmup_iters=1, seed=5)
SPACE = SearchSpace(batch_sizes=(2,))
DEFAULTS = {"lr": D.LR, "momentum": D.MOMENTUM, "weight_decay": D.WEIGHT_DECAY, "trainable_layers": D.TRAINABLE_LAYERS}


@pytest.fixture(scope="module")
def hpo_data(tmp_path_factory):
    """4 training and 3 validation images of 96x96."""
    from helpers import make_train_val

    return make_train_val(tmp_path_factory.mktemp("hpo"), num_train=4, num_val=3)


def study_run(hpo_data, journal, n_trials, **kwargs):
    return run_study(CONFIG, SPACE, hpo_data / "train" / "images", hpo_data / "train" / "annotations",
                     hpo_data / "val" / "images", hpo_data / "val" / "annotations", journal=journal,
                     n_trials=n_trials, device=torch.device("cpu"), **kwargs)


def finished(trials):
    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


@pytest.mark.training
def test_killed_study_resumes_and_counts_the_total(hpo_data, tmp_path):
    journal = tmp_path / "hpo.journal"
    journal.touch()  # the workflow's initial checkpoint is an empty file
    seen = {}  # bin/hpo.py's run record hashes the files the study read (its record once held no input)
    first = study_run(hpo_data, journal, n_trials=2, study_name="resume", inputs_seen=seen)
    assert first["trial_counts"]["finished"] == 2 and first["trials_resumed"] == 0
    assert len(seen) == 14 and all(sha256 == file_sha256(path) for path, sha256 in seen.items())
    assert first["best_value"] is not None and 0.0 <= first["best_value"] <= 1.0
    # the compliance error is reported with every finished trial (a number, or None when the
    # untrained model keeps no face at the threshold), never the objective
    assert set(first["best_metrics"]) == {"map", "map_50", "compliance_error_points", "per_image_mae_points"}
    epochs = [t["user_attrs"]["epoch_1"] for t in first["trials"] if "epoch_1" in t["user_attrs"]]
    assert epochs and all("compliance_error_points" in epoch for epoch in epochs)

    # Simulate a job killed in the middle of trial 3: a trial left RUNNING in the journal.
    study, _ = open_study(journal, "resume", seed=0)
    stale = study.ask()
    stale_params = SPACE.sample(stale)
    assert study.trials[-1].state == TrialState.RUNNING
    del study

    second = study_run(hpo_data, journal, n_trials=3, study_name="resume")
    assert second["requeued_stale_trials"] == [stale.number]
    assert second["trial_counts"]["finished"] == 3  # the total asked for, not 2 + 3
    assert second["trials_resumed"] == 2 and second["inputs_sha256"] == first["inputs_sha256"]
    assert second["trial_counts"]["fail"] == 1 and second["trial_counts"]["running"] == 0
    trials = optuna.load_study(study_name="resume", storage=open_study(journal, "resume", 0)[1]).trials
    assert len(finished(trials)) == 3
    rerun = finished(trials)[-1]
    assert rerun.params == pytest.approx(stale_params)  # the interrupted parameters were run again
    assert rerun.user_attrs["requeued_from"] == stale.number

    records = journal_trials(journal)  # what hpo_merge --journals reads
    assert [r["state"] for r in records].count("FAIL") == 1 and len(records) == 4
    # the first run's first trial ran the training defaults, and the resumed runs did not enqueue them again
    assert first["trials"][0]["params"] == pytest.approx(DEFAULTS) and first["trials"][0]["user_attrs"]["defaults"]
    assert [bool(t.user_attrs.get("defaults")) for t in trials] == [True, False, False, False]

    # A third run with the total already reached runs nothing.
    third = study_run(hpo_data, journal, n_trials=3, study_name="resume")
    assert third["trial_counts"] == second["trial_counts"]


def test_every_worker_of_any_accepted_seed_gets_a_seed_optuna_takes(tmp_path):
    """--seed 4294967295 (the flag's largest) once gave worker 1 the seed 2**32, which Optuna's sampler refuses."""
    assert [worker_seed(42, index) for index in range(3)] == [42, 43, 44]  # today's seeds unchanged
    largest = 2**32 - 1
    assert [worker_seed(largest, index) for index in range(3)] == [largest, 0, 1]
    for index in range(3):
        study, _ = open_study(tmp_path / f"w{index}.journal", f"w{index}", seed=worker_seed(largest, index))
        study.ask()


def test_workers_search_disjoint_slices_that_cover_the_range():
    slices = [SPACE.for_worker(i, 3) for i in range(3)]
    assert slices[0].lr_min == pytest.approx(SPACE.lr_min)
    assert slices[-1].lr_max == pytest.approx(SPACE.lr_max)
    for low, high in zip(slices, slices[1:]):
        assert low.lr_max == pytest.approx(high.lr_min)
    widths = [math.log(s.lr_max / s.lr_min) for s in slices]
    assert widths == pytest.approx([widths[0]] * 3)
    assert all(s.trainable_layers_max == SPACE.trainable_layers_max for s in slices)
    with pytest.raises(HpoError, match="worker index 3"):
        SPACE.for_worker(3, 3)


def test_fitness_is_computed_from_eval_mode_map():
    assert fitness({"map": 0.5, "map_50": 0.8}) == pytest.approx(0.1 * 0.8 + 0.9 * 0.5)
    assert fitness({"map": 0.5, "map_50": 0.8}, "map") == 0.5
    with pytest.raises(HpoError, match="no labelled faces"):
        fitness({"map": None, "map_50": None})


def fake_result(path, worker, value, params, trials):
    result = {"worker_index": worker, "objective": "fitness", "best_value": value, "best_params": params,
              "best_trial": 0, "fixed_params": {"optimizer": "sgd", "batch_size": 2},
              "full_search_space": SPACE.describe(), "search_space": SPACE.for_worker(worker, 2).describe(),
              "trial_counts": {"complete": len(trials)}, "trials": trials}
    path.write_text(json.dumps(result))
    return path


def trial(number, value, lr, state="COMPLETE"):
    return {"number": number, "state": state, "value": value, "intermediate_values": {"0": value or 0.0},
            "params": {"lr": lr, "momentum": 0.9, "weight_decay": 1e-4, "trainable_layers": 3}, "user_attrs": {}}


def test_merge_picks_the_best_worker_and_writes_plots(tmp_path, root):
    a = fake_result(tmp_path / "best_0.json", 0, 0.30, {"lr": 0.002}, [trial(0, 0.30, 0.002), trial(1, None, 0.003,
                                                                                                     "PRUNED")])
    b = fake_result(tmp_path / "best_1.json", 1, 0.42, {"lr": 0.02}, [trial(0, 0.42, 0.02), trial(1, 0.1, 0.04)])
    merged = merge_results(read_worker_results([a, b]))
    assert merged["params"] == {"lr": 0.02, "optimizer": "sgd", "batch_size": 2}
    assert merged["value"] == 0.42 and merged["source"] == str(b)

    hpo_merge = load_script(root, "hpo_merge")
    out = tmp_path / "merged"
    args = hpo_merge.get_args_parser().parse_args(
        ["--inputs", str(a), str(b), "--output", str(out / "best_hpo_params.json"),
         "--output-txt", str(out / "best_hpo_params.txt"), "--plots-dir", str(out)])
    assert hpo_merge.main(args) == 0
    saved = json.loads((out / "best_hpo_params.json").read_text())
    assert saved["params"]["lr"] == 0.02 and "param_importances" not in saved["plot_notes"]
    assert "lr = 0.02" in (out / "best_hpo_params.txt").read_text()
    for name in ("optimization_history.png", "param_importances.png"):
        assert (out / name).stat().st_size > 5000


def test_too_few_trials_for_importance_gives_a_note(tmp_path):
    single = fake_result(tmp_path / "best_0.json", 0, 0.3, {"lr": 0.002}, [trial(0, 0.3, 0.002)])
    notes = write_hpo_plots(read_worker_results([single]), tmp_path / "plots")
    assert "at least 2 completed trials" in notes["param_importances"]
    assert (tmp_path / "plots" / "param_importances.png").is_file()
    with pytest.raises(HpoError, match="no worker finished"):
        merge_results(read_worker_results([fake_result(tmp_path / "none.json", 0, None, None, [])]))


@pytest.mark.parametrize("text", [
    "[c for c in ().__class__.__base__.__subclasses__()][0]",  # eval() with no builtins ran this
    "FloatDistribution(low=().__class__, high=1.0)",
    "__import__('os').system('true')",
    "xyz",
    "FloatDistribution(",
])
def test_a_search_space_from_a_result_file_is_never_evaluated(tmp_path, text):
    path = fake_result(tmp_path / "best_0.json", 0, 0.3, {"lr": 0.002}, [trial(0, 0.3, 0.002)])
    result = json.loads(path.read_text())
    result["full_search_space"]["lr"] = text
    path.write_text(json.dumps(result))
    with pytest.raises(HpoError, match=r"best_0.json: full_search_space.lr: .* is not a search-space distribution"):
        read_worker_results([path])


def test_the_search_space_strings_read_back_as_the_distributions_written():
    from utils.detection.hpo_results import parse_distribution

    for name, distribution in SPACE.distributions().items():
        assert parse_distribution(repr(distribution)) == distribution, name


def test_a_journal_cut_mid_line_reads_again_and_a_damaged_one_is_one_error(tmp_path):
    journal = tmp_path / "hpo.journal"
    study, _ = open_study(journal, "cut", seed=1)
    for value in (0.1, 0.2):
        trial = study.ask()
        SPACE.sample(trial)
        study.tell(trial, value)
    del study
    whole = journal.read_bytes()
    journal.write_bytes(whole[:-40])  # a kill in the middle of appending the last entry
    assert [r["state"] for r in journal_trials(journal)].count("COMPLETE") == 1  # read-only: the file is kept
    assert journal.read_bytes() == whole[:-40]
    study, _ = open_study(journal, "cut", seed=1)  # the job's own journal: the half line is cut
    assert len(study.get_trials()) == 2 and journal.read_bytes().endswith(b"\n")
    for damage in (b"\x00\xff garbage\n", b'{"op_code": 99}\n'):
        bad = tmp_path / f"bad{len(damage)}.journal"
        bad.write_bytes(damage)
        with pytest.raises(HpoError, match="not a readable Optuna journal"):
            open_study(bad, "x", seed=1)
        with pytest.raises(HpoError, match="not a readable Optuna journal"):
            journal_trials(bad)


def test_a_resumed_study_does_not_draw_its_first_trials_again(tmp_path):
    # The sampler was seeded alike on every run: a search resumed after a kill drew the first run's
    # parameters again (a wasted trial that duplicates trial 0).
    journal = tmp_path / "hpo.journal"
    study, _ = open_study(journal, "again", seed=3)
    first = study.ask()
    params = SPACE.sample(first)
    study.tell(first, 0.5)
    del study
    resumed, _ = open_study(journal, "again", seed=3)
    assert SPACE.sample(resumed.ask()) != params


def _stand_in(trial) -> float:
    """A deterministic objective in place of training, peaked inside the space."""
    params = SPACE.sample(trial)
    return -(math.log10(params["lr"]) + 2.3) ** 2 - (params["momentum"] - 0.9) ** 2 - 0.01 * params["trainable_layers"]


def _searched(journal, n_trials: int, seed: int = 7) -> list[dict]:
    """A job of the search, as run_study runs it: open (or resume) the journal, fail and enqueue again a trial a
    killed job left running, run until *n_trials* are complete; the complete trials' parameters, in order."""
    study, storage = open_study(journal, "search", seed=seed)
    recover_stale_trials(study, storage)
    study.optimize(_stand_in, n_trials=n_trials - sum(t.state == TrialState.COMPLETE for t in study.trials))
    return [t.params for t in study.trials if t.state == TrialState.COMPLETE]


def test_a_search_stopped_or_killed_and_resumed_draws_what_an_uninterrupted_one_draws(tmp_path):
    """TPE seeded once draws from one random stream across trials: a search resumed in a new process (seeded again,
    or seeded past the trials done) drew other trials than an uninterrupted one with the same seed. Each trial's
    draws now depend only on the seed, its place among the trials that did not fail, and the trials before it.
    9 trials: past TPE's 5 random startup trials, so its model's draws are compared too."""
    whole = _searched(tmp_path / "whole.journal", 9)
    assert len(whole) == 9 and len({p["lr"] for p in whole}) == 9

    stopped = tmp_path / "stopped.journal"  # a job that ended after 3 trials (its time), then its retry
    assert _searched(stopped, 3) == whole[:3]
    assert _searched(stopped, 9) == whole

    killed = tmp_path / "killed.journal"  # a job killed in the middle of trial 6 (0-based), then its retry
    _searched(killed, 6)
    study, _ = open_study(killed, "search", seed=7)
    assert SPACE.sample(study.ask()) == whole[6]  # left RUNNING in the journal
    del study
    assert _searched(killed, 9) == whole  # its parameters ran again (enqueued), then the search went on alike

    assert _searched(tmp_path / "other.journal", 3, seed=8) != whole[:3]


def test_a_trial_whose_error_ended_the_job_is_not_drawn_again_by_the_retry(tmp_path):
    """A trial that failed with an error (CUDA out of memory at its batch size) took no place in the per-trial
    seeding, as an interrupted one does, so the retry drew its very parameters again from the same seed and
    history, and failed the same way on every retry. Only an interrupted trial (enqueued again) gives up its place."""
    journal = tmp_path / "hpo.journal"
    study, _ = open_study(journal, "oom", seed=7)
    study.optimize(_stand_in, n_trials=2)

    def out_of_memory(trial):
        SPACE.sample(trial)
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError):
        study.optimize(out_of_memory, n_trials=1)
    failed = study.trials[-1]
    assert failed.state == TrialState.FAIL
    del study
    retry, storage = open_study(journal, "oom", seed=7)  # the job's retry
    recover_stale_trials(retry, storage)
    assert SPACE.sample(retry.ask()) != failed.params


def test_a_study_is_not_continued_with_other_epochs_or_another_size(tmp_path):
    from dataclasses import replace

    from utils.detection.hpo import check_study_search

    journal = tmp_path / "hpo.journal"
    study, _ = open_study(journal, "fixed", seed=1)
    check_study_search(study, journal, CONFIG, SPACE)  # a new study records what it searches
    trial = study.ask()
    SPACE.sample(trial)
    study.tell(trial, 0.3)
    again, _ = open_study(journal, "fixed", seed=1)
    check_study_search(again, journal, CONFIG, SPACE)  # the same search continues
    for changed in (replace(CONFIG, epochs=2), replace(CONFIG, image_size=128)):
        with pytest.raises(HpoError, match="its study searched with (epochs=1|image_size=96), this run has"):
            check_study_search(again, journal, changed, SPACE)


def test_a_study_is_not_continued_on_other_data_or_with_another_label_map(tmp_path):
    # A journal rerun on other images, or with another --label-map, went on: its trials' values, measured on
    # the old data, were compared with the new ones and the best could be one of them.
    from dataclasses import replace

    from utils.classes import LabelMap
    from utils.detection.hpo import check_study_search

    journal = tmp_path / "hpo.journal"
    study, _ = open_study(journal, "data", seed=1)
    check_study_search(study, journal, CONFIG, SPACE, "a" * 64)
    trial = study.ask()
    SPACE.sample(trial)
    study.tell(trial, 0.3)
    again, _ = open_study(journal, "data", seed=1)
    check_study_search(again, journal, CONFIG, SPACE, "a" * 64)  # the same data continues
    with pytest.raises(HpoError, match=r"its study searched on other training or validation data \(inputs sha256 "
                                       r"aaaaaaaaaaaa…, this run's bbbbbbbbbbbb…\)"):
        check_study_search(again, journal, CONFIG, SPACE, "b" * 64)
    remapped = replace(CONFIG, label_map=LabelMap.parse("mask=with_mask"))
    with pytest.raises(HpoError, match=r"its study searched with label_map=\{\}, this run has \{'mask': 'with_mask'\}"):
        check_study_search(again, journal, remapped, SPACE, "a" * 64)


def test_a_journal_that_recorded_no_data_or_label_map_continues(tmp_path):
    """Journals written before the search record held the data's hash and the label map are not refused."""
    from utils.detection.hpo import check_study_search

    journal = tmp_path / "hpo.journal"
    study, _ = open_study(journal, "older", seed=1)
    check_study_search(study, journal, CONFIG, SPACE)
    recorded = dict(study.user_attrs["search"])
    del recorded["label_map"]
    study.set_user_attr("search", recorded)
    trial = study.ask()
    SPACE.sample(trial)
    study.tell(trial, 0.3)
    check_study_search(study, journal, CONFIG, SPACE, "c" * 64)


@pytest.mark.parametrize(("change", "words"), [
    ({"best_value": float("nan")}, "best_value: nan is not a finite number"),
    ({"best_value": "abc"}, "best_value: 'abc' is not a finite number"),
    ({"best_params": {"lr": [1]}}, "best_params.lr: [1] is not a number or a name"),
    ({"search_space": "abc"}, "search_space: 'abc' is not a mapping"),
    ({"trials": [{"number": 0}]}, "trials[0]: "),
    ({"trials": "x"}, "trials: 'x' is not a list of trials"),
    ({"worker_index": -1}, "worker_index: -1 is not a worker number"),
])
def test_a_malformed_worker_result_is_one_line_naming_the_field(tmp_path, change, words):
    path = fake_result(tmp_path / "best_0.json", 0, 0.3, {"lr": 0.002}, [trial(0, 0.3, 0.002)])
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(HpoError, match=re.escape(f"{path}: {words}")):
        read_worker_results([path])


def test_workers_of_another_search_are_not_merged(tmp_path):
    a = fake_result(tmp_path / "best_0.json", 0, 0.3, {"lr": 0.002}, [trial(0, 0.3, 0.002)])
    b = fake_result(tmp_path / "best_1.json", 0, 0.4, {"lr": 0.02}, [trial(0, 0.4, 0.02)])
    with pytest.raises(HpoError, match="worker_index 0 is also"):
        read_worker_results([a, b])
    b = fake_result(tmp_path / "best_1.json", 1, 0.4, {"lr": 0.02}, [trial(0, 0.4, 0.02)])
    for path, size in ((a, 512), (b, 640)):
        result = json.loads(path.read_text())
        result["fixed_params"]["image_size"] = size
        path.write_text(json.dumps(result))
    with pytest.raises(HpoError, match="trained with image_size=640"):
        read_worker_results([a, b])


def test_merge_refuses_journals_that_are_not_one_per_worker_or_not_journals(tmp_path, root, capsys):
    a = fake_result(tmp_path / "best_0.json", 0, 0.30, {"lr": 0.002}, [trial(0, 0.30, 0.002)])
    b = fake_result(tmp_path / "best_1.json", 1, 0.42, {"lr": 0.02}, [trial(0, 0.42, 0.02)])
    outputs = ["--output", tmp_path / "out" / "best.json", "--output-txt", tmp_path / "out" / "best.txt",
               "--plots-dir", tmp_path / "out"]
    journal = tmp_path / "hpo_0.journal"
    storage = JournalStorage(JournalFileBackend(str(journal)))
    study = optuna.create_study(study_name="mask-detection", storage=storage, direction="maximize")
    study.add_trial(optuna.trial.create_trial(params={"lr": 0.01}, value=0.3,
                                              distributions={"lr": optuna.distributions.FloatDistribution(1e-3, 1.0)}))
    # one journal for two workers: worker 1's trials were left out of the plots, unsaid
    capsys.readouterr()
    assert run_script(root, "hpo_merge", ["--inputs", a, b, "--journals", journal, *outputs]) == 2
    assert ("hpo_merge: error: --journals: 1 journal(s) for 2 worker result(s) (--inputs): give one per worker"
            in capsys.readouterr().err)
    # a file that is no journal read as an empty one: "no completed trial"
    for text in ("garbage\n", ""):
        other = tmp_path / "hpo_1.journal"
        other.write_text(text)
        assert run_script(root, "hpo_merge", ["--inputs", a, b, "--journals", journal, other, *outputs]) == 2
        err = capsys.readouterr().err
        assert f"hpo_merge: error: {other}: holds no Optuna study (not a journal of bin/hpo.py)" in err
    assert not (tmp_path / "out" / "best.json").exists()
    other.write_bytes(journal.read_bytes())
    assert run_script(root, "hpo_merge", ["--inputs", a, b, "--journals", journal, other, *outputs]) == 0
    # a journal of another search, whose trial lies outside the workers' space: a ValueError traceback, exit 1
    study.add_trial(optuna.trial.create_trial(params={"lr": 0.9}, value=0.5,
                                              distributions={"lr": optuna.distributions.FloatDistribution(1e-3, 1.0)}))
    capsys.readouterr()
    assert run_script(root, "hpo_merge", ["--inputs", a, b, "--journals", journal, other, *outputs]) == 2
    err = capsys.readouterr().err
    assert f"hpo_merge: error: {journal}: a trial does not fit the search space of the --inputs files" in err
    assert "Traceback" not in err


def test_merge_refuses_journals_given_in_another_order_than_their_workers(tmp_path, root, capsys):
    """Each best.json names its study (bin/hpo.py: mask-hpo-worker<i>of<n>); swapped journals drew each worker's
    trials under the other's line, and a journal also holding another search's study mixed its trials in."""
    space = {"lr": optuna.distributions.FloatDistribution(1e-3, 1.0)}
    results, journals = [], []
    for worker, lr in ((0, 0.01), (1, 0.02)):
        path = fake_result(tmp_path / f"best_{worker}.json", worker, 0.3 + worker / 10, {"lr": lr}, [])
        path.write_text(json.dumps({**json.loads(path.read_text()), "study_name": f"mask-hpo-worker{worker}of2"}))
        journal = tmp_path / f"hpo_{worker}.journal"
        storage = JournalStorage(JournalFileBackend(str(journal)))
        study = optuna.create_study(study_name=f"mask-hpo-worker{worker}of2", storage=storage, direction="maximize")
        study.add_trial(optuna.trial.create_trial(params={"lr": lr}, value=0.3 + worker / 10, distributions=space))
        results.append(path)
        journals.append(journal)
    outputs = ["--output", tmp_path / "out" / "best.json", "--output-txt", tmp_path / "out" / "best.txt",
               "--plots-dir", tmp_path / "out"]
    capsys.readouterr()
    assert run_script(root, "hpo_merge", ["--inputs", *results, "--journals", *journals[::-1], *outputs]) == 2
    assert (f"hpo_merge: error: {journals[1]}: holds the study 'mask-hpo-worker1of2', not 'mask-hpo-worker0of2' of "
            f"{results[0]}: give one journal per --inputs file, in the same order") in capsys.readouterr().err
    assert not (tmp_path / "out" / "best.json").exists()
    # another search's study in worker 0's journal: read for that worker's study only
    other = optuna.create_study(study_name="another-search", direction="maximize",
                                storage=JournalStorage(JournalFileBackend(str(journals[0]))))
    other.add_trial(optuna.trial.create_trial(params={"lr": 0.5}, value=0.9, distributions=space))
    assert [t["params"]["lr"] for t in journal_trials(journals[0], "mask-hpo-worker0of2")] == [0.01]
    assert len(journal_trials(journals[0])) == 2  # no study named: every study, as before
    assert run_script(root, "hpo_merge", ["--inputs", *results, "--journals", *journals, *outputs]) == 0


@pytest.mark.training
def test_a_training_image_too_thin_for_the_trials_sizes_is_a_listed_skip_not_a_crash(hpo_data, tmp_path):
    # 300x2 px at the trials' training sizes (64 to 128 px: 96 px, the default --multiscale) shrinks to no pixel row:
    # torchvision refused the trial's batch (RuntimeError), which ended the study with a traceback
    import shutil

    from PIL import Image

    from utils.data.voc import VocAnnotation, write_voc

    train = tmp_path / "train"
    shutil.copytree(hpo_data / "train", train)
    Image.new("RGB", (300, 2), (120, 90, 60)).save(train / "images" / "banner.png")
    write_voc(train / "annotations" / "banner.xml", VocAnnotation(filename="banner.png", width=300, height=2))
    result = run_study(CONFIG, SPACE, train / "images", train / "annotations", hpo_data / "val" / "images",
                       hpo_data / "val" / "annotations", journal=tmp_path / "hpo.journal", n_trials=1,
                       device=torch.device("cpu"), study_name="thin")
    assert result["trial_counts"]["finished"] == 1 and result["num_train_images"] == 4
    assert result["skipped_inputs"] == [{"file": str(train / "images" / "banner.png"), "problem": (
        "300x2 px is too thin to train on: at the smallest training size (64 px) the shorter side would shrink to "
        "0.43 px")}]


@pytest.mark.slow  # two processes that import optuna and matplotlib
def test_importance_plot_is_the_same_whatever_the_hash_seed(tmp_path, root):
    """Optuna lists the parameters from a set: with equal importances the bars' order followed PYTHONHASHSEED,
    so two runs with one seed drew two param_importances.png."""
    import os
    import subprocess
    import sys

    result = fake_result(tmp_path / "best_0.json", 0, 0.3, {"lr": 0.002},
                         [trial(0, 0.3, 0.002), trial(1, 0.3, 0.004)])
    code = ("import sys; from utils.detection.hpo_results import read_worker_results; "
            "from utils.detection.plots import write_hpo_plots; "
            "write_hpo_plots(read_worker_results([sys.argv[1]]), sys.argv[2])")
    pictures = []
    for seed in ("1", "2"):  # two seeds that order the four names apart
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(root), "MPLBACKEND": "Agg"}
        subprocess.run([sys.executable, "-c", code, str(result), str(tmp_path / seed)], env=env, check=True)
        pictures.append((tmp_path / seed / "param_importances.png").read_bytes())
    assert pictures[0] == pictures[1]
