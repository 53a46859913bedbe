"""A stopped bin/predict.py run resumed from its progress file, and the run record's input hashes taken from the
reads the run made (a resumed run's included)."""

from __future__ import annotations

import json
import tarfile

import pytest

from helpers import count_opens, photo_folders, predict_quick, stop_after_records


def _hashed_inputs(tiny_model_file, sample_dir, tmp_path):
    """A model file and a folder of 4 images and a broken one, all below tmp_path/inputs: (model, photos, the
    images' paths, the inputs_sha256 of a fresh read of them all)."""
    from utils.provenance import inputs_sha256

    model = tmp_path / "inputs" / "model.pt"
    model.parent.mkdir()
    model.write_bytes(tiny_model_file.read_bytes())
    photos = photo_folders(sample_dir, tmp_path / "inputs" / "photos")
    (photos / "siteB" / "broken.jpg").write_bytes(b"not a JPEG")  # read, not decoded: an input all the same
    images = sorted(str(path) for path in photos.rglob("*.jpg"))
    return model, photos, images, inputs_sha256([model, *images])


def test_predict_opens_each_image_once_and_its_run_record_hashes_what_it_read(root, sample_dir, tiny_model_file,
                                                                             tmp_path, monkeypatch):
    # The run record hashed every input after predicting: a second full read of a 100k-image collection. The
    # decode now hashes the bytes it reads, and the record's inputs_sha256 is the value a fresh read gives.
    model, photos, images, expected = _hashed_inputs(tiny_model_file, sample_dir, tmp_path)
    with monkeypatch.context() as patch:
        opens = count_opens(patch, tmp_path / "inputs")
        assert predict_quick(root, model, [photos], tmp_path / "whole", "--no-annotated", "--batch-size", "2") == 0
    assert {path: opens.get(path, 0) for path in images} == dict.fromkeys(images, 1)
    # the stand-in check before torch's import (cli.require_model_files) and again in the loader, the load, and one
    # hash for the resume key and the record
    assert opens[str(model)] == 4
    assert json.loads((tmp_path / "whole" / "predict_run.json").read_text())["inputs_sha256"] == expected


def test_a_resumed_predict_run_records_the_hashes_of_the_images_it_did_not_read_again(
        root, sample_dir, tiny_model_file, tmp_path, monkeypatch):
    # The images done before the stop are not read again: their hashes come from the progress file.
    model, photos, images, expected = _hashed_inputs(tiny_model_file, sample_dir, tmp_path)
    with monkeypatch.context() as patch:  # stopped after 3 inputs (2 kept: a whole batch), then resumed
        stop_after_records(patch, 3, lambda: (_ for _ in ()).throw(KeyboardInterrupt))
        assert predict_quick(root, model, [photos], tmp_path / "out", "--no-annotated", "--batch-size", "2") == 130
    with monkeypatch.context() as patch:
        opens = count_opens(patch, tmp_path / "inputs")
        assert predict_quick(root, model, [photos], tmp_path / "out", "--no-annotated", "--batch-size", "2") == 0
    assert sorted(opens.get(path, 0) for path in images) == [0, 0, 1, 1, 1]  # the batch kept is not read again
    assert json.loads((tmp_path / "out" / "predict_run.json").read_text())["inputs_sha256"] == expected


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_a_stopped_predict_run_resumes_and_writes_what_a_run_never_stopped_writes(root, sample_dir, tiny_model_file,
                                                                                  tmp_path, monkeypatch, capsys, how):
    # A run over a large collection stopped part way (Ctrl-C, a pool's SIGTERM) lost every image it had done.
    import os
    import signal

    photos = photo_folders(sample_dir, tmp_path / "photos")
    (photos / "siteB" / "broken.jpg").write_bytes(b"not a JPEG")  # a skipped input, recorded as such
    args = ["--annotate-max", "3", "--batch-size", "2"]
    assert predict_quick(root, tiny_model_file, [photos], tmp_path / "whole", *args, "--annotated-tar",
                         tmp_path / "whole.tar") == 0
    out = tmp_path / "out"
    args += ["--annotated-tar", tmp_path / "drawn.tar"]

    def stop():
        if how == "ctrl-c":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)  # the job's handler: it stops after this image

    saved = signal.getsignal(signal.SIGTERM)
    try:
        with monkeypatch.context() as patch:
            first = stop_after_records(patch, 3, stop)
            assert predict_quick(root, tiny_model_file, [photos], out, *args) == (130 if how == "ctrl-c" else 143)
    finally:
        signal.signal(signal.SIGTERM, saved)
    assert len(first) == 3 and (out / ".predictions.json.progress.jsonl").is_file()
    if how == "sigterm":  # the outputs not written yet got stand-ins, as train's do
        from utils.stop import is_stand_in

        assert is_stand_in(out / "predictions.json") and is_stand_in(tmp_path / "drawn.tar")
    # a drawing a kill cut short (utils.atomic's temporary) is not packed with the others
    (out / ".predictions.json.progress.annotated" / ".annotated_x.k3j2l1q0.tmp.jpg").write_bytes(b"half")
    capsys.readouterr()
    second = stop_after_records(monkeypatch, 99, lambda: None)
    assert predict_quick(root, tiny_model_file, [photos], out, *args) == 0
    # the whole batch done is kept, the batch stopped in is read again as a whole: the same batches as unstopped
    assert "resuming a stopped run: 2 of 5 inputs done" in capsys.readouterr().out
    assert second == first[2:3] + second[1:] and len(second) == 3
    for name in ("predictions.json", "predictions.csv", "compliance.json"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    with tarfile.open(tmp_path / "drawn.tar") as drawn, tarfile.open(tmp_path / "whole.tar") as whole:
        assert sorted(drawn.getnames()) == sorted(whole.getnames()) and len(drawn.getnames()) == 3
        for name in whole.getnames():
            assert drawn.extractfile(name).read() == whole.extractfile(name).read(), name
    assert not [path.name for path in out.iterdir() if path.name.startswith(".")]  # progress and drawings gone


@pytest.mark.slow
def test_a_stopped_predict_runs_progress_is_not_used_for_another_model_setting_or_input(root, sample_dir,
                                                                                      tiny_model_file, tmp_path,
                                                                                      monkeypatch, capsys):
    photos = photo_folders(sample_dir, tmp_path / "photos")
    out = tmp_path / "out"
    args = ["--batch-size", "1"]

    def interrupt():
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        stop_after_records(patch, 2, interrupt)
        assert predict_quick(root, tiny_model_file, [photos], out, *args) == 130
    (photos / "siteB" / "d.jpg").unlink()  # an input gone: the records may not be of these inputs
    capsys.readouterr()
    read = stop_after_records(monkeypatch, 99, lambda: None)
    assert predict_quick(root, tiny_model_file, [photos], out, *args) == 0
    assert "input set (or unreadable); starting afresh" in capsys.readouterr().out and len(read) == 3
    # a kill that cut the last record short: the records before it are kept, the cut one read again
    with monkeypatch.context() as patch:
        stop_after_records(patch, 2, interrupt)
        assert predict_quick(root, tiny_model_file, [photos], out, *args, "--score-threshold", "0.1") == 130
    progress = out / ".predictions.json.progress.jsonl"
    progress.write_bytes(progress.read_bytes()[:-20])
    read.clear()
    assert predict_quick(root, tiny_model_file, [photos], out, *args, "--score-threshold", "0.1") == 0
    assert "resuming a stopped run: 1 of 3 inputs done" in capsys.readouterr().out and len(read) == 2
    # a progress file that is not one (deeply nested JSON, not UTF-8): one line, and a run from the start
    for junk in (b"[" * 100000, b"\xff\xfe" * 10, b'{"predict_progress": 1}\n{"file": [1]}\n'):
        with monkeypatch.context() as patch:
            stop_after_records(patch, 1, interrupt)
            assert predict_quick(root, tiny_model_file, [photos], out, *args) == 130
        progress.write_bytes(junk)
        read.clear()
        capsys.readouterr()
        assert predict_quick(root, tiny_model_file, [photos], out, *args) == 0
        assert "starting afresh" in capsys.readouterr().out and len(read) == 3


@pytest.mark.slow
def test_a_resumed_run_with_a_tag_keeps_its_own_drawings_not_another_tags(root, sample_dir, tiny_model_file,
                                                                          tmp_path, monkeypatch):
    # Two tags drawing into one folder: a resumed run took the other tag's drawings of the same names for its own.
    import hashlib

    photos = photo_folders(sample_dir, tmp_path / "photos")
    shared = ["--annotated-dir", tmp_path / "drawn", "--batch-size", "1"]
    digests = lambda: {p.name: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
                       for p in (tmp_path / "drawn").iterdir()}
    assert predict_quick(root, tiny_model_file, [photos], tmp_path / "whole", *shared) == 0
    whole = digests()

    def interrupt():
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        stop_after_records(patch, 2, interrupt)
        assert predict_quick(root, tiny_model_file, [photos], tmp_path / "a", *shared, "--output-tag", "a") == 130
    assert predict_quick(root, tiny_model_file, [photos], tmp_path / "a", *shared, "--output-tag", "b",
                         "--score-threshold", "0.5") == 0
    assert predict_quick(root, tiny_model_file, [photos], tmp_path / "a", *shared, "--output-tag", "a") == 0
    assert digests() == whole  # tag a's drawings, at its threshold, as a run never stopped drew them


@pytest.mark.slow
def test_predicts_run_record_is_of_its_set(root, sample_dir, tiny_model_file, tmp_path, monkeypatch):
    # The run record was written after the outputs: a stop between them left figures with no record of the model,
    # settings and inputs they came from (a rerun removes the last run's outputs first, its record among them).
    from utils import provenance

    images = sorted((sample_dir / "images").iterdir())[:3]
    out = tmp_path / "out"
    assert predict_quick(root, tiny_model_file, images, out, "--no-annotated") == 0
    assert {"predictions.json", "predict_run.json"} <= {path.name for path in out.iterdir()}

    def stopped(*args, **kwargs):  # a stop as the record is made, the last file of the set
        raise KeyboardInterrupt

    monkeypatch.setattr(provenance, "run_record", stopped)
    assert predict_quick(root, tiny_model_file, images[:2], out, "--no-annotated") == 130
    # none of the set without the others; the progress file (hidden) stays for the rerun to resume from
    assert [path.name for path in out.iterdir() if not path.name.startswith(".")] == []
