"""workflow.py's inputs: the --pred-images folder cut into prediction shards, with clear errors, and what of it
or of --data is not read (a run folder inside the photos, files left out, subfolders) said at generation."""

from __future__ import annotations

import shutil
import tarfile

from helpers import generate, jobs_by_id


def test_prediction_folder_and_clear_errors(sample_dir, tmp_path, capsys):
    predict_dir = tmp_path / "to_predict"
    predict_dir.mkdir()
    for image in sorted((sample_dir / "images").iterdir())[:3]:
        shutil.copyfile(image, predict_dir / f"new_{image.name}")
    run_dir = tmp_path / "pred"
    assert generate(run_dir, sample_dir, "--pred-images", str(predict_dir), "--images-per-job", "2",
                    "--annotate-max", "1") == 0
    jobs = jobs_by_id(run_dir)
    # one predict job per shard of --images-per-job images, the images inside the shards
    predict = {job_id: job for job_id, job in jobs.items() if job_id.startswith("predict_")}
    assert sorted(predict) == ["predict_shard-000000", "predict_shard-000001"]
    assert not any(str(a).startswith("new_") for job in jobs.values() for a in job["arguments"])
    # (experiment_config.yml: every job's copy of the run's settings, for its run record)
    assert [u["lfn"] for u in predict["predict_shard-000001"]["uses"] if u["type"] == "input"] == \
        ["experiment_config.yml", "model.pt", "pred_shard-000001.tar"]
    assert sorted(tarfile.open(run_dir / "pred_shards" / "shard-000000.tar").getnames()) == \
        sorted(p.name for p in predict_dir.iterdir())[:2]
    merge = jobs["merge_predictions"]
    assert [u["lfn"] for u in merge["uses"] if u["type"] == "input"] == \
        ["experiment_config.yml", "predictions_shard-000000.json", "predictions_shard-000001.json"]
    # --annotate-max 1 over two shards: only the first draws (and stages out) an annotated image
    stage_out = [u["lfn"] for job in predict.values() for u in job["uses"] if u.get("stageOut")]
    assert "annotated_shard-000000.tar" in stage_out and "annotated_shard-000001.tar" not in stage_out
    # a shard folder of bin/make_shards.py is used as it is
    assert generate(tmp_path / "sharded", sample_dir, "--pred-images", str(run_dir / "pred_shards")) == 0
    replicas = (tmp_path / "sharded" / "replicas.yml").read_text()
    assert str(run_dir / "pred_shards" / "shard-000001.tar") in replicas
    assert generate(tmp_path / "x", tmp_path / "nowhere") == 2
    assert "nowhere" in capsys.readouterr().err
    assert generate(tmp_path / "y", sample_dir, "--trials", "1", "--hpo-jobs", "2") == 2
    assert "--trials" in capsys.readouterr().err


def test_a_run_folder_inside_the_photos_folder_is_not_packed_as_photos(sample_dir, tmp_path):
    # --pred-images is walked with its subfolders: the run's own outputs (plots, annotated images) must
    # not become photos to predict on when the run folder sits inside it.
    photos = tmp_path / "cams"
    (photos / "siteA").mkdir(parents=True)
    for image in sorted((sample_dir / "images").iterdir())[:2]:
        shutil.copyfile(image, photos / "siteA" / image.name)
    run_dir = photos / "run"
    (run_dir / "outputs").mkdir(parents=True)
    shutil.copyfile(sorted((sample_dir / "images").iterdir())[2], run_dir / "outputs" / "histogram.jpg")
    assert generate(run_dir, sample_dir, "--pred-images", str(photos)) == 0
    names = tarfile.open(run_dir / "pred_shards" / "shard-000000.tar").getnames()
    assert names and all(name.startswith("siteA/") for name in names)


def test_files_left_out_of_the_prediction_shards_are_said_at_generation(sample_dir, tmp_path, caplog):
    photos = tmp_path / "cams"
    photos.mkdir()
    shutil.copyfile(sorted((sample_dir / "images").iterdir())[0], photos / "a.jpg")
    (photos / "notes.txt").write_text("not a photo")
    (photos / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    with caplog.at_level("WARNING"):
        assert generate(tmp_path / "run", sample_dir, "--pred-images", str(photos)) == 0
    said = [record.getMessage() for record in caplog.records if "not packed for prediction" in record.getMessage()]
    listed = tmp_path / "run" / "pred_shards" / "skipped.csv"  # every one with its reason (index.json counts them)
    assert len(said) == 1 and "2 file(s)" in said[0] and str(listed) in said[0]
    assert len(listed.read_text().splitlines()) == 1 + 2


def test_a_subfolder_of_the_data_that_is_not_read_is_said_at_generation(sample_dir, tmp_path, caplog):
    # its images were in no count: 'Validated DATA: 4 usable of 4 images' with 20 more in images/a/ and no word
    data = tmp_path / "data"
    shutil.copytree(sample_dir, data)
    for folder, suffix in (("images", ".jpg"), ("annotations", ".xml")):
        (data / folder / "siteA").mkdir()
        for path in sorted((data / folder).glob(f"*{suffix}"))[:12]:
            path.rename(data / folder / "siteA" / path.name)
    with caplog.at_level("WARNING"):
        assert generate(tmp_path / "run", data, "--no-pretrained") == 0
    said = [record.getMessage() for record in caplog.records if "subfolder(s) not read" in record.getMessage()]
    assert said == [f"{data}: 2 subfolder(s) not read (the data set is flat; first: siteA/: a folder inside "
                    f"{data / 'images'}: its 12 file(s) are not read (the images and annotations must sit in the "
                    f"folders themselves)); every one in {tmp_path / 'run' / 'validation_report.json'}"]
