"""SSL pretraining: masked-token prediction (BEST-RQ / NEST style) under a sampled context."""
from __future__ import annotations

import logging

import torch

import speechbrain as sb
from speechbrain.utils.distributed import ddp_all_reduce

from modules.context import set_dynamic_context
from modules.heads import masked_positions, masked_token_loss
from modules.masker import encoder_frame_mask, masked_frame_counts
from streaming_brain import StreamingBrain

logger = logging.getLogger(__name__)


class SSLBrain(StreamingBrain):
    """Masked-token prediction on a streaming encoder, one sampled context per batch."""

    def compute_forward(self, batch, stage):
        # Masks are drawn on the host, from the loader's CPU lengths: no GPU sync (issue 21).
        host_lengths = self.frame_lengths(batch.sig[1].cpu(), batch.sig[0].shape[1])
        batch = batch.to(self.device, non_blocking=True)
        wavs, wav_lens = batch.sig
        feats, frame_lengths = self.compute_features(wavs, wav_lens)
        targets = self.modules.quantizer(feats, frame_lengths / feats.shape[1])  # clean features
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
