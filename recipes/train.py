#!/usr/bin/env python3
"""Streaming self-supervised pretraining (BEST-RQ / NEST-style masked-token prediction).

The hparams file says which task it trains (``task: ssl``); the encoder, masker, quantizer,
context sampler and schedule are all defined there.

Usage::

    python recipes/train.py hparams/SSL/conformer.yaml [--device_preset cpu|cuda|mps] \\
        [--debug] [--any_hparam value ...]
    torchrun --nproc_per_node=8 recipes/train.py hparams/SSL/conformer.yaml ...   # DDP

The last line printed to stdout (by the main process only) is one JSON object summarizing the run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import resource
import sys
import time
from pathlib import Path

import torch

import quiet  # noqa: F401  before SpeechBrain: silences its import-time torchvision warning
import speechbrain as sb
import yaml
from hyperpyyaml import load_hyperpyyaml
from speechbrain.augment.time_domain import SpeedPerturb
from speechbrain.dataio.sampler import DynamicBatchSampler, ReproducibleRandomSampler
from speechbrain.utils.distributed import (
    MainProcessContext,
    ddp_all_reduce,
    ddp_barrier,
    ddp_broadcast,
    get_local_rank,
    if_main_process,
    run_on_main,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataio import (  # noqa: E402
    AudioFileError,
    AudioReader,
    ManifestError,
    TextTokens,
    check_manifest,
    check_manifest_file,
    dataset_from_manifest,
)
from inference import (  # noqa: E402
    TextNormalizer,
    check_device,
    load_averaged_best,
    selection_key,
)
from provenance import (  # noqa: E402
    best_ssl_checkpoint,
    check_resume,
    hparams_data,
    resolved_hparams_text,
    run_record,
    write_json_atomic,
)
from modules.checkpointing import RandomState  # noqa: E402
from modules.context import describe_context, set_dynamic_context  # noqa: E402
from modules.ctc import BeamTranscriber, ctc_loss, greedy_transcripts  # noqa: E402
from modules.heads import masked_positions, masked_token_loss  # noqa: E402
from modules.masker import encoder_frame_mask, masked_frame_counts  # noqa: E402
from modules.schedulers import warmup_steps  # noqa: E402

logger = logging.getLogger(__name__)


class StreamingBrain(sb.Brain):
    """Shared by the tasks: frozen global feature statistics, features, per-epoch history.

    Under DDP, ``self.modules.<name>`` may be a DDP wrapper: forward passes go through it (so
    gradients are synchronized), everything else uses the module itself, ``self.hparams.<name>``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
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
            self._append_history({"epoch": epoch, "train": self.train_stats, "valid": stats,
                                  **getattr(self, "train_timing", {})})

    def optimizer_lrs(self):
        lrs = [opt.param_groups[0]["lr"] for opt in self.optimizers_dict.values()]
        return lrs[0] if len(lrs) == 1 else lrs

    def _append_history(self, record):
        """Per-epoch statistics in ``history.json`` (survives restarts; read for the summary).

        Written to a temporary file and renamed: a kill while writing keeps the old file.
        """
        path = Path(self.hparams.output_folder) / "history.json"
        history = json.loads(path.read_text()) if path.exists() else []
        history = [h for h in history if h["epoch"] < record["epoch"]] + [record]
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(history, indent=1))
        partial.replace(path)


class SSLBrain(StreamingBrain):
    """Masked-token prediction on a streaming encoder, one sampled context per batch."""

    def compute_forward(self, batch, stage):
        # Masks are drawn on the host, from the loader's CPU lengths: no GPU sync (issue 21).
        host_lengths = self.frame_lengths(batch.sig[1], batch.sig[0].shape[1])
        batch = batch.to(self.device, non_blocking=True)
        wavs, wav_lens = batch.sig
        feats, frame_lengths = self.compute_features(wavs, wav_lens)
        targets = self.modules.quantizer(feats)  # from clean features
        inputs = feats
        if stage == sb.Stage.TRAIN and self.hparams.denoising:
            inputs, _ = self.compute_features(self.hparams.add_noise(wavs, wav_lens), wav_lens)
        context = self.training_context(stage)
        # Validation: fixed context and fixed masks, so losses compare across epochs.
        generator = None if stage == sb.Stage.TRAIN else self.valid_generator
        # Same draw for both; with per-layer caps the masker respects the narrowest layer.
        window = self.hparams.encoder.narrowest_context(context)
        host_mask = self.hparams.masker.draw(inputs, host_lengths, window, generator=generator,
                                             device="cpu")
        input_mask = host_mask.to(self.device, non_blocking=True)
        encoded = self.modules.encoder(self.modules.masker(inputs, input_mask),
                                       frame_lengths / feats.shape[1], context)
        logits = self.modules.heads(encoded)
        s = self.hparams.subsampling_factor
        frame_mask = encoder_frame_mask(host_mask, s)  # (B, T / s) on the CPU
        self.mask_counts += masked_frame_counts(frame_mask, -(-host_lengths // s), window)
        return logits, targets, frame_mask

    def compute_objectives(self, predictions, batch, stage):
        logits, targets, frame_mask = predictions
        if not frame_mask.any():  # a host-side mask: no GPU sync
            # Utterances too short to mask anything: contribute nothing, but stay finite.
            self.empty_batches += 1
            return logits.sum() * 0.0
        index = masked_positions(frame_mask, logits.device)
        loss = masked_token_loss(logits, targets, index)
        with torch.no_grad():  # counted on the device, read once per stage
            masked_targets = targets.flatten(0, 1).index_select(0, index)  # (N, books)
            predicted = logits.flatten(0, 1).index_select(0, index).argmax(-1)
            self.correct += (predicted == masked_targets).sum(0)
            self.code_counts.scatter_add_(1, masked_targets.T, torch.ones_like(masked_targets.T))
        return loss

    def lr_schedules(self) -> dict:
        return {"optimizer": (self.hparams.lr_annealing, self.optimizer)}

    def on_stage_start(self, stage, epoch=None):
        super().on_stage_start(stage, epoch)
        self.num_books = self.hparams.num_books
        self.correct = torch.zeros(self.num_books, dtype=torch.long, device=self.device)
        self.mask_counts = torch.zeros(3, dtype=torch.long)  # see masked_frame_counts (host)
        self.empty_batches = 0
        self.code_counts = torch.zeros(self.num_books, self.hparams.num_classes, dtype=torch.long,
                                       device=self.device)
        if stage != sb.Stage.TRAIN:
            set_dynamic_context(self.modules, self.hparams.valid_context,
                                self.hparams.context_presets)
            self.valid_generator = torch.Generator().manual_seed(self.hparams.seed)

    def stage_stats(self, stage_loss):
        """Loss, masked-token accuracy per book, codebook usage and perplexity of the targets."""
        stats = {"loss": stage_loss}
        valid_frames, masked_frames, masked_seeing_future = self.mask_counts.tolist()
        accuracy = self.correct.float() / max(masked_frames, 1)
        for book, value in enumerate(accuracy.tolist()):
            stats[f"acc_book{book}"] = value
        stats["masked_acc"] = accuracy.mean().item()
        probs = self.code_counts.float() / self.code_counts.sum(-1, keepdim=True).clamp(min=1)
        entropy = -(probs * probs.clamp(min=1e-12).log()).sum(-1)
        stats["code_usage"] = (self.code_counts > 0).float().mean().item()
        stats["code_perplexity"] = entropy.exp().mean().item()
        # What masking really did: overlapping blocks mask less than mask_prob, and a masked frame
        # with no visible frame after it in its window can only be forecast from the past.
        stats["masked_fraction"] = masked_frames / max(valid_frames, 1)
        stats["masked_seeing_future"] = masked_seeing_future / max(masked_frames, 1)
        if self.empty_batches:
            stats["batches_without_mask"] = self.empty_batches
        return stats

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage == sb.Stage.TRAIN:  # each rank saw its own shard: sum the counts
            counts = torch.cat([self.correct, self.mask_counts.to(self.device),
                                torch.tensor([self.empty_batches], device=self.device),
                                self.code_counts.flatten()])
            counts = ddp_all_reduce(counts, torch.distributed.ReduceOp.SUM).cpu()
            self.correct, self.mask_counts, empty, codes = counts.split(
                [self.num_books, 3, 1, self.code_counts.numel()])
            self.empty_batches, self.code_counts = int(empty), codes.view_as(self.code_counts)
            self.train_stats = self.stage_stats(stage_loss)
            self.end_train_stage()
            return
        stats = self.stage_stats(stage_loss)
        if stage == sb.Stage.VALID:
            self.log_epoch(epoch, stats)
            self.checkpointer.save_and_keep_only(meta={"loss": stage_loss}, min_keys=["loss"],
                                                 num_to_keep=self.hparams.checkpoints_to_keep)


class CTCBrain(StreamingBrain):
    """CTC on a streaming encoder (fine-tuned from SSL or from scratch), multi-context training.

    Token ids are the tokenizer's ids + 1: index 0 is the CTC blank. The encoder and the head
    have their own optimizer and schedule (``freeze_encoder``: the head alone, for probing).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        encoder, probe_layer = self.hparams.encoder, self.hparams.probe_layer
        # Before fit() wraps modules in DDP, which needs a gradient for every trainable
        # parameter: a frozen encoder is not wrapped, and a probe trains no layer above its own.
        if self.hparams.freeze_encoder:
            encoder.requires_grad_(False)
        elif probe_layer is not None:
            encoder.layers[probe_layer:].requires_grad_(False)
        speeds = self.hparams.speed_perturb
        self.speed_perturb = SpeedPerturb(self.hparams.sample_rate, list(speeds)) if speeds else None
        self.head_only_steps = 0
        # Scoring compares texts as the tokenizer was trained on them (case, spaces): lowercase
        # references of an uppercase model score as uppercase ones.
        self.normalizer = TextNormalizer(self.hparams.tokenizer.sp)
        self.unknown_characters: set[str] = set()
        self.averaged_checkpoints = 0

    def plan_schedule(self, steps_per_epoch: int) -> None:
        """The head-only phase and each optimizer's schedule in optimizer steps, from the
        hparams' fractions of the run's ``steps_per_epoch * number_of_epochs`` steps.

        The head's schedule spans the whole run. The encoder's starts when the encoder starts
        training, after the head-only phase (``head_only_fraction`` of the steps): its warmup is
        ``warmup_fraction`` of its own steps and it decays to 0 at the end of the run; it is not
        stepped while the encoder is frozen, so its first update (fresh Adam state) runs at a
        warmup rate, not at the peak. Rates per step: ``modules/schedulers.py``.
        """
        epochs = self.hparams.number_of_epochs
        if self.debug:  # a --debug run stops after debug_batches batches of debug_epochs epochs
            steps_per_epoch = min(steps_per_epoch, self.debug_batches)
            epochs = min(epochs, self.debug_epochs)
        total = max(1, steps_per_epoch * epochs)
        if not self.hparams.freeze_encoder:
            self.head_only_steps = min(total, round(self.hparams.head_only_fraction * total))
        steps = {"head": total, "encoder": total - self.head_only_steps}
        for name, schedule in self.hparams.lr_annealing.items():
            schedule.num_training_steps = steps[name]
            schedule.num_warmup_steps = warmup_steps(self.hparams.warmup_fraction, steps[name])
        encoder = self.hparams.lr_annealing["encoder"]
        logger.info("Fine-tuning: %d optimizer steps; head: warmup %d; encoder: frozen for %d, "
                    "then warmup %d of its %d", total,
                    self.hparams.lr_annealing["head"].num_warmup_steps, self.head_only_steps,
                    encoder.num_warmup_steps, encoder.num_training_steps)

    def encoder_training(self) -> bool:
        """Whether the next step updates the encoder (past the head-only phase, not probing)."""
        return not self.hparams.freeze_encoder and self.optimizer_step >= self.head_only_steps

    def lr_schedules(self) -> dict:
        names = ["head"] + (["encoder"] if self.encoder_training() else [])
        return {name: (self.hparams.lr_annealing[name], self.optimizers_dict[name])
                for name in names}

    def init_optimizers(self):
        self.optimizers_dict = {"head": self.hparams.head_optimizer(self.hparams.ctc_head.parameters())}
        if not self.hparams.freeze_encoder:
            self.optimizers_dict["encoder"] = self.hparams.encoder_optimizer(
                [p for p in self.hparams.encoder.parameters() if p.requires_grad])
        for name, optimizer in self.optimizers_dict.items():
            self.checkpointer.add_recoverable(f"{name}_optimizer", optimizer)

    def compute_forward(self, batch, stage):
        host_wav_lens = batch.sig[1]  # the loader's CPU copy: CTC lengths without a GPU sync
        batch = batch.to(self.device, non_blocking=True)
        wavs, wav_lens = batch.sig
        training = stage == sb.Stage.TRAIN
        if training and self.speed_perturb is not None:
            wavs = self.speed_perturb(wavs)
        feats, frame_lengths = self.compute_features(wavs, wav_lens)
        lengths = frame_lengths / feats.shape[1]
        if training:
            feats, _ = self.hparams.spec_augment(feats, lengths)
        # Head-only phase: the encoder runs without a graph (no gradient, no optimizer update).
        head_only = training and not self.encoder_training()
        with torch.no_grad() if head_only else contextlib.nullcontext():
            encoded = self.modules.encoder(feats, lengths, self.training_context(stage),
                                           num_layers=self.hparams.probe_layer)
        log_probs = self.modules.ctc_head(encoded).log_softmax(-1)
        host_frames = self.frame_lengths(host_wav_lens, wavs.shape[1])
        enc_lengths = -(-host_frames // self.hparams.subsampling_factor) / encoded.shape[1]
        return log_probs, enc_lengths

    def compute_objectives(self, predictions, batch, stage):
        log_probs, enc_lengths = predictions  # lengths on the CPU, where CTC reads them
        tokens, token_lengths = batch.tokens  # the CPU batch
        tokens = tokens.to(log_probs.device, non_blocking=True)
        loss = ctc_loss(log_probs, tokens, enc_lengths, token_lengths)
        if stage != sb.Stage.TRAIN:
            self.unknown_characters.update(self.normalizer.unknown_characters(batch.wrd))
            words = [self.normalizer(text).split()
                     for text in self.decode(log_probs, enc_lengths, stage)]
            targets = [self.normalizer(text).split() for text in batch.wrd]
            self.wer_metric.append(batch.id, words, targets)
            self.cer_metric.append(batch.id, words, targets)
        return loss

    def decode(self, log_probs, enc_lengths, stage) -> list[str]:
        """Greedy decoding while validating; SpeechBrain's CTC beam search on the test set."""
        sp = self.hparams.tokenizer.sp
        if stage == sb.Stage.TEST and self.hparams.beam_size > 1:
            if not hasattr(self, "beam_transcriber"):
                self.beam_transcriber = BeamTranscriber(sp, self.hparams.beam_size)
            return self.beam_transcriber(log_probs, enc_lengths)
        return greedy_transcripts(log_probs, enc_lengths, sp)

    def on_fit_batch_start(self, batch, should_step):
        super().on_fit_batch_start(batch, should_step)
        # Probing: no dropout in the frozen encoder. Here rather than in on_stage_start, whose
        # eval() SpeechBrain undoes with modules.train() right after it.
        if self.hparams.freeze_encoder:
            self.hparams.encoder.eval()

    def on_stage_start(self, stage, epoch=None):
        super().on_stage_start(stage, epoch)
        if stage != sb.Stage.TRAIN:
            set_dynamic_context(self.modules, self.hparams.valid_context,
                                self.hparams.context_presets)
            self.wer_metric = self.hparams.error_rate_computer()
            self.cer_metric = self.hparams.cer_computer()
            self.unknown_characters = set()

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage == sb.Stage.TRAIN:
            self.train_stats = {"loss": stage_loss}
            self.end_train_stage()
            return
        stats = {"loss": stage_loss, "WER": self.wer_metric.summarize("error_rate"),
                 "CER": self.cer_metric.summarize("error_rate")}
        self.warn_unknown_characters(stage)
        if stage == sb.Stage.VALID:
            self.log_epoch(epoch, stats)
            # Kept and averaged by valid CER: on small data the WER sits near 100 % and ranks
            # checkpoints by noise. The WER stays in the meta for reference.
            self.checkpointer.save_and_keep_only(
                meta={"CER": stats["CER"], "WER": stats["WER"]}, min_keys=["CER"],
                num_to_keep=self.hparams.checkpoints_to_keep)
        else:
            self.test_stats = stats
            self.hparams.train_logger.log_stats(
                stats_meta={"test with averaged checkpoints": self.averaged_checkpoints},
                test_stats=stats)
            if if_main_process():
                with open(Path(self.hparams.output_folder) / "test_wer.txt", "w") as f:
                    self.wer_metric.write_stats(f)

    def on_evaluate_start(self, max_key=None, min_key=None):
        """Test with the average of the best ``average_checkpoints`` checkpoints (by valid CER;
        WER for checkpoints of older runs)."""
        super().on_evaluate_start(max_key=max_key, min_key=min_key)
        # How many exist (a short run may have fewer than average_checkpoints): for the log.
        self.averaged_checkpoints = len(self.checkpointer.find_checkpoints(
            min_key=min_key or selection_key(self.checkpointer),
            max_num_checkpoints=self.hparams.average_checkpoints))
        load_averaged_best(self.checkpointer, {"encoder": self.hparams.encoder,
                                               "ctc_head": self.hparams.ctc_head},
                           self.hparams.average_checkpoints, min_key)

    def warn_unknown_characters(self, stage) -> None:
        """One warning per stage naming the reference characters the tokenizer lacks: the
        model cannot output them, so each counts as an error."""
        if self.unknown_characters:
            name = "valid_csv" if stage == sb.Stage.VALID else "test_csv"
            logger.warning("%s %s: the references hold characters outside the tokenizer's "
                           "vocabulary (%s); the model cannot output them: each counts as an error",
                           name, getattr(self.hparams, name),
                           " ".join(repr(c) for c in sorted(self.unknown_characters)))


BRAINS = {"ssl": SSLBrain, "ctc": CTCBrain}


def dataio_prepare(hparams: dict) -> dict:
    """``DynamicItemDataset``s (train, valid, and test for CTC) reading validated audio as ``sig``.

    For CTC, items also carry ``wrd`` and ``tokens`` (tokenizer ids + 1; 0 is the blank).
    """
    compute_features = hparams["compute_features"]
    # Shortest usable audio: enough samples for one encoder frame of features.
    min_samples = compute_features.min_samples(hparams["subsampling_factor"])
    names = ["train", "valid"] + (["test"] if hparams["task"] == "ctc" else [])
    datasets = {}
    for name in names:
        manifest = hparams[f"{name}_csv"]
        dataset = dataset_from_manifest(manifest, hparams["data_folder"], hparams["output_folder"])
        if hparams["check_audio"]:  # on the main process; torchrun stops the others on error
            run_on_main(check_manifest, [dataset, manifest, hparams["sample_rate"], min_samples])
        datasets[name] = dataset
    if hparams["sorting"] in ("ascending", "descending"):
        datasets["train"] = datasets["train"].filtered_sorted(
            sort_key="duration", reverse=hparams["sorting"] == "descending")
        hparams["train_dataloader_opts"]["shuffle"] = False
    for name in names[1:]:
        datasets[name] = datasets[name].filtered_sorted(sort_key="duration")

    sb.dataio.dataset.add_dynamic_item(list(datasets.values()),
                                       AudioReader(hparams["sample_rate"], min_samples),
                                       takes="wav", provides="sig")
    keys = ["id", "sig"]
    if hparams["task"] == "ctc":
        sb.dataio.dataset.add_dynamic_item(list(datasets.values()),
                                           TextTokens(hparams["tokenizer"].sp,
                                                      TextNormalizer(hparams["tokenizer"].sp)),
                                           takes="wrd", provides=["wrd", "tokens"])
        keys += ["wrd", "tokens"]
    sb.dataio.dataset.set_output_keys(list(datasets.values()), keys)
    return datasets


def make_train_loader(brain: sb.Brain, train_set, hparams: dict):
    """The training DataLoader, its order drawn from ``seed`` and new every epoch.

    Shuffling uses a ``ReproducibleRandomSampler`` and dynamic batching (``dynamic_batching``) a
    ``DynamicBatchSampler``, both seeded with ``seed``: a sampler draws its order from
    ``seed + epoch`` when ``set_epoch`` is called. SpeechBrain calls it on
    ``brain.train_sampler`` before each epoch but, in a single process, sets that attribute only
    for the sampler it makes itself (not for a batch sampler), so it is set here: otherwise every
    epoch would repeat the first one's batches. Under DDP SpeechBrain wraps the sampler (the
    wrapper passes ``set_epoch`` on). A resumed run regenerates its epoch's order and skips the
    batches already done (the loader's position is checkpointed).
    """
    seed = hparams["seed"]
    if hparams["dynamic_batching"]:
        sampler = DynamicBatchSampler(
            train_set, max_batch_length=hparams["max_batch_length"], num_buckets=20,
            length_func=lambda item: float(item["duration"]), shuffle=True, seed=seed)
        options = {"num_workers": hparams["num_workers"], "batch_sampler": sampler}
    else:
        options = dict(hparams["train_dataloader_opts"])
        sampler = None
        if options.pop("shuffle", False):
            sampler = options["sampler"] = ReproducibleRandomSampler(train_set, seed=seed)
    # The loader's own generator: starting an epoch draws a seed from it (for its workers), not
    # from the global generator that masks and dropout use (restored with checkpoints), so a run
    # resumed in the middle of an epoch makes the same draws as an uninterrupted one.
    options["generator"] = torch.Generator().manual_seed(seed)
    options["pin_memory"] = str(brain.device).startswith("cuda")  # copies that do not block
    loader = brain.make_dataloader(train_set, sb.Stage.TRAIN, **options)
    if brain.train_sampler is None:
        brain.train_sampler = sampler
    return loader


def load_pretrained_ssl(hparams: dict, ssl_folder: str) -> None:
    """Loads the encoder and the feature statistics of the best SSL checkpoint (Pretrainer)."""
    checkpoint = best_ssl_checkpoint(ssl_folder)
    if checkpoint is None:
        raise FileNotFoundError(f"--pretrained_ssl {ssl_folder}: no checkpoint under "
                                f"{Path(ssl_folder) / 'save'}; give an SSL output folder")
    pretrainer = sb.utils.parameter_transfer.Pretrainer(
        collect_in=Path(hparams["save_folder"]) / "pretrained_ssl",
        loadables={"encoder": hparams["encoder"], "normalize": hparams["normalize"]},
        paths={name: str(checkpoint / f"{name}.ckpt") for name in ("encoder", "normalize")})
    run_on_main(pretrainer.collect_files)
    try:
        pretrainer.load_collected()
    except RuntimeError as error:  # shapes differ: PyTorch lists every mismatching tensor
        if "size mismatch" not in str(error):
            raise
        first = [line.strip() for line in str(error).splitlines() if "size mismatch" in line][0]
        raise SystemExit(f"error: --pretrained_ssl {ssl_folder}: its encoder has other sizes "
                         f"than this run's ({first}); give the SSL "
                         "run's sizes (its hyperparams.yaml: d_model, num_encoder_layers, ...)"
                         ) from None
    logger.info("Encoder and feature statistics loaded from %s", checkpoint)


# Encoder arguments that change no tensor shape: a fine-tuning run may set its own.
NOT_SIZES = {"dropout", "activation_checkpointing", "scan_backend"}


def encoder_keys(hparams_file: str | Path) -> list[str]:
    """The top-level keys that the ``encoder:`` node of an hparams file refers to
    (``!ref <key>``), in order."""
    text = Path(hparams_file).read_text()
    block = re.search(r"^encoder:.*\n((?:[ \t]+.*\n|[ \t]*\n)*)", text, re.MULTILINE)
    return list(dict.fromkeys(re.findall(r"<(\w+)>", block.group(1)))) if block else []


def ssl_encoder_sizes(hparams_file: str, overrides: dict, given: set[str]) -> tuple[dict, str]:
    """With ``--pretrained_ssl``: the overrides plus the SSL run's encoder sizes, and a note.

    The sizes are the keys of the ``encoder:`` node (``d_model``, ``num_encoder_layers``,
    ``d_state``, ...) found in the SSL run's ``hyperparams.yaml``, minus ``NOT_SIZES``. A size
    given on the command line (``given``) is kept; one that differs from the SSL run's stops
    with one line (the weights could not load).

    Returns
    -------
    The overrides, and a line to log (empty when nothing was taken).
    """
    ssl_folder = overrides.get("pretrained_ssl")
    saved = Path(str(ssl_folder)) / "hyperparams.yaml"
    if not ssl_folder or not saved.is_file():  # load_pretrained_ssl names what is missing
        return overrides, ""
    ssl = hparams_data(saved.read_text())
    sizes = {k: ssl[k] for k in encoder_keys(hparams_file) if k in ssl and k not in NOT_SIZES}
    conflicts = [f"--{k} {overrides[k]} (it has {v})" for k, v in sizes.items()
                 if k in given and overrides[k] != v]
    if conflicts:
        raise SystemExit(f"error: --pretrained_ssl {ssl_folder}: its encoder has other sizes than "
                         f"{', '.join(conflicts)}; leave these flags out to take the SSL run's")
    taken = {k: v for k, v in sizes.items() if k not in given}
    note = ("Encoder sizes of the SSL run (%s): %s" % (
        saved, ", ".join(f"{k}={v}" for k, v in taken.items()))) if taken else ""
    return {**overrides, **taken}, note


# Lines to log once logging is set up (create_experiment_directory): decisions of the parsing.
NOTES: list[str] = []
DEVICE_PRESET_HELP = ("hparams/devices/<preset>.yaml: device, precision, batch size, workers "
                      "(default auto: cuda, else mps, else cpu)")


def recipe_options(hparams_file: str | Path) -> str:
    """``--help`` text of the recipe's own options: ``--device_preset`` and the top-level
    plain keys of the hparams file, with their values there and their trailing comments."""
    lines = ["", f"recipe options (any top-level key of {hparams_file}; default = its value):",
             f"  --device_preset {{auto,cpu,cuda,mps}}\n        {DEVICE_PRESET_HELP}"]
    try:
        text = Path(hparams_file).read_text()
    except OSError:
        return f"\n(give an hparams file before --help to list its options: {hparams_file} " \
               "is not readable)"
    for match in re.finditer(r"^([a-z]\w*):[ \t]*([^#\n]*?)[ \t]*(?:#[ \t]*(.*))?$", text,
                             re.MULTILINE):
        key, value, comment = match.groups()
        if not value or value.startswith(("!new:", "!name:", "!apply:")):
            continue  # a mapping or an object: not settable as one value
        value = value.removeprefix("!ref ")
        lines.append(f"  --{key} {value}" + (f"\n        {comment}" if comment else ""))
    mappings = re.findall(r"^([a-z]\w*):[ \t]*(?:#.*)?$", text, re.MULTILINE)
    if mappings:  # set as a YAML mapping: --context_presets "{low: [16, 1]}"
        lines.append(f"  mappings (--key \"{{...}}\"): {', '.join(mappings)}")
    return "\n".join(lines)


def parse_command_line(argv: list[str]) -> tuple[str, object, dict]:
    """hparams file, SpeechBrain run options, and the overrides: ``hparams/devices/<preset>.yaml``
    (``--device_preset``, default: detected) < command line. ``--pretrained_ssl``: the SSL
    run's encoder sizes, unless given (:func:`ssl_encoder_sizes`)."""
    NOTES.clear()
    if "-h" in argv or "--help" in argv:  # SpeechBrain's generic flags, then the recipe's own
        try:
            sb.parse_arguments(argv)
        finally:
            print(recipe_options(argv[0]) if argv and not argv[0].startswith("-") else
                  "\n(give an hparams file before --help to list the recipe's options)")
    preset = "auto"
    if "--device_preset" in argv:
        index = argv.index("--device_preset")
        preset = argv[index + 1] if index + 1 < len(argv) else ""
        argv = argv[:index] + argv[index + 2:]
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    if isinstance(run_opts.optimizer_step_limit, str):  # SpeechBrain 1.1.2 leaves it a string
        run_opts = dataclasses.replace(run_opts,
                                       optimizer_step_limit=int(run_opts.optimizer_step_limit))
    if preset == "auto":
        preset = "cuda" if torch.cuda.is_available() else (
            "mps" if torch.backends.mps.is_available() else "cpu")
    preset_file = ROOT / "hparams" / "devices" / f"{preset}.yaml"
    if not preset_file.is_file():
        raise SystemExit(f"error: --device_preset {preset!r}: no {preset_file}")
    merged = yaml.safe_load(preset_file.read_text())
    given = yaml.safe_load(overrides) or {}
    merged.update(given)
    merged, note = ssl_encoder_sizes(hparams_file, merged, set(given))
    if note:
        NOTES.append(note)
    logger.info("Device preset %s: %s", preset, preset_file)
    run_opts = resolve_device(run_opts, merged)
    if "precision" not in run_opts.overridden_args:  # --precision is taken as given
        merged["precision"] = native_precision(merged.get("precision"), run_opts.device)
    precision = run_opts.precision if "precision" in run_opts.overridden_args else merged.get(
        "precision")
    if precision == "bf16" and str(run_opts.device) == "cpu" and not cpu_has_native_bf16():
        logger.warning("This CPU (%s) has no native bf16 (AVX512-BF16 or AMX): bf16 matrix "
                       "products are emulated, ~20x slower than fp32 on an AVX2 EPYC; "
                       "use --precision fp32", torch.backends.cpu.get_cpu_capability())
    return hparams_file, run_opts, merged


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def native_precision(precision: str | None, device: str) -> str | None:
    """``precision``, except bf16 on a CUDA GPU without native bf16 (V100, T4: emulated, slow):
    fp16 there, which SpeechBrain trains with a GradScaler."""
    if (precision == "bf16" and str(device).startswith("cuda") and torch.cuda.is_available()
            and not torch.cuda.is_bf16_supported(including_emulation=False)):
        logger.warning("%s has no native bf16: training in fp16 with gradient scaling "
                       "(--precision bf16 forces bf16)", torch.cuda.get_device_name(device))
        return "fp16"
    return precision


def resolve_device(run_opts, overrides: dict):
    """``run_opts`` with this process's device (and the DDP backend, unless given).

    A device without an index (``cuda``, from the preset or ``--device``) becomes this rank's
    GPU under torchrun, ``cuda:<LOCAL_RANK>`` (``cuda:0`` in a single process). Without
    ``--distributed_backend``, CUDA uses NCCL and other devices gloo.
    """
    device = run_opts.device if "device" in run_opts.overridden_args else overrides.get("device")
    device = device or sb.utils.distributed.infer_device()
    if device == "cuda":
        device = f"cuda:{get_local_rank() or 0}"
    backend = run_opts.distributed_backend
    if "distributed_backend" not in run_opts.overridden_args:
        backend = "nccl" if device.startswith("cuda") else "gloo"
    chosen = run_opts.overridden_args | {"device", "distributed_backend"}
    return dataclasses.replace(run_opts, device=device, distributed_backend=backend,
                               overridden_args=chosen)


def resolve_hparams(hparams_file: str, overrides: dict) -> str:
    """The resolved hparams text (what ``hyperparams.yaml`` holds); a bad value: one line."""
    try:
        return resolved_hparams_text(hparams_file, overrides)
    except (KeyError, ValueError, TypeError) as error:
        raise SystemExit(f"error in {hparams_file} (or its overrides): {error}") from None


def load_hparams(hparams_file: str, overrides: dict) -> dict:
    """Loads the hparams file with the overrides; a bad value stops with one clear line.

    Under DDP the main process loads it first, alone: loading creates folders and trains the
    CTC tokenizer, which the other processes then find ready (and only read).
    """
    hparams = None
    for main_turn in (True, False):
        if if_main_process() == main_turn:
            with MainProcessContext():  # SpeechBrain's collectives inside become no-ops
                try:
                    with open(hparams_file) as f:
                        hparams = load_hyperpyyaml(f, overrides)
                except (KeyError, ValueError, TypeError) as error:
                    raise SystemExit(f"error in {hparams_file} (or its overrides): {error}") from None
        ddp_barrier()
    return hparams


def check_manifests(hparams: dict) -> None:
    """Each manifest of the run exists, has a row and the columns the task reads (CTC: ``wrd``
    too); else one ``ManifestError`` line naming the file and its ``--<name>_csv``."""
    names = ["train_csv", "valid_csv"]
    columns = ["ID", "duration", "wav"]
    if hparams.get("task") == "ctc":
        names += ["test_csv", "tokenizer_csv"]
        columns.append("wrd")
    for name in names:
        if hparams.get(name):
            check_manifest_file(hparams[name], columns, f"--{name}")


def peak_memory(device: str) -> float:
    """Peak memory of this process in MB: allocated GPU memory on CUDA, resident memory else."""
    if str(device).startswith("cuda"):
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def main(argv: list[str]) -> dict | None:
    """Trains (CTC: then tests); returns the summary on the main process, None on the others."""
    hparams_file, run_opts, overrides = parse_command_line(argv)
    try:
        check_device(run_opts.device)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    sb.utils.distributed.ddp_init_group(run_opts)  # before the hparams load (see load_hparams)
    # Before loading (which writes into the output folder): a folder with checkpoints is resumed
    # only under the hparams it ran with.
    resolved = resolve_hparams(hparams_file, overrides)
    resuming = check_resume(resolved)
    check_manifests(hparams_data(resolved))  # before the tokenizer trains on one of them
    hparams = load_hparams(hparams_file, overrides)
    if hparams["task"] not in BRAINS:
        raise SystemExit(f"error: task {hparams['task']!r} in {hparams_file}; known: {list(BRAINS)}")
    # <output_folder>/hyperparams.yaml: the experiment as run (overrides applied), which
    # evaluate.py and transcribe.py take as their hparams file; written once, not on a resume.
    sb.create_experiment_directory(experiment_directory=hparams["output_folder"],
                                   hyperparams_to_save=None if resuming else hparams_file,
                                   overrides=overrides)
    for note in NOTES:
        logger.info(note)
    record = None
    if if_main_process():  # what produced this run; also in the summary
        record = run_record(argv, hparams_file, overrides, hparams.get("pretrained_ssl"))
        write_json_atomic(Path(hparams["output_folder"]) / "run_record.json", record)
    if hparams["task"] == "ctc":
        pieces = hparams["tokenizer"].sp.get_piece_size()
        if pieces != hparams["vocab_size"]:
            raise SystemExit(f"error: the {hparams['token_type']} tokenizer of {hparams_file} has "
                             f"{pieces} tokens but vocab_size is {hparams['vocab_size']}; "
                             f"pass --vocab_size {pieces}")
    # Masks, dropout and noise continue exactly after a resume; optional, so that checkpoints
    # written before it existed still load.
    hparams["checkpointer"].add_recoverable("random_state", RandomState(), optional_load=True)
    datasets = dataio_prepare(hparams)
    if hparams.get("pretrained_ssl"):
        load_pretrained_ssl(hparams, hparams["pretrained_ssl"])
    brain = BRAINS[hparams["task"]](modules=hparams["modules"], opt_class=hparams.get("optimizer"),
                                    hparams=hparams, run_opts=run_opts,
                                    checkpointer=hparams["checkpointer"])
    brain.train_set = datasets["train"]
    train_loader = make_train_loader(brain, datasets["train"], hparams)
    if hparams["task"] == "ctc":
        brain.plan_schedule(len(train_loader) // hparams["grad_accumulation_factor"])
    start = time.time()
    brain.fit(brain.hparams.epoch_counter, train_loader, datasets["valid"],
              valid_loader_kwargs=hparams["valid_dataloader_opts"])
    train_seconds = round(time.time() - start, 1)
    if hparams["task"] == "ctc":
        brain.evaluate(datasets["test"], min_key=selection_key(brain.checkpointer),
                       test_loader_kwargs=hparams["valid_dataloader_opts"])
    if not if_main_process():
        return None
    history = json.loads((Path(hparams["output_folder"]) / "history.json").read_text())
    output_folder = str(Path(hparams["output_folder"]).resolve())
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    peak_memory_mb = peak_memory(brain.device)
    # The training stages alone (no validation, statistics pass or test): for throughput.
    common = {key: round(sum(h.get(key, 0.0) for h in history), 1)
              for key in ("train_stage_seconds", "train_audio_seconds")}
    common["record"] = record
    if brain.debug and not brain.debug_persistently:
        # SpeechBrain wrote them to a temporary folder, deleted at exit: say so, not only the
        # output folder (its logs stay).
        common["checkpoints"] = "none kept: --debug checkpoints are temporary (deleted at exit)"
        logger.warning("--debug: checkpoints were temporary and are deleted; %s holds logs only "
                       "(cannot be evaluated or resumed); run without --debug to keep them",
                       output_folder)
    if hparams["task"] == "ssl":
        return {
            "ssl_valid_loss_first": history[0]["valid"]["loss"],
            "ssl_valid_loss_last": history[-1]["valid"]["loss"],
            "ssl_masked_acc": history[-1]["valid"]["masked_acc"],
            "ssl_chance_acc": 1.0 / hparams["num_classes"],
            "ssl_code_usage": history[-1]["valid"]["code_usage"],
            "epochs": len(history),
            "train_seconds": train_seconds,
            "world_size": world_size,
            "peak_memory_mb": peak_memory_mb,
            "output_folder": output_folder,
            **common,
        }
    return {
        "ctc_wer": brain.test_stats["WER"], "ctc_cer": brain.test_stats["CER"],
        "ctc_valid_wer_first": history[0]["valid"]["WER"],
        "ctc_valid_wer_last": history[-1]["valid"]["WER"],
        "ctc_valid_cer_first": history[0]["valid"]["CER"],
        "ctc_valid_cer_last": history[-1]["valid"]["CER"],
        "epochs": len(history), "train_seconds": train_seconds, "world_size": world_size,
        "peak_memory_mb": peak_memory_mb, "ctc_hparams": str(Path(output_folder) / "hyperparams.yaml"),
        "ctc_output_folder": output_folder, **common,
    }


if __name__ == "__main__":
    try:
        result = main(sys.argv[1:])
    except (AudioFileError, FileNotFoundError, ManifestError) as error:
        # Also raised inside DataLoader workers: keep the message, drop the worker traceback.
        raise SystemExit(f"error: {str(error).strip().splitlines()[-1] if 'Traceback' in str(error) else error}")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if result is not None:
        print(json.dumps(result))
