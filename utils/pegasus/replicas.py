"""Every input of the workflow as a Pegasus File, with its path on the submit host: the data (its files or
shards), the prediction shards and videos, the cached weights, the initial checkpoints, the run's settings
and stages; and the replica catalog of them."""

from __future__ import annotations

import os
from pathlib import Path

from Pegasus.api import File, ReplicaCatalog

from ..naming import PREDICT_CHECKPOINT, TRAIN_CHECKPOINT, VIDEO_CHECKPOINT, fold_tag, tagged_name
from ..provenance import EXPERIMENT_CONFIG_FILE
from .config import ConfigError, WorkflowConfig

STAGES_FILE = "train_stages.json"  # RUN_DIR/train_stages.json: --train-stages as the train jobs get it


class WorkflowInputs:
    """The workflow's input Files by role (split_file, split_inputs, pred_files, ...), each once by name."""

    def __init__(self, config: WorkflowConfig, checkpoint_dir: Path):
        self.files: dict[str, File] = {}  # lfn -> File, for the jobs
        self.paths: dict[str, Path] = {}  # lfn -> its path on the submit host, in the catalog's order
        run_dir = config.run_dir
        self.split_file = self.add(config.split_csv.resolve())
        # What each split's jobs receive: its shards, or every image and annotation as its own file.
        self.split_inputs: dict[str, list[File]] = {"train": [], "val": [], "test": []}
        if config.data_shards is not None:
            for split, shards in config.data_shards.items():
                self.split_inputs[split] = [self.add(shard.path, f"{split}_{shard.path.name}")
                                            for shard in shards]
        else:
            for entry in config.entries:
                if entry.split not in self.split_inputs:
                    raise ConfigError(f"{config.split_csv}: unknown split {entry.split!r} for {entry.image}")
                # abspath, not resolve(): one resolve() per image is slow at 100k images.
                self.split_inputs[entry.split] += [self.add(Path(os.path.abspath(entry.image))),
                                                   self.add(Path(os.path.abspath(entry.annotation)))]
        # One replica per shard, never per image: the catalogs grow with the shards.
        self.pred_files = [self.add(shard.path, f"pred_{shard.path.name}") for shard in config.pred_shards]
        # Named by the video's tag (letters, digits, - and _), not its file name: a name with spaces, quotes or
        # shell characters would become a job argument; the real path stays the replica's URL.
        self.video_files = [self.add(video.path, f"video_{video.tag}{video.path.suffix}")
                            for video in config.pred_videos]
        self.weights = None
        if config.weights_file is not None:
            self.weights = self.add(Path(config.weights_file).resolve())
        # condorio transfers a checkpoint file in with the job, so it must exist before
        # the first try: an empty file, which hpo and train read as "no checkpoint yet".
        checkpoint_names = [f"hpo_{i}.journal" for i in range(config.hpo_jobs)] + [TRAIN_CHECKPOINT]
        checkpoint_names += [tagged_name(TRAIN_CHECKPOINT, fold_tag(fold)) for fold in range(config.folds)]
        checkpoint_names += [tagged_name(PREDICT_CHECKPOINT, shard.tag) for shard in config.pred_shards]
        checkpoint_names += [tagged_name(VIDEO_CHECKPOINT, video.tag) for video in config.pred_videos]
        self.folds_file = self.add(config.folds_csv.resolve()) if config.folds else None
        self.initial_checkpoints = {lfn: checkpoint_dir / lfn for lfn in checkpoint_names}
        for lfn, path in self.initial_checkpoints.items():
            self.files[lfn] = File(lfn)
            self.paths[lfn] = path
        # the run's settings, an input of every job; --train-stages as JSON, an input of the train jobs (when given)
        self.experiment_config = (self.add(run_dir / EXPERIMENT_CONFIG_FILE)
                                  if config.experiment_settings is not None else None)
        self.stages_file = self.add(run_dir / STAGES_FILE) if config.train_stages else None

    def add(self, path: Path, lfn: str | None = None) -> File:
        """The File for an input, named by its file name (Pegasus stages files flat) unless *lfn* is given."""
        lfn = lfn or path.name
        known = self.files.get(lfn)
        if known is None:
            known = self.files[lfn] = File(lfn)
            self.paths[lfn] = path
        elif self.paths.get(lfn) != path:
            raise ConfigError(f"{path}: has the same file name as {self.paths.get(lfn)}; "
                              "Pegasus stages files by name, so input file names must be unique")
        return known

    def weights_args(self) -> tuple[list, list[File]]:
        """(--weights-file arguments, inputs) of the jobs that build a model; empty without cached weights."""
        return (["--weights-file", self.weights], [self.weights]) if self.weights is not None else ([], [])

    def stages_args(self) -> tuple[list, list[File]]:
        """(--stages arguments, inputs) of a staged training (--train-stages): the stages' JSON as a file, since
        a JSON text's quotes do not survive every way Pegasus passes arguments (its Shell code generator drops
        them); empty for one stage of --epochs."""
        return (["--stages", self.stages_file], [self.stages_file]) if self.stages_file is not None else ([], [])

    def checkpoint_args(self, job, kind: str, tag: str) -> list:
        """The --checkpoint arguments of the predict job of shard *tag* or the predict_video job (*kind*) of video
        *tag*, the file declared its checkpoint: its progress as one file, which Pegasus hands from a stopped try
        to the retry, as train's (without it a retried job on a pool did its whole shard or video again: its
        progress file stayed in the stopped try's sandbox)."""
        checkpoint = self.files[tagged_name({"predict": PREDICT_CHECKPOINT, "predict_video": VIDEO_CHECKPOINT}[kind],
                                            tag)]
        job.add_checkpoint(checkpoint, stage_out=False, register_replica=False)
        return ["--checkpoint", checkpoint]

    def catalog(self) -> ReplicaCatalog:
        """Every input with an absolute file:// URL on the submit host ("local")."""
        catalog = ReplicaCatalog()
        for lfn, path in self.paths.items():
            catalog.add_replica("local", self.files[lfn], path.as_uri())
        return catalog
