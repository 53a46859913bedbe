"""Job time limits from the workload (utils/pegasus/runtimes.py): large sets get long limits, a time
budget bounds train, sites.yml overrides and caps them, bad entries are one-line errors."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from utils.data.shards import INDEX_CSV, INDEX_CSV_FIELDS
from utils.detection.inference_size import candidate_sizes, choice_passes, largest_size_cost
from utils.pegasus.config import ConfigError, ShardFile, SplitEntry
from utils.pegasus.runtimes import (GRACE_MIN, MIN_RUNTIME_S, SAFETY, SECONDS_PER_IMAGE, STARTUP_S,
                                    checkpoint_minutes, job_runtimes)


def config(train=70, val=10, test=20, pred=20, site=None, **overrides):
    # job_runtimes counts entries per split only, so one entry stands for each of its split's images (a
    # Path per image made the 500,000-image cases take 20 s)
    entries = [entry for split, n in (("train", train), ("val", val), ("test", test))
               for entry in [SplitEntry(Path(f"{split}.jpg"), Path(f"{split}.xml"), split)] * n]
    values = dict(entries=entries, pred_shards=[ShardFile(Path("pred.tar"), pred)], pred_videos=[], video_stride=5,
                  gpus=0, image_size=512,
                  augment_copies=0, rare_factor=0, trials=2, hpo_jobs=2, hpo_epochs=1, epochs=2, time_budget=None)
    values.update(overrides)
    return SimpleNamespace(**values, execution_site_config=lambda: site or {})


def test_small_jobs_get_the_minimum_and_large_ones_grow_with_their_images():
    runtimes = job_runtimes(config())
    assert runtimes["hpo_merge"] == MIN_RUNTIME_S
    big = job_runtimes(config(pred=100_000))
    assert big["predict"] >= SAFETY * 100_000 * SECONDS_PER_IMAGE["cpu"]["infer"]  # ~3 days, not 25 minutes
    assert job_runtimes(config(pred=100_000, gpus=1))["predict"] < big["predict"]
    # fanned out, a predict job's limit follows its own shard, not the whole set
    shards = [ShardFile(Path(f"shard-{i}.tar"), 1000) for i in range(100)]
    assert job_runtimes(config(pred_shards=shards))["predict"] < big["predict"] / 50
    assert job_runtimes(config(epochs=20))["train"] > job_runtimes(config(epochs=2))["train"]
    assert job_runtimes(config(image_size=1024))["train"] > job_runtimes(config(image_size=512))["train"]


def _index_csv(folder: Path, names: list[str]) -> None:
    """A shard folder's index.csv (bin/make_shards.py) naming *names*, its shards left out."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INDEX_CSV).write_text(",".join(INDEX_CSV_FIELDS) + "\n"
                                    + "".join(f"{name},shard-000000.tar,1,x,\n" for name in names))


def test_the_merge_limit_counts_a_figure_per_folder_of_the_prediction_images(tmp_path):
    # merge_predictions bootstraps every folder's figure (0.01-0.15 s a folder, whatever its size): 100k images in
    # 10k folders took the 300 s minimum (1e-4 s an image), up to 25 minutes of work
    images = 100_000
    _index_csv(tmp_path / "sites", [f"site{i % 10_000:05d}/img{i:06d}.jpg" for i in range(images)])
    _index_csv(tmp_path / "flat", [f"img{i:06d}.jpg" for i in range(images)])
    shards = [ShardFile(tmp_path / "sites" / "shard-000000.tar", images)]
    foldered = job_runtimes(config(pred_shards=shards))["merge_predictions"]
    assert foldered >= STARTUP_S + SAFETY * 10_000 * 0.1
    flat = job_runtimes(config(pred_shards=[ShardFile(tmp_path / "flat" / "shard-000000.tar", images)]))
    assert flat["merge_predictions"] < foldered / 10  # one folder: one figure, no figure per folder
    # a set without an index (each image may be in its own folder) is counted at its worst
    unindexed = [ShardFile(tmp_path / "none" / "shard-000000.tar", 20_000)]
    assert job_runtimes(config(pred_shards=unindexed))["merge_predictions"] >= SAFETY * 20_000 * 0.1


def test_the_folders_are_counted_as_the_index_is_read_not_from_every_images_row_held(tmp_path):
    # The generator held every row of index.csv to count the folders: ~330 bytes an image, ~330 MB for a million.
    import tracemalloc

    from utils.pegasus.runtimes import _figures_per_folder

    peaks = {}
    for images in (5_000, 50_000):
        _index_csv(tmp_path / str(images), [f"site{i % 100:03d}/img{i:06d}.jpg" for i in range(images)])
        stand_in = config(pred_shards=[ShardFile(tmp_path / str(images) / "shard-000000.tar", images)])
        tracemalloc.start()
        assert _figures_per_folder(stand_in) == 100
        peaks[images] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[50_000] < 2 * peaks[5_000], peaks  # held, the rows made it ~10 times


def test_a_time_budget_bounds_the_train_job():
    runtimes = job_runtimes(config(train=5000, epochs=50, time_budget=60))
    assert 60 * 60 < runtimes["train"] < 2 * 60 * 60


def test_a_staged_budget_run_gets_at_least_one_epoch_per_stage():
    from utils.detection.stages import parse_stages

    stages = parse_stages([{"epochs": 1, "trainable_layers": 0}, {"epochs": 3}])
    # an 8-minute budget on 469 training images at 512 px: each stage still trains one whole epoch
    staged = job_runtimes(config(train=469, val=67, time_budget=8, train_stages=stages, train_epochs=4))
    plain = job_runtimes(config(train=469, val=67, time_budget=8))
    one_epoch = job_runtimes(config(train=469, val=67, epochs=1))["train"]
    # (each job also holds the choice of working size, TTA, voting and threshold after training, once per job)
    choice = SAFETY * 67 * SECONDS_PER_IMAGE["cpu"]["infer"] * choice_passes(512)
    assert plain["train"] < staged["train"]
    assert staged["train"] - STARTUP_S - choice > 1.8 * (one_epoch - STARTUP_S - choice)


def test_the_train_limit_counts_the_choice_made_after_training():
    """The working size, flip TTA, box voting and threshold are chosen on the validation images after the last
    epoch: five sizes up to twice the training size, a flipped pass and a voted one (flipped at most), about 28
    plain passes, which a large validation split makes longer than the epochs' own passes."""
    assert 27 < choice_passes(512) < 29
    small, large = (job_runtimes(config(train=3000, val=val, time_budget=60))["train"] for val in (10, 3000))
    infer = SECONDS_PER_IMAGE["cpu"]["infer"]
    assert large - small == pytest.approx(SAFETY * 2990 * infer * choice_passes(512), abs=2)
    assert large > STARTUP_S + 1.25 * 3600 + SAFETY * 3000 * infer * 27  # not one pass: about 28
    folds = job_runtimes(config(train=3000, val=3000, time_budget=60, folds=3))
    assert folds["train_fold"] - small == pytest.approx(SAFETY * (2000 - 10) * infer * choice_passes(512), abs=2)


def test_jobs_running_the_trained_model_count_the_dearest_working_size_and_tta_it_may_choose():
    """evaluate, predict and video run at the working size and flip TTA chosen after training, unknown when the
    workflow is planned: the largest size tried (1,024 px for a 512 px model, 4x the pixels), each image twice
    (flip), and evaluate once more for its test loss."""
    assert candidate_sizes(512)[-1] == 1024 and largest_size_cost(512) == pytest.approx(4.0)
    assert largest_size_cost(1024) == pytest.approx((1280 / 1024) ** 2)  # the sizes tried stop at 1,280 px
    infer = SECONDS_PER_IMAGE["gpu"]["infer"]
    runtimes = job_runtimes(config(pred=10_000, test=5_000, gpus=1))
    assert runtimes["predict"] == pytest.approx(STARTUP_S + SAFETY * 10_000 * infer * 4 * 2, abs=1)
    assert runtimes["evaluate"] == pytest.approx(STARTUP_S + SAFETY * 5_000 * infer * 4 * 3, abs=1)
    # the epochs' own validation passes run at the training size, plain: the train limit does not grow with it
    assert job_runtimes(config(pred=10, epochs=3))["train"] == job_runtimes(config(pred=10_000, epochs=3))["train"]


def test_a_fold_ensemble_predict_job_counts_one_pass_per_fold_model():
    """--fold-ensemble: every predict job runs the K fold models on each image, each at its own working size
    (the workflow gives the ensemble no --tta), so ten folds cost five times the final model's two passes."""
    infer = SECONDS_PER_IMAGE["cpu"]["infer"]
    single = job_runtimes(config(pred=10_000, folds=10))["predict"]
    ensemble = job_runtimes(config(pred=10_000, folds=10, fold_ensemble=True))["predict"]
    assert single == pytest.approx(STARTUP_S + SAFETY * 10_000 * infer * 4 * 2, abs=1)
    assert ensemble == pytest.approx(STARTUP_S + SAFETY * 10_000 * infer * 4 * 10, abs=1)


def test_a_fold_ensemble_video_job_counts_one_pass_per_fold_model_as_its_predict_job_does():
    """--fold-ensemble runs the videos through the K fold models too: a processed frame costs K passes, where the
    limit counted the final model's two."""
    from utils.pegasus.config import VideoFile
    from utils.pegasus.runtimes import VIDEO_DECODE_S_PER_FRAME

    infer, video = SECONDS_PER_IMAGE["cpu"]["infer"], [VideoFile(Path("v.mp4"), 10_000)]
    single = job_runtimes(config(folds=10, pred_videos=video))["predict_video"]
    ensemble = job_runtimes(config(folds=10, fold_ensemble=True, pred_videos=video))["predict_video"]
    assert single == pytest.approx(STARTUP_S + SAFETY * 10_000 * (VIDEO_DECODE_S_PER_FRAME + infer * 4 * 2 / 5),
                                   abs=1)
    assert ensemble == pytest.approx(STARTUP_S + SAFETY * 10_000 * (VIDEO_DECODE_S_PER_FRAME + infer * 4 * 10 / 5),
                                     abs=1)


def test_fold_jobs_train_on_the_other_folds_train_split_and_validate_on_their_val_split():
    plain = job_runtimes(config(train=3000, val=600, test=20, epochs=4))
    folds = job_runtimes(config(train=3000, val=600, test=20, epochs=4, folds=3))
    assert "train_fold" not in plain and folds["train"] == plain["train"]
    # 2/3 of the train split to train on and 2/3 of the val split to validate on: less than the final model
    assert MIN_RUNTIME_S < folds["train_fold"] < folds["train"]
    # the held-out third of the 3,600-image pool is what a fold's evaluation reads
    assert folds["evaluate_fold"] > folds["evaluate"]
    budget = job_runtimes(config(train=3000, val=600, test=20, time_budget=30, folds=3))
    assert 30 * 60 < budget["train_fold"] <= budget["train"]


def test_sites_yml_overrides_and_caps():
    assert job_runtimes(config(site={"runtimes": {"train": 36000}}))["train"] == 36000
    with pytest.raises(ConfigError, match="unknown job kind 'trian'"):
        job_runtimes(config(site={"runtimes": {"trian": 36000}}))
    with pytest.raises(ConfigError, match="train: '10h' is not a positive number of seconds"):
        job_runtimes(config(site={"runtimes": {"train": "10h"}}))
    # YAML's true is an int to Python, and a runtimes: that is no mapping was an AttributeError
    for runtimes, words in ((True, "train: True is not"), ("36000", "runtimes: '36000' is not a mapping")):
        with pytest.raises(ConfigError, match=words):
            job_runtimes(config(site={"runtimes": {"train": runtimes} if runtimes is True else runtimes}))
    with pytest.raises(ConfigError, match="runtimes: \\[36000\\] is not a mapping"):
        job_runtimes(config(site={"runtimes": [36000]}))
    assert checkpoint_minutes(7200) == (120, 120 + GRACE_MIN)
    assert checkpoint_minutes(36000, max_job_minutes=120) == (120 - GRACE_MIN, 120)  # trained in pieces
    with pytest.raises(ConfigError, match="max_job_minutes"):
        checkpoint_minutes(7200, max_job_minutes=3)


def test_the_video_limit_counts_decoding_every_frame_not_only_the_strided_ones():
    """predict_video decodes every frame (OpenCV's read()) and runs the model on every --video-stride-th: a limit
    of the strided frames' inference alone stopped a long 4K video at a large stride (2 hours at 30 fps, stride
    300, on a GPU: a limit of 1044 s, where reading its 216,000 frames takes ~2000 s at 9.2 ms a 4K frame)."""
    from utils.pegasus.config import VideoFile
    from utils.pegasus.runtimes import over_site_cap

    frames = 2 * 3600 * 30
    video = [VideoFile(Path("long.mp4"), frames)]
    assert job_runtimes(config(gpus=1, video_stride=300, pred_videos=video))["predict_video"] > frames * 0.0092 * 1.5
    # under a pool cap that reading alone passes, no stride fits: the warning says so instead of naming one
    site = {"max_job_minutes": 60}
    capped = config(gpus=1, video_stride=300, pred_videos=video, site=site)
    line = next(line for line in over_site_cap(capped, job_runtimes(capped)) if line.startswith("predict_video"))
    assert "raise max_job_minutes" in line and "--video-stride" not in line


def test_an_hpo_trial_longer_than_a_piece_under_the_pools_cap_is_warned_of(caplog):
    """hpo runs in pieces under max_job_minutes, a retry each (79805d9), but a trial keeps no checkpoint: one longer
    than a piece starts again on every try, none finishes, and the job burns all those retries with no word."""
    from utils.pegasus.runtimes import trial_over_piece, workloads

    long_trials = config(train=1000, gpus=1, hpo_epochs=3, site={"max_job_minutes": 10})
    with caplog.at_level("WARNING", logger="utils.pegasus.runtimes"):
        job_runtimes(long_trials)
    said = [r.message for r in caplog.records if r.message.startswith("hpo: a trial may run up to")]
    assert len(said) == 1 and "lower --hpo-epochs, or raise max_job_minutes" in said[0]
    roomy = config(train=1000, gpus=1, hpo_epochs=3, site={"max_job_minutes": 120})
    assert trial_over_piece(roomy, workloads(roomy)["hpo"]) == []
    assert trial_over_piece(config(train=1000, gpus=1), workloads(config(train=1000, gpus=1))["hpo"]) == []  # no cap


def test_jobs_that_cannot_resume_warn_when_their_limit_passes_the_pool_cap(caplog):
    """hpo, train and predict run in pieces under max_job_minutes; evaluate and video jobs cannot, so a limit
    above the cap gets a warning, with the --video-stride that fits."""
    from utils.pegasus.config import VideoFile
    from utils.pegasus.runtimes import over_site_cap

    site = {"max_job_minutes": 120}
    big = config(pred=5000, test=2000, train=5000, site=site, pred_videos=[VideoFile(Path("v.mp4"), 90_000)])
    lines = over_site_cap(big, job_runtimes(big))
    kinds = sorted(line.split(":")[0] for line in lines)
    assert kinds == ["evaluate", "predict_video"]  # not hpo, train or predict: they checkpoint
    def suggested(kind, flag):
        return int(next(line for line in lines if line.startswith(kind + ":")).split(flag + " ")[1].split()[0])

    stride = suggested("predict_video", "--video-stride")
    assert job_runtimes(config(site=site, video_stride=stride, pred_videos=[VideoFile(Path("v.mp4"), 90_000)]))[
        "predict_video"] <= 120 * 60
    caplog.clear()
    with caplog.at_level("WARNING", logger="utils.pegasus.runtimes"):
        job_runtimes(big)  # workflow.py's logging shows them
    assert sum("above the site's max_job_minutes 120" in r.message for r in caplog.records) == 2
    # a limit set in sites.yml is lowered there; kinds the workflow does not build say nothing (no videos, no
    # folds: make_fold is sized from the training images all the same)
    overridden = {"max_job_minutes": 120, "runtimes": {"predict_video": 99_999, "evaluate": 99_999}}
    lines = over_site_cap(config(train=500_000, site=overridden), job_runtimes(config(train=500_000, site=overridden)))
    said = {line.split(":")[0]: line for line in lines}
    assert not {"make_fold", "evaluate_fold", "predict_video"} & set(said)
    assert said["evaluate"].endswith("lower sites.yml's runtimes: evaluate, or raise max_job_minutes")
    named = config(train=500_000, site=overridden, sites_file="/pool/my-sites.yml")  # the --sites-config file
    assert any(line.endswith("lower /pool/my-sites.yml's runtimes: evaluate, or raise max_job_minutes")
               for line in over_site_cap(named, job_runtimes(named)))
    assert said["augment"].endswith("raise max_job_minutes")  # a data job: one job, whatever the flags
    # no cap, or every job within it: nothing to say
    assert over_site_cap(config(pred=5000), job_runtimes(config(pred=5000))) == []
    assert over_site_cap(config(site=site), job_runtimes(config(site=site))) == []
