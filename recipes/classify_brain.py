"""Utterance classification downstream of a streaming encoder (keyword spotting, intent): the
SUPERB protocol, a learnable weighted sum of the encoder's layers under one fixed streaming
context, mean-pooled into a small classifier; the encoder frozen or fine-tuned."""
from __future__ import annotations

import contextlib
import csv
import logging
from pathlib import Path

import torch

import speechbrain as sb
from speechbrain.utils.distributed import if_main_process, run_on_main

from modules.context import parse_context
from modules.schedulers import warmup_steps
from streaming_brain import StreamingBrain

logger = logging.getLogger(__name__)

# What the classifier reads: the layers of an SSL encoder loaded from an exported folder
# (recipes/export.py), those of the same encoder randomly initialized, or the features alone.
UPSTREAMS = ("ssl", "random", "fbank")


class ClassifyBrain(StreamingBrain):
    """Cross-entropy on pooled frames; checkpoints chosen by valid error (accuracy on dev).

    ``upstream``: ``ssl`` (the encoder and feature statistics of ``ssl_model``, pulled in by
    the ``pretrainer``), ``random`` (the same encoder, randomly initialized; statistics from
    the training set) or ``fbank`` (no encoder: the normalized features). The encoder runs under
    ``context`` in every stage (a streaming model classifies what it has heard so far).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        hparams = self.hparams
        if hparams.upstream not in UPSTREAMS:
            raise ValueError(f"upstream {hparams.upstream!r}: give one of {', '.join(UPSTREAMS)}")
        self.context = parse_context(hparams.context, hparams.context_presets)
        hparams.encoder.set_context(self.context)
        if hparams.upstream == "fbank":  # nothing of the encoder is trained or saved
            for name in ("encoder", "layer_sum"):
                del self.modules[name]
                self.checkpointer.recoverables.pop(name)
        elif hparams.freeze_encoder:  # before fit() would wrap it in DDP
            hparams.encoder.requires_grad_(False)
        if hparams.upstream == "ssl":
            self.load_ssl_model()
        self.frozen_layers: dict[str, torch.Tensor] = {}  # see cache_layers

    def load_ssl_model(self) -> None:
        """The encoder and feature statistics of the exported SSL folder ``ssl_model``
        (SpeechBrain's ``Pretrainer``: a missing or mismatching file is named)."""
        folder = self.hparams.ssl_model
        if not folder or not Path(str(folder)).is_dir():
            raise FileNotFoundError(f"--ssl_model {folder}: not a folder; export an SSL run with "
                                    "recipes/export.py <ssl run> --out <folder> and give it")
        pretrainer = self.hparams.pretrainer
        try:
            run_on_main(pretrainer.collect_files, kwargs={"default_source": str(folder)})
            pretrainer.load_collected()
        except ValueError as error:  # CheckedPretrainer names the file and the fix
            raise SystemExit(f"error: --ssl_model {folder}: {error}; or give this recipe the "
                             "encoder sizes of its hyperparams.yaml (--d_model ...)") from None
        logger.info("Encoder and feature statistics loaded from %s", folder)

    @property
    def encoder_trains(self) -> bool:
        return self.hparams.upstream != "fbank" and not self.hparams.freeze_encoder

    def plan_schedule(self, steps_per_epoch: int) -> None:
        """Each optimizer warms up over ``warmup_fraction`` of the run's steps, then decays
        linearly to 0 at its end."""
        epochs = self.hparams.number_of_epochs
        if self.debug:
            steps_per_epoch = min(steps_per_epoch, self.debug_batches)
            epochs = min(epochs, self.debug_epochs)
        total = max(1, steps_per_epoch * epochs)
        for schedule in self.hparams.lr_annealing.values():
            schedule.num_training_steps = total
            schedule.num_warmup_steps = warmup_steps(self.hparams.warmup_fraction, total)

    def init_optimizers(self):
        head = list(self.modules.classifier.parameters())
        if self.hparams.upstream != "fbank":
            head += list(self.modules.layer_sum.parameters())
        self.optimizers_dict = {"head": self.hparams.head_optimizer(head)}
        if self.encoder_trains:
            self.optimizers_dict["encoder"] = self.hparams.encoder_optimizer(
                self.hparams.encoder.parameters())
        for name, optimizer in self.optimizers_dict.items():
            self.checkpointer.add_recoverable(f"{name}_optimizer", optimizer)

    def lr_schedules(self) -> dict:
        return {name: (self.hparams.lr_annealing[name], optimizer)
                for name, optimizer in self.optimizers_dict.items()}

    def training_context(self, stage):
        """The fixed context (drawn from the one-context sampler while training, so the log
        counts the batches)."""
        return self.hparams.context_sampler.sample() if stage == sb.Stage.TRAIN else self.context

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device, non_blocking=True)
        self.training_context(stage)
        if self.hparams.upstream != "fbank" and not self.encoder_trains and all(
                utterance in self.frozen_layers for utterance in batch.id):
            layers, lengths = self.cached_layers(batch.id)
            return self.modules.classifier(self.modules.layer_sum(layers), lengths)
        wavs, wav_lens = batch.sig
        feats, frame_lengths = self.compute_features(wavs, wav_lens)
        lengths = frame_lengths / feats.shape[1]
        if self.hparams.upstream == "fbank":
            return self.modules.classifier(feats, lengths)
        with contextlib.nullcontext() if self.encoder_trains else torch.no_grad():
            layers = self.modules.encoder(feats, lengths, self.context, all_layers=True)
        # Each utterance's own encoder frames (its last one from a partial group of feature
        # frames, as in streaming), the same count the layer cache keeps.
        frames = -(-frame_lengths // self.hparams.subsampling_factor)
        if not self.encoder_trains:
            self.cache_layers(batch.id, layers, frames)
        return self.modules.classifier(self.modules.layer_sum(layers),
                                       frames / layers[0].shape[1])

    def cache_layers(self, ids: list[str], layers: list[torch.Tensor],
                     frames: torch.Tensor) -> None:
        """A frozen encoder (eval mode, no augmentation) gives each utterance the same layer
        outputs in every epoch: keep each one's (L, frames, D) frames and skip the encoder next
        time (SSL and random upstreams then train as fast as the fbank one)."""
        stacked = torch.stack(layers)  # (L, B, T', D)
        frames = frames.cpu()
        for index, utterance in enumerate(ids):
            self.frozen_layers[utterance] = stacked[:, index, :int(frames[index])].clone()

    def cached_layers(self, ids: list[str]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The cached layers of a batch, padded: L tensors (B, T', D) and (B,) relative lengths."""
        cached = [self.frozen_layers[utterance] for utterance in ids]
        longest = max(layers.shape[1] for layers in cached)
        padded = torch.stack([torch.nn.functional.pad(layers, (0, 0, 0, longest - layers.shape[1]))
                              for layers in cached], dim=1)  # (L, B, T', D)
        lengths = torch.tensor([layers.shape[1] / longest for layers in cached],
                               device=padded.device)
        return list(padded), lengths

    def compute_objectives(self, logits, batch, stage):
        targets = batch.label_encoded.data.to(logits.device).view(-1)
        loss = torch.nn.functional.cross_entropy(logits, targets)
        if stage != sb.Stage.TRAIN:
            decode = self.hparams.label_encoder.decode_ndim
            self.metrics.append(batch.id, decode(logits.argmax(-1).cpu()), decode(targets.cpu()))
        return loss

    def on_fit_batch_start(self, batch, should_step):
        super().on_fit_batch_start(batch, should_step)
        # A frozen encoder runs without dropout (SpeechBrain sets train() at each stage start).
        if self.hparams.upstream != "fbank" and not self.encoder_trains:
            self.hparams.encoder.eval()

    def on_stage_start(self, stage, epoch=None):
        super().on_stage_start(stage, epoch)
        self.metrics = sb.utils.metric_stats.ClassificationStats()

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage == sb.Stage.TRAIN:
            self.train_stats = {"loss": stage_loss}
            self.end_train_stage()
            return
        accuracy = self.metrics.summarize("accuracy")
        stats = {"loss": stage_loss, "accuracy": accuracy, "error": 1.0 - accuracy}
        if stage == sb.Stage.VALID:
            self.log_epoch(epoch, stats)
            self.checkpointer.save_and_keep_only(meta={"error": stats["error"]},
                                                 min_keys=["error"], num_to_keep=1)
            return
        self.test_stats = stats
        self.hparams.train_logger.log_stats(stats_meta={"test": "best checkpoint by valid error"},
                                            test_stats=stats)
        if if_main_process():
            self.write_predictions(Path(self.hparams.output_folder) / "test_predictions.csv")

    def write_predictions(self, path: Path) -> None:
        """One row per test utterance (ID, label, predicted): for paired comparisons of runs."""
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["ID", "label", "predicted"])
            writer.writerows(zip(self.metrics.ids, self.metrics.targets, self.metrics.predictions))
