"""CTC loss and decoding to text with a SentencePiece tokenizer (token id + 1 = output index,
0 = blank)."""
from __future__ import annotations

import logging

import torch
from speechbrain.decoders import ctc_greedy_decode
from speechbrain.decoders.ctc import CTCBeamSearcher
from speechbrain.nnet.losses import ctc_loss as sb_ctc_loss

logger = logging.getLogger(__name__)
_devices_without_ctc: set[str] = set()


def ctc_loss(log_probs: torch.Tensor, targets: torch.Tensor, input_lengths: torch.Tensor,
             target_lengths: torch.Tensor) -> torch.Tensor:
    """SpeechBrain's CTC loss (blank 0, relative lengths); on a device without a CTC kernel
    (MPS in some PyTorch releases) it is computed on the CPU, with one warning.

    Arguments
    ---------
    log_probs : (B, T, V + 1) log-probabilities.
    targets : (B, U) token ids (+ 1).
    input_lengths, target_lengths : (B,) relative lengths.
    """
    device = log_probs.device.type
    if device not in _devices_without_ctc:
        try:
            return sb_ctc_loss(log_probs, targets, input_lengths, target_lengths, blank_index=0)
        except NotImplementedError as error:
            _devices_without_ctc.add(device)
            logger.warning("CTC loss is not implemented on %s (%s): computing it on the CPU",
                           device, str(error).splitlines()[0])
    loss = sb_ctc_loss(log_probs.cpu(), targets.cpu(), input_lengths.cpu(), target_lengths.cpu(),
                       blank_index=0)
    return loss.to(log_probs.device)


def greedy_transcripts(log_probs: torch.Tensor, lengths: torch.Tensor, sp) -> list[str]:
    """(B, T, V + 1) log-probabilities, relative lengths -> best-path texts, single-spaced
    (SentencePiece keeps a word boundary decoded at either end)."""
    ids = ctc_greedy_decode(log_probs, lengths, blank_id=0)
    return [" ".join(sp.decode_ids([i - 1 for i in seq]).split()) for seq in ids]


class BeamTranscriber:
    """SpeechBrain's CTC prefix beam search over the tokenizer's pieces (no language model)."""

    def __init__(self, sp, beam_size: int = 10):
        vocab = ["<blank>"] + [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        self.searcher = CTCBeamSearcher(blank_index=0, vocab_list=vocab, beam_size=beam_size)

    def __call__(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        """(B, T, V + 1) log-probabilities, relative lengths -> best-beam texts."""
        return [" ".join(hyps[0].text.split()) for hyps in self.searcher(log_probs, lengths)]
