"""CTC loss and decoding to text with a SentencePiece tokenizer (token id + 1 = output index,
0 = blank)."""
from __future__ import annotations

import logging
import math
from typing import NamedTuple

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


class CTCPrefixBeam:
    """Token-level CTC prefix beam search, frame by frame, so that a stream pushes chunks and
    keeps its n-best (token ids and CTC log-scores) for a second pass: pushing the frames in
    any chunking gives the same beams as one push of them all.

    Each prefix carries the log-probability of its alignments ending in blank and in a
    non-blank; a frame extends the ``beam_size`` best prefixes by the ``beam_size`` likeliest
    outputs of that frame, then the best ``beam_size`` prefixes stay. Without pruning
    (``beam_size`` at least the number of prefixes and outputs), a prefix's score is its exact
    CTC log-probability, ``-ctc_loss``. With a language model (shallow fusion), prefixes are
    ranked by ``CTC + lm_weight * LM + length_bonus * tokens`` log-scores, the LM scoring each
    token given the tokens before it (``modules.lm.LMScorer``); the bonus offsets the LM's
    preference for short prefixes (deletions).

    Written here: SpeechBrain's ``CTCPrefixBeamSearcher`` works on merged text (its vocabulary
    is strings) and gives no token sequences to rescore.

    Arguments
    ---------
    beam_size : prefixes kept, and outputs tried per frame.
    blank : the blank's output index (0 in our heads; a token's index is its id + 1).
    lm : next-token log-probabilities of token-id prefixes (``modules.lm.LMScorer``), or None.
    lm_weight : the LM's weight in the ranking.
    length_bonus : added to a prefix's ranking score per token.

    Example
    -------
    >>> log_probs = torch.tensor([[0.1, 0.8, 0.1], [0.8, 0.1, 0.1], [0.1, 0.1, 0.8]]).log()
    >>> search = CTCPrefixBeam(beam_size=4)
    >>> search.push(log_probs)
    >>> search.nbest()[0].prefix
    (1, 2)
    """

    def __init__(self, beam_size: int = 10, blank: int = 0, lm=None, lm_weight: float = 0.0,
                 length_bonus: float = 0.0):
        if beam_size < 1:
            raise ValueError(f"beam_size must be at least 1, got {beam_size}")
        self.beam_size, self.blank = beam_size, blank
        self.lm, self.lm_weight = lm, lm_weight if lm is not None else 0.0
        self.length_bonus = length_bonus
        # prefix -> (blank-ending, non-blank-ending) CTC log-scores; and its LM log-score.
        self.beams: dict[tuple[int, ...], tuple[float, float]] = {(): (0.0, -math.inf)}
        self.lm_scores: dict[tuple[int, ...], float] = {(): 0.0}
        self.lm_rows: dict[tuple[int, ...], list[float]] = {}  # next-token LM log-probs

    def push(self, log_probs: torch.Tensor) -> None:
        """(T, V) log-probabilities of the next frames (a leading batch dimension of 1 is
        allowed)."""
        frames = log_probs.reshape(-1, log_probs.shape[-1]).double()
        top = frames.topk(min(self.beam_size, frames.shape[-1]), dim=-1)
        for values, indices in zip(top.values.tolist(), top.indices.tolist()):
            self.beams = self._frame(dict(zip(indices, values)))

    def _frame(self, outputs: dict[int, float]) -> dict[tuple[int, ...], tuple[float, float]]:
        new: dict[tuple[int, ...], list[float]] = {}

        def add(prefix, blank_score, other_score):
            old = new.setdefault(prefix, [-math.inf, -math.inf])
            old[0], old[1] = _logadd(old[0], blank_score), _logadd(old[1], other_score)

        next_token = self._next_token_scores(outputs)
        for prefix, (blank_end, other_end) in self.beams.items():
            total = _logadd(blank_end, other_end)
            for index, score in outputs.items():
                if index == self.blank:
                    add(prefix, total + score, -math.inf)
                    continue
                extended = prefix + (index,)
                if extended not in self.lm_scores:
                    self.lm_scores[extended] = self.lm_scores[prefix] + next_token(prefix, index)
                if prefix and prefix[-1] == index:
                    add(prefix, -math.inf, other_end + score)  # the repeat collapses
                    add(extended, -math.inf, blank_end + score)  # after a blank
                else:
                    add(extended, -math.inf, total + score)
        best = sorted(new.items(), key=lambda item: -self._rank(*item))[:self.beam_size]
        self.lm_scores = {prefix: self.lm_scores[prefix] for prefix, _ in best}
        return {prefix: (scores[0], scores[1]) for prefix, scores in best}

    def _next_token_scores(self, outputs: dict[int, float]):
        """``(prefix, index) -> LM log-score of the index's token after the prefix`` (0 without
        an LM); the LM runs at most once per frame, on the kept prefixes it has not scored."""
        if self.lm is None or all(index == self.blank for index in outputs):
            return lambda prefix, index: 0.0
        # Most frames keep the beam's prefixes: the LM runs on the new ones only.
        self.lm_rows = {prefix: self.lm_rows[prefix] for prefix in self.beams
                        if prefix in self.lm_rows}
        new = [prefix for prefix in self.beams if prefix not in self.lm_rows]
        if new:
            rows = self.lm([[i - 1 for i in prefix] for prefix in new]).tolist()
            self.lm_rows.update(zip(new, rows))
        rows = self.lm_rows
        return lambda prefix, index: rows[prefix][index - 1]

    def _rank(self, prefix: tuple[int, ...], scores) -> float:
        return (_logadd(*scores) + self.lm_weight * self.lm_scores[prefix]
                + self.length_bonus * len(prefix))

    def nbest(self) -> list["Hypothesis"]:
        """The prefixes (output indices, blank excluded) with their CTC and LM log-scores,
        best first."""
        ranked = sorted(self.beams.items(), key=lambda item: -self._rank(*item))
        return [Hypothesis(prefix, _logadd(*scores), self.lm_scores[prefix])
                for prefix, scores in ranked]


class Hypothesis(NamedTuple):
    """A prefix of output indices (token id + 1) with its CTC and LM log-scores."""
    prefix: tuple[int, ...]
    ctc: float
    lm: float


def _logadd(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    return max(a, b) + math.log1p(math.exp(-abs(a - b)))
