"""Decoding modes of a joint CTC / attention model, the same for the test stage, evaluate.py,
``Recognizer`` and its streams.

``ctc_greedy``: best path. ``ctc_prefix_beam``: the token-level CTC prefix beam, frame by
frame (partial results as chunks arrive), optionally with LM shallow fusion.
``attention_rescoring`` (two-pass, WeNet U2): that beam's n-best rescored at the end of the
utterance by one teacher-forced decoder pass (and the LM). ``attention``: offline
autoregressive beam search, SpeechBrain's ``S2SBeamSearcher`` with its CTC prefix scorer and
Transformer LM scorer, running our decoder one cached step at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from speechbrain.decoders.scorer import CTCScorer, ScorerBuilder
from speechbrain.decoders.seq2seq import S2SBeamSearcher

from .ctc import CTCPrefixBeam
from .decoders import TokenDecoder, attention_rescoring
from .lm import LMScorer

DECODINGS = ("ctc_greedy", "ctc_prefix_beam", "attention_rescoring", "attention")
STREAMING_DECODINGS = DECODINGS[:3]  # a first pass frame by frame
NEVER = -1.0e4  # a logit no softmax picks (finite: no NaN in log-sum-exps)


@dataclass(frozen=True)
class DecodingOptions:
    """How to decode.

    Arguments
    ---------
    decoding : one of ``DECODINGS``.
    beam_size : prefixes (CTC beam, n-best to rescore) or hypotheses (attention) kept.
    ctc_weight : ``ctc_weight * CTC + (1 - ctc_weight) * attention`` log-scores (rescoring and
        attention beam search).
    lm_weight : weight of the LM's log-score (0: no LM).
    length_bonus : added per token to the CTC prefix beam's ranking and to the rescored score
        (offsets the deletions an LM favours); the attention search normalizes by length.
    """
    decoding: str = "ctc_greedy"
    beam_size: int = 10
    ctc_weight: float = 0.4
    lm_weight: float = 0.0
    length_bonus: float = 0.0

    def __post_init__(self):
        if self.decoding not in DECODINGS:
            raise ValueError(f"decoding {self.decoding!r}: give one of {', '.join(DECODINGS)}")
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be at least 1, got {self.beam_size}")
        if not 0.0 <= self.ctc_weight <= 1.0:
            raise ValueError(f"ctc_weight must lie in [0, 1], got {self.ctc_weight}")
        if self.lm_weight < 0.0:
            raise ValueError(f"lm_weight must be >= 0, got {self.lm_weight}")

    @property
    def needs_decoder(self) -> bool:
        return self.decoding in ("attention_rescoring", "attention")


class UtteranceDecoder:
    """One utterance's decoding from its CTC log-probabilities, pushed in chunks (first pass),
    then ``finish`` with the encoder output (second pass, ``attention_rescoring``).

    Pushing the frames in any chunking gives the same partial and final results as one push.
    ``attention`` is not a streaming mode: use :func:`attention_beam_search`.

    Arguments
    ---------
    options : the decoding.
    decoder : the attention decoder (``attention_rescoring``).
    lm : an ``LMScorer`` or ``NGramScorer`` (fusion when ``options.lm_weight > 0``).
    bos, eos : the decoder's (and LM's) begin and end tokens.
    """

    def __init__(self, options: DecodingOptions, decoder: TokenDecoder | None = None,
                 lm: LMScorer | None = None, bos: int | None = None, eos: int | None = None):
        if options.decoding not in STREAMING_DECODINGS:
            raise ValueError(f"decoding {options.decoding!r} is offline only: give one of "
                             f"{', '.join(STREAMING_DECODINGS)} to decode chunk by chunk")
        if options.needs_decoder and decoder is None:
            raise ValueError(f"decoding {options.decoding} needs an attention decoder: give an "
                             "S2S model (hparams/S2S/*.yaml)")
        self.options, self.decoder, self.bos, self.eos = options, decoder, bos, eos
        self.lm = lm if options.lm_weight > 0 else None
        self.beam = None
        if options.decoding != "ctc_greedy":
            self.beam = CTCPrefixBeam(options.beam_size, lm=self.lm, lm_weight=options.lm_weight,
                                      length_bonus=options.length_bonus)
        self.greedy: list[int] = []  # best-path token ids
        self.previous = 0  # the last best-path output index (0: blank)

    def push(self, log_probs: torch.Tensor) -> None:
        """(T, V + 1) CTC log-probabilities of the next frames (a leading 1 allowed)."""
        log_probs = log_probs.reshape(-1, log_probs.shape[-1])
        if self.beam is not None:
            self.beam.push(log_probs)
            return
        for index in log_probs.argmax(-1).tolist():
            if index != self.previous and index != 0:
                self.greedy.append(index - 1)
            self.previous = index

    def partial(self) -> list[int]:
        """The first pass's best token ids so far."""
        if self.beam is None:
            return list(self.greedy)
        return [index - 1 for index in self.beam.nbest()[0].prefix]

    @torch.no_grad()
    def finish(self, memory: torch.Tensor | None = None) -> list[int]:
        """The final token ids; ``attention_rescoring`` rescores the n-best with ``memory``,
        (1, T, D) the utterance's encoder output."""
        if self.options.decoding == "ctc_prefix_beam" and self.lm is not None:
            return self._ended_best()
        if self.options.decoding != "attention_rescoring":
            return self.partial()
        if memory is None:
            raise ValueError("attention_rescoring: finish needs the utterance's encoder output")
        nbest = [([index - 1 for index in h.prefix], h.ctc) for h in self.beam.nbest()]
        rescored = attention_rescoring(self.decoder, memory, memory.shape[1], nbest, self.bos,
                                       self.eos, self.options.ctc_weight)
        lm_scores = [0.0] * len(rescored) if self.lm is None else self.lm.sentence_scores(
            [tokens for tokens, _, _ in rescored])
        fused = [(score + self.options.lm_weight * lm + self.options.length_bonus * len(tokens),
                  tokens) for (tokens, score, _), lm in zip(rescored, lm_scores)]
        return max(fused, key=lambda item: item[0])[1]

    def _ended_best(self) -> list[int]:
        """The prefix beam's best hypothesis once the sentence ends: its ranking plus the
        LM's end-of-sentence score (a word LM closes the open word there: a prefix ending
        inside a word that is no word loses to any n-best hypothesis that ends in a word)."""
        nbest = self.beam.nbest()
        ends = self.lm([[index - 1 for index in h.prefix] for h in nbest])[:, self.lm.eos]
        ranked = [(h.ctc + self.options.lm_weight * (h.lm + float(end))
                   + self.options.length_bonus * len(h.prefix), h.prefix)
                  for h, end in zip(nbest, ends)]
        return [index - 1 for index in max(ranked, key=lambda item: item[0])[1]]


class SearchVocabulary(torch.nn.Module):
    """Scores of one vocabulary for SpeechBrain's joint search, which needs the CTC blank, bos
    and eos at distinct indices of a single vocabulary: token ids, ``bos``, ``eos`` (the
    decoder's), then the blank. Wraps a CTC head (blank first, token id + 1: reordered) or a
    model with the decoder's vocabulary (given a blank column no search picks)."""

    def __init__(self, module: torch.nn.Module, ctc: bool):
        super().__init__()
        self.module, self.ctc = module, ctc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.module(x)
        if self.ctc:  # tokens, bos and eos (never emitted by CTC), blank
            never = torch.full_like(logits[..., :2], NEVER)
            return torch.cat([logits[..., 1:], never, logits[..., :1]], dim=-1)
        return torch.cat([logits, torch.full_like(logits[..., :1], NEVER)], dim=-1)


class OpenScorerBuilder(ScorerBuilder):
    """SpeechBrain's ``ScorerBuilder`` that also takes scorers defined outside SpeechBrain (its
    check accepts only the names of its own module's scorers), such as
    ``modules.word_ngram.PrefixSearchScorer``."""

    def _validate_scorer(self, scorer_names):
        super()._validate_scorer([*scorer_names, *self.full_scorers, *self.partial_scorers])


class AttentionBeamSearcher(S2SBeamSearcher):
    """SpeechBrain's beam search over our decoder, one cached step per token (the decoder's
    state is the searcher's memory; ``permute_mem`` reorders it for the surviving beams)."""

    def __init__(self, decoder: TokenDecoder, **kwargs):
        super().__init__(**kwargs)
        self.decoder = decoder

    def set_n_out(self):
        return self.decoder.vocab_size + 1  # the search vocabulary: the decoder's and the blank

    def reset_mem(self, batch_size, device):
        return None  # the first step starts the decoder on the (beam-repeated) encoder output

    def forward_step(self, inp_tokens, memory, enc_states, enc_lens):
        if memory is None:
            memory = self.decoder.start(enc_states, enc_lens.long().clamp(min=1))
        logits = self.decoder.step(inp_tokens, memory)
        blank = torch.full_like(logits[:, :1], NEVER)
        return torch.cat([logits, blank], -1).float().log_softmax(-1), memory, None

    def permute_mem(self, memory, index):
        return self.decoder.reorder(memory, index.reshape(-1))

    def _compute_scores_and_next_inp_tokens(self, alived_hyps, log_probs, step):
        # A beam wider than the live continuations (the first step extends one hypothesis: at
        # most the vocabulary) is filled with the blank and dead beams' entries. The blank is
        # no decoder or LM token, so such a filler goes on as token 0; its score (NEVER or
        # -inf) keeps it from winning. SpeechBrain 1.1's method, overridden for this alone.
        scores, candidates, predecessors, tokens, alived_hyps = \
            super()._compute_scores_and_next_inp_tokens(alived_hyps, log_probs, step)
        tokens = tokens.masked_fill(tokens == self.n_out - 1, 0)
        return scores, candidates, predecessors, tokens, alived_hyps


@torch.no_grad()
def attention_beam_search(decoder: TokenDecoder, ctc_head: torch.nn.Module,
                          memory: torch.Tensor, frame_counts: torch.Tensor,
                          options: DecodingOptions, bos: int, eos: int,
                          lm: LMScorer | None = None,
                          max_decode_ratio: float = 1.0) -> list[list[int]]:
    """``attention`` decoding of a batch, utterance by utterance: joint CTC / attention beam
    search with the LM.

    Arguments
    ---------
    decoder, ctc_head : the model's (the CTC head's blank at index 0).
    memory : (B, T, D) encoder output; ``frame_counts`` (B,) its frames per utterance.
    options : beam size, CTC weight, LM weight.
    lm : the LM (``modules.lm.LMScorer`` or ``modules.ngram.NGramScorer``), used when
        ``options.lm_weight > 0``.
    max_decode_ratio : at most this many tokens per encoder frame.

    Returns
    -------
    The best token ids of each utterance.
    """
    vocab = decoder.vocab_size  # tokens, bos, eos; the blank is the search's last index
    scorers, weights = [], {}
    if options.ctc_weight > 0:
        scorers.append(CTCScorer(SearchVocabulary(ctc_head, ctc=True), blank_index=vocab,
                                 eos_index=eos))
        weights["ctc"] = options.ctc_weight
    if lm is not None and options.lm_weight > 0:
        if not hasattr(lm, "search_scorer"):
            raise TypeError(f"lm: give a modules.lm.LMScorer (wrapping the LM module), a "
                            f"modules.ngram.NGramScorer or a modules.word_ngram.WordNGramScorer, "
                            f"not a {type(lm).__name__}")
        scorer = lm.search_scorer()
        scorers.append(scorer)  # ScorerBuilder keys weights by the scorer's class name
        weights[type(scorer).__name__.lower().split("scorer")[0]] = options.lm_weight
    searcher = AttentionBeamSearcher(
        decoder, bos_index=bos, eos_index=eos, min_decode_ratio=0.0,
        max_decode_ratio=max_decode_ratio, beam_size=options.beam_size,
        scorer=OpenScorerBuilder(full_scorers=scorers, weights=weights) if scorers else None,
        using_eos_threshold=False, length_normalization=True)
    # One utterance at a time: SpeechBrain bounds every hypothesis of a batch by the longest
    # utterance's frames, so a batch mate would change a short utterance's result.
    found = []
    for row, count in enumerate(frame_counts.tolist()):
        hyps, _, _, _ = searcher(memory[row:row + 1, :count], torch.ones(1, device=memory.device))
        found.append([int(token) for token in hyps[0] if token < vocab - 2])
    return found
