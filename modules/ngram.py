"""An n-gram token language model for decoding: a KenLM model (ARPA or binary, made by
``lmplz`` from text written as the ASR tokenizer's ids, ``hparams/LM/ngram.yaml``), scoring next
tokens for shallow fusion exactly where the neural LM does (``modules.lm.LMScorer``'s interface).

Its words are token ids written in decimal (``"17"``), so that any tokenizer's pieces, spaces
and markers included, are one unambiguous word each; ``<s>`` and ``</s>`` are KenLM's. The
``kenlm`` Python package is optional (``make kenlm``); it is imported when a model is loaded.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from speechbrain.decoders.scorer import KenLMScorer as SpeechBrainKenLMScorer

MODEL_FILE = "lm.bin"  # in the n-gram run's folder, beside lm.arpa
LN10 = math.log(10.0)  # KenLM scores are log10
NEVER = -1.0e4  # log-score of what the LM never emits (bos); finite: no NaN in sums


def import_kenlm():
    """The ``kenlm`` module, or one line saying how to install it."""
    try:
        import kenlm
    except ImportError:
        raise ImportError("the n-gram LM needs the kenlm Python package: run `make kenlm` "
                          "(or pip install -r requirements-ngram.txt)") from None
    return kenlm


class NGramScorer:
    """Next-token log-probabilities (natural log) of token-id prefixes under a KenLM model.

    Arguments
    ---------
    model_path : the ARPA or KenLM binary file.
    vocab_size : the tokenizer's pieces; scores come in the decoder's vocabulary: the ids, then
        ``bos`` (``vocab_size``, never emitted) and ``eos`` (``vocab_size + 1``, ``</s>``).

    A row costs one KenLM lookup per token of the vocabulary: cheap for characters; with a
    large subword vocabulary the CTC prefix beam's rows grow costly.

    Example
    -------
    >>> scorer = NGramScorer("results/ngram/lm.bin", vocab_size=29)  # doctest: +SKIP
    >>> scorer([[], [3, 4]]).shape  # doctest: +SKIP
    torch.Size([2, 31])
    """

    def __init__(self, model_path: str | Path, vocab_size: int):
        self.kenlm = import_kenlm()
        if not Path(model_path).is_file():
            raise FileNotFoundError(f"n-gram model {model_path} not found: train it with "
                                    "python recipes/train.py hparams/LM/ngram.yaml --asr_run ...")
        try:
            self.model = self.kenlm.Model(str(model_path))
        except (OSError, RuntimeError) as error:  # truncated or foreign file
            raise ValueError(f"n-gram model {model_path}: KenLM cannot read it ({error}); train "
                             "it again with hparams/LM/ngram.yaml") from None
        self.vocab_size, self.bos, self.eos = vocab_size, vocab_size, vocab_size + 1
        self.words = [str(i) for i in range(vocab_size)] + ["<s>", "</s>"]
        start = self.kenlm.State()
        self.model.BeginSentenceWrite(start)
        self.states: dict[tuple[int, ...], object] = {(): start}  # the state after a prefix

    def state(self, prefix: tuple[int, ...]):
        """KenLM's state after ``<s>`` and ``prefix`` (cached, built from the longest cached
        prefix)."""
        if prefix not in self.states:
            previous = self.state(prefix[:-1])
            after = self.kenlm.State()
            self.model.BaseScore(previous, self.words[prefix[-1]], after)
            if len(self.states) > 100_000:  # a long decode: states of dead prefixes go
                self.states = {(): self.states[()]}
            self.states[prefix] = after
        return self.states[prefix]

    def next_scores(self, prefix: tuple[int, ...]) -> list[float]:
        """Log-probability of every token of the decoder's vocabulary after ``prefix``."""
        state, out = self.state(prefix), self.kenlm.State()
        row = [LN10 * self.model.BaseScore(state, word, out) for word in self.words]
        row[self.bos] = NEVER
        return row

    def __call__(self, prefixes: list[list[int]]) -> torch.Tensor:
        """Token-id prefixes -> (N, vocab_size + 2) log-probabilities of the next token."""
        return torch.tensor([self.next_scores(tuple(p)) for p in prefixes], dtype=torch.float32)

    def sentence_scores(self, token_lists: list[list[int]]) -> list[float]:
        """Log-probability of each whole sentence, ``</s>`` included."""
        return [LN10 * self.model.score(" ".join(map(str, tokens)), bos=True, eos=True)
                for tokens in token_lists]

    def search_scorer(self) -> "KenLMScorer":
        """The scorer of SpeechBrain's beam search over the search vocabulary of
        ``modules.decoding.SearchVocabulary`` (ids, bos, eos, blank)."""
        return KenLMScorer(self)


class KenLMScorer(SpeechBrainKenLMScorer):
    """SpeechBrain's ``KenLMScorer`` on our model and words, starting every hypothesis after
    ``<s>`` (SpeechBrain's starts from an empty context, scoring the first token as if it were
    anywhere in a sentence). The blank word is unknown to the model; the decoder never emits it.
    Same class name as SpeechBrain's: ``ScorerBuilder`` keys its weights by the class name.
    """

    def __init__(self, ngram: NGramScorer):  # KenLMScorer.__init__ would load the file again
        self.kenlm, self.lm = ngram.kenlm, ngram.model
        self.id2char = ngram.words + ["<blank>"]
        self.vocab_size = len(self.id2char)
        self.full_candidates = np.arange(self.vocab_size)
        self.minus_inf = NEVER

    def score(self, inp_tokens, memory, candidates, attn):
        if memory is None:
            start = self.kenlm.State()
            self.lm.BeginSentenceWrite(start)
            rows = inp_tokens.size(0)
            memory = (np.array([start] * rows, dtype=object), np.ones(rows))
        return super().score(inp_tokens, memory, candidates, attn)
