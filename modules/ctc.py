"""CTC decoding to text with a SentencePiece tokenizer (token id + 1 = output index, 0 = blank)."""
from __future__ import annotations

import torch
from speechbrain.decoders import ctc_greedy_decode
from speechbrain.decoders.ctc import CTCBeamSearcher


def greedy_transcripts(log_probs: torch.Tensor, lengths: torch.Tensor, sp) -> list[str]:
    """(B, T, V + 1) log-probabilities, relative lengths -> best-path texts."""
    ids = ctc_greedy_decode(log_probs, lengths, blank_id=0)
    return [sp.decode_ids([i - 1 for i in seq]) for seq in ids]


class BeamTranscriber:
    """SpeechBrain's CTC prefix beam search over the tokenizer's pieces (no language model)."""

    def __init__(self, sp, beam_size: int = 10):
        vocab = ["<blank>"] + [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        self.searcher = CTCBeamSearcher(blank_index=0, vocab_list=vocab, beam_size=beam_size)

    def __call__(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        """(B, T, V + 1) log-probabilities, relative lengths -> best-beam texts."""
        return [" ".join(hyps[0].text.split()) for hyps in self.searcher(log_probs, lengths)]
