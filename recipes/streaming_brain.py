"""The Brain both tasks share: feature statistics, streaming-safe features, LR schedules set
before each step, epoch logging and history (``ssl_brain.py``, ``ctc_brain.py`` extend it)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

import speechbrain as sb
from speechbrain.utils.distributed import (
    ddp_all_reduce,
    ddp_broadcast,
    if_main_process,
    run_on_main,
)

from modules.context import describe_context

logger = logging.getLogger(__name__)


class StreamingBrain(sb.Brain):
    """Shared by the tasks: frozen global feature statistics, features, per-epoch history.

    Under DDP, ``self.modules.<name>`` may be a DDP wrapper: forward passes go through it (so
    gradients are synchronized), everything else uses the module itself, ``self.hparams.<name>``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The feature extractor is not trained, so it is not one of ``modules`` (which Brain
        # moves): its constant filterbank matrix must still live where the audio does.
        self.hparams.compute_features.to(self.device)
        self.stepping = {}  # {name: (schedule, optimizer)} of the step under way
        self.stage_start, self.stage_audio = time.time(), 0.0
        if self.debug and self.checkpointer is not None:
            # --debug checkpoints go to a temporary folder made by each process: use the main
            # one's (every rank's savers write into the folder the main process makes).
            self.checkpointer.checkpoints_dir = ddp_broadcast(self.checkpointer.checkpoints_dir)

    def on_fit_start(self):
        super().on_fit_start()  # restores the latest checkpoint, if any
        normalize = self.modules.normalize
        if normalize.count == 0:
            # One pass on the main process; every rank takes its statistics.
            stats = run_on_main(self._compute_normalization_stats)
            normalize._load_statistics_dict(
                {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in stats.items()})

    def _compute_normalization_stats(self) -> dict:
        """One pass over (part of) the training set for the global feature statistics.

        Statistics are frozen before the first step, so quantizer targets never drift and a
        chunk is normalized exactly like the whole utterance (streaming-safe).
        """
        loader = sb.dataio.dataloader.make_dataloader(
            self.train_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)
        max_batches = self.hparams.normalization_batches
        with torch.no_grad():
            for index, batch in enumerate(loader):
                if index == max_batches or (self.debug and index == self.debug_batches):
                    break
                wavs, wav_lens = batch.to(self.device).sig
                self.compute_features(wavs, wav_lens, update_stats=True)
        logger.info("Global feature statistics from %d frames", self.modules.normalize.count)
        return {k: v.cpu() if torch.is_tensor(v) else v
                for k, v in self.modules.normalize._statistics_dict().items()}

    def frame_lengths(self, wav_lens: torch.Tensor, wav_samples: int) -> torch.Tensor:
        """(B,) feature frames of each utterance, on ``wav_lens``' device: from the loader's CPU
        copy, host-side lengths (for masks and CTC lengths) without waiting for the GPU."""
        return self.hparams.compute_features.num_frames(torch.round(wav_lens * wav_samples).long())

    def compute_features(self, wavs, wav_lens, update_stats=False):
        """Waveforms -> globally normalized (B, T, n_mels) features and their lengths in frames."""
        frame_lengths = self.frame_lengths(wav_lens, wavs.shape[1])
        feats = self.hparams.compute_features(wavs)
        # Statistics are only updated by the pass before training (epoch=None).
        epoch = None if update_stats else self.hparams.epoch_counter.current
        feats = self.modules.normalize(feats, frame_lengths / feats.shape[1], epoch=epoch)
        return feats, frame_lengths

    def lr_schedules(self) -> dict:
        """``{name: (schedule, optimizer)}`` of the optimizers the next step updates."""
        raise NotImplementedError

    def on_fit_batch_start(self, batch, should_step):
        # The schedule's rate of this very step, set before it: also the first step of each
        # optimizer, and the first after a resume (the schedules' step counts are checkpointed).
        self.stepping = self.lr_schedules() if should_step else {}
        for schedule, optimizer in self.stepping.values():
            schedule.set_lr(optimizer)

    def freeze_optimizers(self, optimizers):
        """Only the optimizers whose schedule runs at this step (CTC: not the encoder's while
        the head trains alone)."""
        stepping = [optimizer for _, optimizer in self.stepping.values()]
        return {name: opt for name, opt in optimizers.items() if any(opt is s for s in stepping)}

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        for schedule, optimizer in self.stepping.values():
            schedule(optimizer)  # counts the step (and sets the next step's rate)

    def fit_batch(self, batch):
        wavs, wav_lens = batch.sig
        self.stage_audio += float(wav_lens.sum()) * wavs.shape[1] / self.hparams.sample_rate
        return super().fit_batch(batch)

    def on_stage_start(self, stage, epoch=None):
        if stage == sb.Stage.TRAIN:  # the training stage's own time and audio, for throughput
            self.stage_start, self.stage_audio = time.time(), 0.0
            self.hparams.context_sampler.check_in_sync()  # DDP: every rank draws alike

    def end_train_stage(self) -> None:
        """Wall time and audio seconds (all ranks) of the training stage, without validation.

        A resumed epoch counts only what this process trained: time and audio alike.
        """
        audio = self.stage_audio
        if torch.distributed.is_initialized():  # float32: MPS has no float64
            audio = float(ddp_all_reduce(torch.tensor([audio], device=self.device),
                                         torch.distributed.ReduceOp.SUM))
        self.train_timing = {"train_stage_seconds": round(time.time() - self.stage_start, 3),
                             "train_audio_seconds": round(audio, 3)}

    def training_context(self, stage):
        """One sampled context per training batch (the same on every rank); the encoder's
        fixed one otherwise."""
        if stage == sb.Stage.TRAIN:
            return self.hparams.context_sampler.sample()
        return self.hparams.encoder.context

    def log_epoch(self, epoch, stats, extra_meta=None):
        """Train log line (contexts drawn, in seconds) and ``history.json`` record."""
        encoder = self.hparams.encoder
        meta = {"epoch": epoch, "lr": self.optimizer_lrs(),
                "contexts_drawn": self.hparams.context_sampler.pop_counts(),
                "valid_context": describe_context(encoder.context, encoder.frame_seconds)}
        self.hparams.train_logger.log_stats(stats_meta={**meta, **(extra_meta or {})},
                                            train_stats=self.train_stats, valid_stats=stats)
        if if_main_process():
            append_history(self.hparams.output_folder,
                           {"epoch": epoch, "train": self.train_stats, "valid": stats,
                            **getattr(self, "train_timing", {})})

    def optimizer_lrs(self):
        lrs = [opt.param_groups[0]["lr"] for opt in self.optimizers_dict.values()]
        return lrs[0] if len(lrs) == 1 else lrs


def append_history(output_folder: str | Path, record: dict) -> None:
    """Per-epoch statistics in ``<output_folder>/history.json`` (survives restarts; read for
    the summary). Written to a temporary file and renamed: a kill while writing keeps the old
    file."""
    path = Path(output_folder) / "history.json"
    history = json.loads(path.read_text()) if path.exists() else []
    history = [h for h in history if h["epoch"] < record["epoch"]] + [record]
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(history, indent=1))
    partial.replace(path)
