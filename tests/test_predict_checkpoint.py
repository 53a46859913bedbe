"""bin/predict.py --checkpoint: a predict job's progress as one file, which a pool hands from a stopped try to the
retry (a new folder, its inputs new copies); and the checkpoint file's own checks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tarfile

import pytest

from helpers import photo_folders, predict_quick, stop_after_records

TAG = "shard-000000"
CHECKPOINT = f"predict_{TAG}_checkpoint.tar"
OUTPUTS = (f"predictions_{TAG}.json", f"predictions_{TAG}.csv", f"compliance_{TAG}.json")
PROGRESS = f".predictions_{TAG}.json.progress.jsonl"


@pytest.fixture
def pool(sample_dir, tiny_model_file, tmp_path, monkeypatch):
    """sandbox(name, checkpoint=None): a try's own folder, as a pool gives each try of a job: the shard and the model
    staged in as new copies (other modification times), the checkpoint handed on by Pegasus (an empty file, the
    catalog's initial one, on the first try); the working folder is set to it."""
    from utils.data.pairs import pack_folder

    photos = photo_folders(sample_dir, tmp_path / "photos")
    (photos / "siteB" / "broken.jpg").write_bytes(b"not a JPEG")  # a skipped input: a record all the same
    shard = pack_folder(photos, tmp_path / f"pred_{TAG}.tar")
    tries = []

    def sandbox(name, checkpoint=None):
        folder = tmp_path / name
        folder.mkdir()
        tries.append(folder)
        shutil.copyfile(shard, folder / shard.name)
        os.utime(folder / shard.name, ns=(len(tries), len(tries)))  # each try's copy has its own time
        shutil.copyfile(tiny_model_file, folder / "model.pt")
        (folder / CHECKPOINT).write_bytes(checkpoint.read_bytes() if checkpoint else b"")
        monkeypatch.chdir(folder)
        return folder

    return sandbox


def _predict(root, *extra) -> int:
    """The workflow's predict job of one shard, in the working folder."""
    return predict_quick(root, "model.pt", [f"pred_{TAG}.tar"], ".", "--output-tag", TAG, "--batch-size", "2",
                         "--annotated-tar", f"annotated_{TAG}.tar", "--checkpoint", CHECKPOINT, *extra)


def _same_outputs(folder, whole) -> None:
    for name in OUTPUTS:
        assert (folder / name).read_bytes() == (whole / name).read_bytes(), name
    with tarfile.open(folder / f"annotated_{TAG}.tar") as drawn, tarfile.open(whole / f"annotated_{TAG}.tar") as ref:
        assert [(m.name, drawn.extractfile(m).read()) for m in drawn.getmembers()] == \
               [(m.name, ref.extractfile(m).read()) for m in ref.getmembers()]
    assert (folder / CHECKPOINT).stat().st_size == 0  # emptied: nothing left to resume, little to transfer
    assert not (folder / PROGRESS).exists()


@pytest.mark.slow
def test_a_predict_job_stopped_on_a_pool_resumes_in_the_retrys_new_folder(root, pool, monkeypatch, capsys):
    # The progress file stayed in the stopped try's sandbox, which a pool's retry does not get back, and the retry
    # read its whole shard (1000 photos by default) again. The checkpoint carries it; the inputs, new copies on
    # the next node, are known by their content, not their modification time.
    whole = pool("whole")
    assert _predict(root, "--annotate-max", "3") == 0
    first = pool("try1")
    saved = signal.getsignal(signal.SIGTERM)
    try:
        with monkeypatch.context() as patch:  # kickstart's SIGTERM at checkpoint.time, an eviction
            done = stop_after_records(patch, 4, lambda: os.kill(os.getpid(), signal.SIGTERM))
            assert _predict(root, "--annotate-max", "3") == 143
    finally:
        signal.signal(signal.SIGTERM, saved)
    assert len(done) == 4 and (first / CHECKPOINT).stat().st_size > 0
    retry = pool("try2", checkpoint=first / CHECKPOINT)
    capsys.readouterr()
    read = stop_after_records(monkeypatch, 99, lambda: None)
    assert _predict(root, "--annotate-max", "3") == 0
    said = capsys.readouterr().out
    assert f"{CHECKPOINT}: the progress of an earlier try restored" in said
    assert "resuming a stopped run: 4 of 5 inputs done" in said and read == [f"pred_{TAG}.tar:siteB/d.jpg"]
    _same_outputs(retry, whole)


@pytest.mark.slow
def test_a_predict_job_killed_outright_resumes_from_its_last_save(root, pool, monkeypatch, capsys):
    # A try killed with no time to save (SIGKILL at maxwalltime, a lost node) leaves the checkpoint saved as it
    # went, every SAVE_EVERY images: the state the test keeps after each save is what such a kill leaves.
    from utils.detection import prediction_checkpoint

    whole = pool("whole")
    assert _predict(root, "--annotate-max", "0") == 0  # no drawings: no drawing thread racing a save
    first = pool("try1")
    killed = first.parent / "killed.tar"
    advance = prediction_checkpoint.PredictionCheckpoint.advance

    def keeping(self, images):
        advance(self, images)
        shutil.copyfile(self.path, killed)  # what a kill right after this image leaves

    with monkeypatch.context() as patch:
        patch.setattr(prediction_checkpoint, "SAVE_EVERY", 2)
        patch.setattr(prediction_checkpoint.PredictionCheckpoint, "advance", keeping)
        stop_after_records(patch, 4, lambda: (_ for _ in ()).throw(KeyboardInterrupt))
        assert _predict(root, "--annotate-max", "0") == 130
    retry = pool("try2", checkpoint=killed)  # saved after 2 images: a whole batch
    capsys.readouterr()
    assert _predict(root, "--annotate-max", "0") == 0
    assert "resuming a stopped run: 2 of 5 inputs done" in capsys.readouterr().out
    _same_outputs(retry, whole)


@pytest.mark.slow
def test_a_rerun_in_its_own_folder_keeps_its_progress_file_not_an_older_checkpoint(root, pool, monkeypatch, capsys):
    # The local executor reruns a job in the same folder: its progress file there (kept through a SIGKILL that
    # left no time to save the checkpoint) is at least as new as the checkpoint, and is the one used.
    folder = pool("try1")
    with monkeypatch.context() as patch:
        stop_after_records(patch, 2, lambda: (_ for _ in ()).throw(KeyboardInterrupt))
        assert _predict(root, "--annotate-max", "0", "--batch-size", "1") == 130
    older = (folder / CHECKPOINT).read_bytes()
    with monkeypatch.context() as patch:
        stop_after_records(patch, 1, lambda: (_ for _ in ()).throw(KeyboardInterrupt))  # one more record, then stopped
        assert _predict(root, "--annotate-max", "0", "--batch-size", "1") == 130
    (folder / CHECKPOINT).write_bytes(older)  # as a kill before the save would have left it
    capsys.readouterr()
    assert _predict(root, "--annotate-max", "0", "--batch-size", "1") == 0
    assert "resuming a stopped run: 3 of 5 inputs done" in capsys.readouterr().out


def test_a_checkpoint_that_is_not_one_is_said_and_nothing_of_it_is_unpacked(tmp_path):
    from utils.detection.prediction_checkpoint import PredictionCheckpoint

    out = tmp_path / "out"
    progress = out / PROGRESS
    drawings = progress.with_suffix(".annotated")
    checkpoint = PredictionCheckpoint(tmp_path / CHECKPOINT, progress)
    assert checkpoint.restore() is None  # none given
    checkpoint.path.write_bytes(b"")
    assert checkpoint.restore() is None  # the initial, empty one
    checkpoint.path.write_text(json.dumps({"stand_in_for": CHECKPOINT}) + "\n")
    assert "not a checkpoint of a predict run" in checkpoint.restore() and not progress.exists()
    header = tmp_path / "header.jsonl"
    header.write_text('{"predict_progress": {}}\n')
    for name in ("../escaped.jpg", f"{drawings.name}/../../escaped.jpg", f"{drawings.name}/sub/a.jpg", "other.txt"):
        with tarfile.open(checkpoint.path, "w") as archive:
            archive.add(header, arcname=progress.name)
            archive.add(header, arcname=name)
        assert checkpoint.restore() == f"{CHECKPOINT}: holds {name!r}, not a file of a predict run's progress; " \
                                       "starting afresh"
        assert not progress.exists() and not (tmp_path / "escaped.jpg").exists() and not (out / "escaped.jpg").exists()
    with tarfile.open(checkpoint.path, "w") as archive:
        archive.add(header, arcname=f"{drawings.name}/annotated_a.jpg")
    assert checkpoint.restore() == f"{CHECKPOINT}: holds no {progress.name}; starting afresh"
    # a good one: the progress file and the drawings; a save with no progress file keeps the last checkpoint
    with tarfile.open(checkpoint.path, "w") as archive:
        archive.add(header, arcname=f"{drawings.name}/annotated_a.jpg")
        archive.add(header, arcname=progress.name)
    kept = checkpoint.path.read_bytes()
    checkpoint.save()
    assert checkpoint.path.read_bytes() == kept
    assert checkpoint.restore() == f"{CHECKPOINT}: the progress of an earlier try restored"
    assert progress.read_text() == header.read_text() and (drawings / "annotated_a.jpg").is_file()
    (drawings / ".annotated_b.x1y2z3w4.tmp.jpg").write_bytes(b"half")  # a drawing being written: not saved
    checkpoint.save()
    with tarfile.open(checkpoint.path) as archive:
        assert sorted(archive.getnames()) == sorted([progress.name, drawings.name, f"{drawings.name}/annotated_a.jpg"])


def _saved_run(tmp_path, monkeypatch, images: int):
    """A checkpoint saved as a run of *images* drawn images goes (SAVE_EVERY 10); returns it, the progress file's
    text after each save, and how many members each save packed."""
    from utils.detection import prediction_checkpoint

    monkeypatch.setattr(prediction_checkpoint, "SAVE_EVERY", 10)
    progress = tmp_path / "out" / PROGRESS
    drawings = progress.with_suffix(".annotated")
    drawings.mkdir(parents=True)
    progress.write_text('{"predict_progress": {}}\n')
    checkpoint, texts, packed = prediction_checkpoint.PredictionCheckpoint(tmp_path / CHECKPOINT, progress), [], []
    addfile = tarfile.TarFile.addfile
    monkeypatch.setattr(tarfile.TarFile, "addfile", lambda self, *args: (packed.append(args[0].name),
                                                                         addfile(self, *args))[1])
    for image in range(images):
        (drawings / f"annotated_{image}.jpg").write_bytes(os.urandom(100))
        with open(progress, "a") as handle:
            handle.write(json.dumps({"file": f"{image}.jpg"}) + "\n")
        checkpoint.advance(1)
        if (image + 1) % 10 == 0:
            texts.append((progress.read_text(), {f.name: f.read_bytes() for f in drawings.iterdir()}))
    return checkpoint, texts, packed


def test_each_save_packs_only_what_is_new_since_the_last(tmp_path, monkeypatch):
    # Every save packed every drawing done: a 1000-image shard's 10 saves wrote its drawings ~5.5 times over,
    # twice the shard four times the time. A save now appends the new drawings and progress lines.
    checkpoint, texts, packed = _saved_run(tmp_path, monkeypatch, 50)
    drawn = [name for name in packed if "annotated_" in name]
    assert sorted(drawn) == sorted(f"{checkpoint.drawings.name}/annotated_{i}.jpg" for i in range(50))  # once each
    shutil.rmtree(checkpoint.drawings)
    checkpoint.progress.unlink()
    assert checkpoint.restore() == f"{CHECKPOINT}: the progress of an earlier try restored"
    assert (checkpoint.progress.read_text(), {f.name: f.read_bytes() for f in checkpoint.drawings.iterdir()}) \
        == texts[-1]


def test_a_save_a_kill_cut_short_leaves_the_last_whole_one(tmp_path, monkeypatch):
    checkpoint, texts, _ = _saved_run(tmp_path, monkeypatch, 30)
    whole = checkpoint.path.read_bytes()
    with tarfile.open(checkpoint.path) as archive:
        last = archive.getmembers()[-1]  # the last save's progress lines
    end = last.offset_data + last.size
    checkpoint.progress.unlink()
    saved = tmp_path / "saved.tar"
    previous = _saved_run(tmp_path / "again", monkeypatch, 20)[0]._end  # where the save before the last ended
    for cut in (previous + 100, previous + 700, (previous + end) // 2, end - 1):
        saved.write_bytes(whole[:cut])  # what a kill while the last save appended leaves
        checkpoint.path.write_bytes(saved.read_bytes())
        shutil.rmtree(checkpoint.drawings, ignore_errors=True)
        checkpoint.progress.unlink(missing_ok=True)
        assert checkpoint.restore() == f"{CHECKPOINT}: the progress of an earlier try restored", cut
        assert checkpoint.progress.read_text() == texts[1][0], cut  # the save of 20 images: the last whole one
        assert set(texts[1][1]) <= {f.name for f in checkpoint.drawings.iterdir()}, cut


def test_a_checkpoint_or_output_named_as_an_input_is_refused_before_the_input_is_written_over(
        root, tiny_model_file, sample_dir, tmp_path, capsys):
    # --checkpoint given the model's (or the shard's) name: restored as "not a checkpoint", then written over as
    # the run went and emptied at its end: the model file was lost.
    from helpers import run_script

    model, video, shard = tmp_path / "model.pt", tmp_path / "clip.mp4", tmp_path / f"pred_{TAG}.tar"
    shutil.copyfile(tiny_model_file, model)
    video.write_bytes(b"frames")
    shard.write_bytes(b"images")
    kept = model.read_bytes()
    for flag, given in (("--model", model), ("--images", shard)):
        capsys.readouterr()
        assert predict_quick(root, model, [sample_dir, shard], tmp_path / "out", "--checkpoint", given) == 2
        assert f"{given}: given as {flag} and as --checkpoint, which this job writes" in capsys.readouterr().err
    for output in ("--checkpoint", "--output-video"):
        assert run_script(root, "predict_video", ["--source", video, "--model", model, "--output-dir", tmp_path,
                                                  output, video]) == 2
        assert f"{video}: given as --source and as {output}, which this job writes" in capsys.readouterr().err
    assert model.read_bytes() == kept and video.read_bytes() == b"frames" and shard.read_bytes() == b"images"
