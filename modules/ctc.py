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


class IncrementalGreedyCTC:
    """Best-path CTC decoding carried across chunks, in memory bounded by the text.

    Keeps the last output index (so a token repeated across a chunk boundary collapses, as in
    one pass), the finished words as text and the token ids of the open word only: a word is
    closed when the next piece starts a word (SentencePiece's ``▁``). ``text()`` equals
    :func:`greedy_transcripts` of all the log-probabilities so far.

    Example
    -------
    >>> import sentencepiece  # doctest: +SKIP
    >>> decoder = IncrementalGreedyCTC(sp)  # doctest: +SKIP
    >>> decoder.push(log_probs_of_chunk)  # (1, C, V + 1)  # doctest: +SKIP
    >>> decoder.text()  # doctest: +SKIP
    """

    def __init__(self, sp):
        self.sp = sp
        self.previous = 0  # blank: a first token is never collapsed
        self.done = ""  # the finished words, single-spaced
        self.open_word: list[int] = []  # token ids (without the +1 shift) of the last word

    def push(self, log_probs: torch.Tensor) -> None:
        """(1, C, V + 1) log-probabilities (or (C, V + 1)) of the next frames."""
        for index in log_probs.reshape(-1, log_probs.shape[-1]).argmax(-1).tolist():
            if index != self.previous and index != 0:
                if self.open_word and self.sp.id_to_piece(index - 1).startswith("▁"):
                    self.done = _join(self.done, self.sp.decode_ids(self.open_word))
                    self.open_word = []
                self.open_word.append(index - 1)
            self.previous = index

    def text(self) -> str:
        """The transcript so far, single-spaced."""
        return _join(self.done, self.sp.decode_ids(self.open_word))


def _join(text: str, words: str) -> str:
    """``text`` and ``words`` single-spaced (``text`` already is)."""
    words = " ".join(words.split())
    return f"{text} {words}" if text and words else text or words
