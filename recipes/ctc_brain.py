"""CTC fine-tuning (from an SSL encoder or from scratch): head-only phase, per-module LRs,
multi-context validation, checkpoints chosen by valid CER, greedy or beam decoding."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

import speechbrain as sb
from speechbrain.augment.time_domain import SpeedPerturb
from speechbrain.utils.distributed import if_main_process

from inference import TextNormalizer, load_averaged_best, selection_key
from modules.context import set_dynamic_context
from modules.ctc import BeamTranscriber, ctc_loss, greedy_transcripts
from modules.schedulers import warmup_steps
from streaming_brain import StreamingBrain

logger = logging.getLogger(__name__)


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

    def head_modules(self) -> dict[str, torch.nn.Module]:
        """What the head optimizer trains (and what the test averages, with the encoder)."""
        return {"ctc_head": self.hparams.ctc_head}

    def init_optimizers(self):
        head = [p for module in self.head_modules().values() for p in module.parameters()]
        self.optimizers_dict = {"head": self.hparams.head_optimizer(head)}
        if not self.hparams.freeze_encoder:
            self.optimizers_dict["encoder"] = self.hparams.encoder_optimizer(
                [p for p in self.hparams.encoder.parameters() if p.requires_grad])
        for name, optimizer in self.optimizers_dict.items():
            self.checkpointer.add_recoverable(f"{name}_optimizer", optimizer)

    def compute_forward(self, batch, stage):
        encoded, enc_lengths = self.encode(batch, stage)
        return self.modules.ctc_head(encoded).log_softmax(-1), enc_lengths

    def encode(self, batch, stage) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's (B, T', D) encoder output under this stage's context, and its (B,)
        relative lengths on the CPU (where CTC reads them)."""
        host_wav_lens = batch.sig[1].cpu()  # the loader's CPU copy: CTC lengths without a GPU sync
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
        host_frames = self.frame_lengths(host_wav_lens, wavs.shape[1])
        enc_lengths = -(-host_frames // self.hparams.subsampling_factor) / encoded.shape[1]
        return encoded, enc_lengths

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
                                               **self.head_modules()},
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
