#!/usr/bin/env python3
"""Streaming self-supervised pretraining (BEST-RQ / NEST-style masked-token prediction).

The hparams file says which task it trains (``task: ssl``); the encoder, masker, quantizer,
context sampler and schedule are all defined there.

Usage::

    python recipes/train.py hparams/SSL/conformer.yaml [--device_preset cpu|cuda|mps] \\
        [--debug] [--any_hparam value ...]

The last line printed to stdout is one JSON object summarizing the run.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
import speechbrain as sb
import yaml
from hyperpyyaml import load_hyperpyyaml
from speechbrain.dataio.sampler import DynamicBatchSampler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataio import AudioFileError, check_manifest, dataset_from_manifest, load_audio  # noqa: E402
from modules.context import describe_context, set_dynamic_context  # noqa: E402
from modules.heads import masked_token_loss  # noqa: E402
from modules.masker import encoder_frame_mask  # noqa: E402

logger = logging.getLogger(__name__)


class SSLBrain(sb.Brain):
    """Masked-token prediction on a streaming encoder, one sampled context per batch."""

    def on_fit_start(self):
        super().on_fit_start()  # restores the latest checkpoint, if any
        if self.modules.normalize.count == 0:
            self._compute_normalization_stats()

    def _compute_normalization_stats(self):
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

    def compute_features(self, wavs, wav_lens, update_stats=False):
        """Waveforms -> globally normalized (B, T, n_mels) features and their lengths in frames."""
        num_samples = torch.round(wav_lens * wavs.shape[1]).long()
        frame_lengths = self.hparams.compute_features.num_frames(num_samples)
        feats = self.hparams.compute_features(wavs)
        # Statistics are only updated by the pass before training (epoch=None).
        epoch = None if update_stats else self.hparams.epoch_counter.current
        feats = self.modules.normalize(feats, frame_lengths / feats.shape[1], epoch=epoch)
        return feats, frame_lengths

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        feats, frame_lengths = self.compute_features(wavs, wav_lens)
        targets = self.modules.quantizer(feats)  # from clean features
        inputs = feats
        if stage == sb.Stage.TRAIN and self.hparams.denoising:
            inputs, _ = self.compute_features(self.hparams.add_noise(wavs, wav_lens), wav_lens)
        encoder = self.modules.encoder
        if stage == sb.Stage.TRAIN:
            context, generator = self.hparams.context_sampler.sample(), None
        else:  # fixed context and fixed masks: validation losses compare across epochs
            context, generator = encoder.context, self.valid_generator
        # Same draw for both; with per-layer caps the masker respects the narrowest layer.
        input_mask = self.modules.masker(inputs, frame_lengths, encoder.narrowest_context(context),
                                         generator=generator)
        encoded = encoder(
            self.modules.masker.apply(inputs, input_mask), frame_lengths / feats.shape[1], context)
        logits = self.modules.heads(encoded)
        frame_mask = encoder_frame_mask(input_mask, self.hparams.subsampling_factor)
        return logits, targets, frame_mask

    def compute_objectives(self, predictions, batch, stage):
        logits, targets, frame_mask = predictions
        if not frame_mask.any():
            # Utterances too short to mask anything: contribute nothing, but stay finite.
            self.empty_batches += 1
            return logits.sum() * 0.0
        loss = masked_token_loss(logits, targets, frame_mask)
        with torch.no_grad():
            masked_targets = targets[frame_mask]  # (N, books)
            self.correct += (logits[frame_mask].argmax(-1) == masked_targets).sum(0).cpu()
            self.masked_frames += masked_targets.shape[0]
            for book in range(self.num_books):
                self.code_counts[book] += torch.bincount(
                    masked_targets[:, book].cpu(), minlength=self.hparams.num_classes)
        return loss

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        if should_step:
            self.hparams.lr_annealing(self.optimizer)

    def on_stage_start(self, stage, epoch=None):
        self.num_books = self.hparams.num_books
        self.correct = torch.zeros(self.num_books, dtype=torch.long)
        self.masked_frames = 0
        self.empty_batches = 0
        self.code_counts = torch.zeros(self.num_books, self.hparams.num_classes, dtype=torch.long)
        if stage != sb.Stage.TRAIN:
            set_dynamic_context(self.modules, self.hparams.valid_context,
                                self.hparams.context_presets)
            self.valid_generator = torch.Generator().manual_seed(self.hparams.seed)

    def stage_stats(self, stage_loss):
        """Loss, masked-token accuracy per book, codebook usage and perplexity of the targets."""
        stats = {"loss": stage_loss}
        accuracy = self.correct.float() / max(self.masked_frames, 1)
        for book, value in enumerate(accuracy.tolist()):
            stats[f"acc_book{book}"] = value
        stats["masked_acc"] = accuracy.mean().item()
        probs = self.code_counts.float() / self.code_counts.sum(-1, keepdim=True).clamp(min=1)
        entropy = -(probs * probs.clamp(min=1e-12).log()).sum(-1)
        stats["code_usage"] = (self.code_counts > 0).float().mean().item()
        stats["code_perplexity"] = entropy.exp().mean().item()
        if self.empty_batches:
            stats["batches_without_mask"] = self.empty_batches
        return stats

    def on_stage_end(self, stage, stage_loss, epoch=None):
        stats = self.stage_stats(stage_loss)
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
            return
        if stage == sb.Stage.VALID:
            sampler = self.hparams.context_sampler
            meta = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"],
                    "contexts_drawn": sampler.pop_counts(),
                    "valid_context": describe_context(self.modules.encoder.context,
                                                      self.modules.encoder.frame_seconds)}
            self.hparams.train_logger.log_stats(stats_meta=meta, train_stats=self.train_stats,
                                                valid_stats=stats)
            self._append_history({"epoch": epoch, "train": self.train_stats, "valid": stats})
            self.checkpointer.save_and_keep_only(meta={"loss": stage_loss}, min_keys=["loss"],
                                                 num_to_keep=self.hparams.checkpoints_to_keep)

    def _append_history(self, record):
        """Per-epoch statistics in ``history.json`` (survives restarts; read for the summary)."""
        path = Path(self.hparams.output_folder) / "history.json"
        history = json.loads(path.read_text()) if path.exists() else []
        history = [h for h in history if h["epoch"] < record["epoch"]] + [record]
        path.write_text(json.dumps(history, indent=1))


BRAINS = {"ssl": SSLBrain}


def dataio_prepare(hparams: dict) -> tuple:
    """Train / valid ``DynamicItemDataset``s reading validated audio as ``sig``."""
    compute_features = hparams["compute_features"]
    # Shortest usable audio: enough samples for one encoder frame of features.
    min_samples = compute_features.min_samples(hparams["subsampling_factor"])
    datasets = []
    for name in ("train_csv", "valid_csv"):
        dataset = dataset_from_manifest(hparams[name], hparams["data_folder"], hparams["output_folder"])
        if hparams["check_audio"]:
            check_manifest(dataset, hparams[name], hparams["sample_rate"], min_samples)
        datasets.append(dataset)
    train, valid = datasets
    if hparams["sorting"] in ("ascending", "descending"):
        train = train.filtered_sorted(sort_key="duration",
                                      reverse=hparams["sorting"] == "descending")
        hparams["train_dataloader_opts"]["shuffle"] = False
    valid = valid.filtered_sorted(sort_key="duration")

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return load_audio(wav, hparams["sample_rate"], min_samples)

    sb.dataio.dataset.add_dynamic_item([train, valid], audio_pipeline)
    sb.dataio.dataset.set_output_keys([train, valid], ["id", "sig"])
    return train, valid


def load_hparams(argv: list[str]) -> tuple[str, object, dict]:
    """Parses the command line: hparams < ``hparams/devices/<preset>.yaml`` < command line."""
    preset = "auto"
    if "--device_preset" in argv:
        index = argv.index("--device_preset")
        preset = argv[index + 1] if index + 1 < len(argv) else ""
        argv = argv[:index] + argv[index + 2:]
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    if preset == "auto":
        preset = "cuda" if torch.cuda.is_available() else (
            "mps" if torch.backends.mps.is_available() else "cpu")
    preset_file = ROOT / "hparams" / "devices" / f"{preset}.yaml"
    if not preset_file.is_file():
        raise SystemExit(f"error: --device_preset {preset!r}: no {preset_file}")
    merged = yaml.safe_load(preset_file.read_text())
    merged.update(yaml.safe_load(overrides) or {})
    try:
        with open(hparams_file) as f:
            hparams = load_hyperpyyaml(f, merged)
    except (KeyError, ValueError, TypeError) as error:
        raise SystemExit(f"error in {hparams_file} (or its overrides): {error}") from None
    logger.info("Device preset %s: %s", preset, preset_file)
    return hparams_file, run_opts, hparams


def main(argv: list[str]) -> dict:
    hparams_file, run_opts, hparams = load_hparams(argv)
    if hparams["task"] not in BRAINS:
        raise SystemExit(f"error: task {hparams['task']!r} in {hparams_file}; known: {list(BRAINS)}")
    sb.create_experiment_directory(experiment_directory=hparams["output_folder"],
                                   hyperparams_to_save=hparams_file)
    train_set, valid_set = dataio_prepare(hparams)
    brain = BRAINS[hparams["task"]](modules=hparams["modules"], opt_class=hparams["optimizer"],
                                    hparams=hparams, run_opts=run_opts,
                                    checkpointer=hparams["checkpointer"])
    brain.train_set = train_set
    train_opts = hparams["train_dataloader_opts"]
    if hparams["dynamic_batching"]:
        train_opts = {"num_workers": hparams["num_workers"],
                      "batch_sampler": DynamicBatchSampler(
                          train_set, max_batch_length=hparams["max_batch_length"], num_buckets=20,
                          length_func=lambda item: float(item["duration"]), shuffle=True)}
    start = time.time()
    brain.fit(brain.hparams.epoch_counter, train_set, valid_set, train_loader_kwargs=train_opts,
              valid_loader_kwargs=hparams["valid_dataloader_opts"])
    history = json.loads((Path(hparams["output_folder"]) / "history.json").read_text())
    summary = {
        "ssl_valid_loss_first": history[0]["valid"]["loss"],
        "ssl_valid_loss_last": history[-1]["valid"]["loss"],
        "ssl_masked_acc": history[-1]["valid"]["masked_acc"],
        "ssl_chance_acc": 1.0 / hparams["num_classes"],
        "ssl_code_usage": history[-1]["valid"]["code_usage"],
        "epochs": len(history),
        "train_seconds": round(time.time() - start, 1),
        "output_folder": str(Path(hparams["output_folder"]).resolve()),
    }
    return summary


if __name__ == "__main__":
    try:
        result = main(sys.argv[1:])
    except (AudioFileError, FileNotFoundError) as error:
        # Also raised inside DataLoader workers: keep the message, drop the worker traceback.
        raise SystemExit(f"error: {str(error).strip().splitlines()[-1] if 'Traceback' in str(error) else error}")
    print(json.dumps(result))
