"""Joint CTC / attention training of a streaming encoder with an attention decoder
(Transformer or Mamba, ``modules.decoders``), and its decoding on the test set with one of
``modules.decoding.DECODINGS``: greedy CTC, the token-level CTC prefix beam, two-pass
attention rescoring of that beam's n-best, or the joint CTC / attention beam search."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import speechbrain as sb

from ctc_brain import CTCBrain
from modules.ctc import greedy_transcripts
from modules.decoding import DECODINGS, DecodingOptions, UtteranceDecoder, attention_beam_search


def check_decoding(decoding: str) -> None:
    """Refuses an unknown ``decoding`` in one line (before any training)."""
    if decoding not in DECODINGS:
        raise SystemExit(f"error: --decoding {decoding}: give one of {', '.join(DECODINGS)}")


def decoder_io(tokens: torch.Tensor, lengths: torch.Tensor, bos: int, eos: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, U) CTC targets (tokenizer id + 1, zero-padded) and (B,) relative lengths -> decoder
    inputs ``bos, t_1 .. t_n`` and targets ``t_1 .. t_n, eos`` in tokenizer ids, (B, U + 1)
    each; padding: ``eos`` in the inputs, -1 (ignored) in the targets.

    Example
    -------
    >>> decoder_io(torch.tensor([[3, 4], [5, 0]]), torch.tensor([1.0, 0.5]), 7, 8)
    (tensor([[7, 2, 3],
            [7, 4, 8]]), tensor([[ 2,  3,  8],
            [ 4,  8, -1]]))
    """
    counts = torch.round(lengths * tokens.shape[1]).long()
    inputs = torch.full((tokens.shape[0], tokens.shape[1] + 1), eos, dtype=torch.long)
    targets = torch.full_like(inputs, -1)
    for row, count in enumerate(counts.tolist()):
        ids = tokens[row, :count] - 1
        inputs[row, 0], inputs[row, 1:count + 1] = bos, ids
        targets[row, :count], targets[row, count] = ids, eos
    return inputs, targets


class S2SBrain(CTCBrain):
    """``ctc_weight * CTC + (1 - ctc_weight) * label-smoothed attention cross-entropy``; the CTC
    head and the decoder share the head optimizer. The decoder's vocabulary is the tokenizer's
    plus ``bos`` (``vocab_size``) and ``eos`` (``vocab_size + 1``); the CTC blank is the CTC
    head's own index 0. Validation decodes greedy CTC (checkpoints by valid CER); the test set
    decodes with ``decoding``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_decoding(self.hparams.decoding)

    def head_modules(self) -> dict[str, torch.nn.Module]:
        return {"ctc_head": self.hparams.ctc_head, "decoder": self.hparams.decoder}

    def compute_forward(self, batch, stage):
        encoded, enc_lengths = self.encode(batch, stage)
        log_probs = self.modules.ctc_head(encoded).log_softmax(-1)
        tokens, token_lengths = batch.tokens  # the CPU batch
        inputs, targets = decoder_io(tokens, token_lengths, self.hparams.bos_index,
                                     self.hparams.eos_index)
        frames = torch.round(enc_lengths * encoded.shape[1]).long().clamp(min=1)
        logits = self.modules.decoder(inputs.to(encoded.device), encoded,
                                      frames.to(encoded.device))
        return log_probs, enc_lengths, encoded, frames, logits, targets

    def compute_objectives(self, predictions, batch, stage):
        log_probs, enc_lengths, encoded, frames, logits, targets = predictions
        self.memory = encoded, frames  # for the test set's second pass (decode)
        ctc = super().compute_objectives((log_probs, enc_lengths), batch, stage)
        attention = F.cross_entropy(logits.transpose(1, 2), targets.to(logits.device),
                                    ignore_index=-1, label_smoothing=self.hparams.label_smoothing)
        weight = self.hparams.ctc_weight
        return weight * ctc + (1 - weight) * attention

    def decode(self, log_probs, enc_lengths, stage) -> list[str]:
        sp = self.hparams.tokenizer.sp
        if stage != sb.Stage.TEST or self.hparams.decoding == "ctc_greedy":
            return greedy_transcripts(log_probs, enc_lengths, sp)
        encoded, frames = self.memory
        hparams = self.hparams
        options = DecodingOptions(hparams.decoding, hparams.beam_size, hparams.ctc_weight_decode)
        if options.decoding == "attention":
            ids = attention_beam_search(hparams.decoder, hparams.ctc_head, encoded, frames,
                                        options, hparams.bos_index, hparams.eos_index)
        else:
            ids = []
            for row, count in enumerate(frames.tolist()):
                search = UtteranceDecoder(options, hparams.decoder, bos=hparams.bos_index,
                                          eos=hparams.eos_index)
                search.push(log_probs[row, :count])
                ids.append(search.finish(encoded[row:row + 1, :count]))
        return [" ".join(sp.decode_ids(tokens).split()) for tokens in ids]
