"""A word n-gram language model over a lexicon, scored token by token: shallow fusion of a
KenLM *word* model (``hparams/LM/word_ngram.yaml``) wherever the token LMs fuse (the CTC prefix
beam, chunk by chunk; attention rescoring; the attention beam search).

A token-level search proposes pieces; a word LM scores words. The pieces of a word are scored
by *look-ahead*: a partial word scores the unigram log-probability of its likeliest completion
in the lexicon (``smear``), each piece adding the change in that bound, and the word's last
piece is scored when the next word starts or the sentence ends, replacing the bound with the
word's log-probability given the words before it. Along a whole sentence the increments
telescope, so its score is exactly the word LM's sentence log-probability (``</s>`` included).
A piece that leaves the lexicon scores ``NEVER``: the search only spells lexicon words, the
usual lexicon-constrained decoding (flashlight's, WeNet's TLG), so a word outside the lexicon
is always an error, which the LM run reports as its OOV rate. A *word list* widens the lexicon
beyond the LM's text (as flashlight's lexicon decoder scores lexicon words its LM lacks as
``unk``): a listed word the model never counted scores KenLM's ``<unk>`` in its context plus
``word_list_penalty``. Each listed word gets ``<unk>``'s whole probability, so with many words
and a small penalty the model no longer sums to one (tune the penalty on dev), and KenLM
scores the word after an unknown one without the words before it. With an ``oov_penalty`` the
search may leave the lexicon: such a word scores ``<unk>`` plus the penalty per character (the
open-vocabulary option of lexicon decoders).

Written here: SpeechBrain's ``KenLMScorer`` treats each token as a word, and flashlight's
lexicon decoder (torchaudio's ``ctc_decoder``) neither gives an n-best to rescore nor plugs
into our prefix beam or SpeechBrain's attention search. The lexicon and its unigram bounds come
from the ARPA file's 1-grams, so the two cannot disagree.

Pieces are SentencePiece's: ``▁`` at the start of a piece begins a word (a character model
has ``▁`` alone); control and unknown pieces are never emitted.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from speechbrain.decoders.scorer import BaseScorerInterface

from .ngram import LN10, NEVER, import_kenlm

WORD_START = "\u2581"  # SentencePiece's word-boundary marker
WORD_LIST_FILE = "word_list.txt"  # an LM run's copy of its word list (hparams word_list)
CACHED_PREFIXES = 20_000  # states kept (a search needs its beam's and their parents')


class LexiconNode:
    """A node of the lexicon trie: the characters so far of one or more words."""
    __slots__ = ("children", "smear", "is_word", "penalty")

    def __init__(self):
        self.children: dict[str, LexiconNode] = {}
        self.smear = -math.inf  # the best unigram log-probability of a word below this node
        self.is_word = False
        self.penalty = 0.0  # added to the word's LM score: a listed word the LM never counted

    def walk(self, text: str) -> "LexiconNode | None":
        """The node after ``text`` (None: no lexicon word continues this way)."""
        node = self
        for char in text:
            node = node.children.get(char)
            if node is None:
                return None
        return node


def tokenizer_pieces(sp) -> list[str | None]:
    """Each id's piece of a SentencePiece processor; None for pieces never emitted (control,
    unknown, unused)."""
    return [None if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) else
            sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def read_unigrams(arpa: str | Path) -> dict[str, float]:
    """The 1-grams of an ARPA file: word -> natural-log probability (``<s>`` and ``</s>`` left
    out; ``<unk>`` kept)."""
    unigrams, inside = {}, False
    with open(arpa, encoding="utf-8") as lines:
        for line in lines:
            if line.startswith("\\1-grams:"):
                inside = True
            elif inside and line.startswith("\\"):
                break
            elif inside and line.strip():
                fields = line.split("\t")
                if fields[1].strip() not in ("<s>", "</s>"):
                    unigrams[fields[1].strip()] = LN10 * float(fields[0])
    if set(unigrams) <= {"<unk>"}:
        raise ValueError(f"{arpa}: no 1-grams found; is it an ARPA file of a word n-gram?")
    return unigrams


def read_word_list(path: str | Path) -> list[str]:
    """The words of a word list file, one per line (blank lines skipped)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"word list {path} not found: give a file of words, one per "
                                "line (an LM run's word_list.txt: train the LM run again with "
                                "hparams/LM/word_ngram.yaml --word_list <file>)")
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()
            if line.strip()]


def build_lexicon(unigrams: dict[str, float], alphabet: set[str], listed: list[str] = (),
                  listed_log_prob: float = 0.0, listed_penalty: float = 0.0
                  ) -> tuple[LexiconNode, int, int]:
    """The trie of the words spelled by ``alphabet`` only, with each node's look-ahead bound;
    how many words were left out (characters the tokenizer cannot write), and how many of them
    were listed. ``listed``: more words, each with the look-ahead bound ``listed_log_prob``
    and ``listed_penalty`` on its LM score."""
    root, dropped, dropped_listed = LexiconNode(), 0, 0
    entries = [(word, log_prob, 0.0) for word, log_prob in unigrams.items()]
    entries += [(word, listed_log_prob, listed_penalty) for word in listed]
    for index, (word, log_prob, penalty) in enumerate(entries):
        if not set(word) <= alphabet:
            dropped += 1
            dropped_listed += index >= len(unigrams)
            continue
        node = root
        node.smear = max(node.smear, log_prob)
        for char in word:
            node = node.children.setdefault(char, LexiconNode())
            node.smear = max(node.smear, log_prob)
        node.is_word, node.penalty = True, penalty
    return root, dropped, dropped_listed


class WordNGramScorer:
    """Next-token log-probabilities (natural log) of token-id prefixes under a word n-gram
    over its lexicon, with the interface of ``modules.ngram.NGramScorer`` (the ids, then
    ``bos`` = ``len(pieces)``, never emitted, and ``eos`` = ``len(pieces) + 1``).

    Arguments
    ---------
    model_path : the KenLM binary (or ARPA) of the word model.
    arpa_path : its ARPA file, whose 1-grams are the lexicon.
    pieces : the ASR tokenizer's piece of each id; ``None`` for pieces never emitted
        (``tokenizer_pieces``).
    oov_penalty : None: only lexicon words (lexicon-constrained). A log-score per character
        (negative): a word outside the lexicon may be spelled, scored as KenLM's ``<unk>``
        plus this per character.
    word_list : more lexicon words (``read_word_list``).
    word_list_penalty : a log-score (zero or negative) added to KenLM's ``<unk>`` for each
        listed word the model never counted. With an ``oov_penalty`` too, keep it above
        ``oov_penalty`` times a word's length, or listing a word makes it costlier.

    Example
    -------
    >>> scorer = WordNGramScorer("lm.bin", "lm.arpa", pieces)  # doctest: +SKIP
    >>> scorer([[], [1, 10]]).shape  # doctest: +SKIP
    torch.Size([2, 31])
    """

    def __init__(self, model_path: str | Path, arpa_path: str | Path,
                 pieces: list[str | None], oov_penalty: float | None = None,
                 word_list: list[str] | None = None, word_list_penalty: float = 0.0):
        if oov_penalty is not None and not oov_penalty < 0:
            raise ValueError(f"oov_penalty {oov_penalty}: give a negative log-score per "
                             "character, or None (lexicon words only)")
        if not word_list_penalty <= 0:
            raise ValueError(f"word_list_penalty {word_list_penalty}: give a log-score of "
                             "zero or less (added to <unk>'s for each listed word)")
        kenlm = import_kenlm()
        for path in (model_path, arpa_path):
            if not Path(path).is_file():
                raise FileNotFoundError(f"word n-gram file {path} not found: train it with "
                                        "python recipes/train.py hparams/LM/word_ngram.yaml")
        try:
            self.model = kenlm.Model(str(model_path))
        except (OSError, RuntimeError) as error:  # truncated or foreign file
            raise ValueError(f"word n-gram {model_path}: KenLM cannot read it ({error}); train "
                             "it again with hparams/LM/word_ngram.yaml") from None
        self.kenlm = kenlm
        self.pieces = pieces
        self.vocab_size = len(pieces)
        self.bos, self.eos = self.vocab_size, self.vocab_size + 1
        inside = [piece for piece in pieces if piece and WORD_START in piece[1:]]
        if inside:
            raise ValueError(f"tokenizer pieces such as {inside[0]!r} span a word boundary "
                             "(SentencePiece's split_by_whitespace=false): a word LM needs "
                             "pieces that start words or lie inside them")
        alphabet = {char for piece in pieces if piece for char in piece if char != WORD_START}
        unigrams = read_unigrams(arpa_path)
        unknown = unigrams.pop("<unk>", None)
        if word_list and unknown is None:
            raise ValueError(f"{arpa_path} has no <unk> 1-gram, which scores listed words: "
                             "count it with KenLM's lmplz (hparams/LM/word_ngram.yaml)")
        listed = [word for word in dict.fromkeys(word_list or []) if word and word not in unigrams]
        # a listed word's bound: its unigram score as the model gives it (<unk>'s) + the penalty
        self.lexicon, dropped, dropped_listed = build_lexicon(
            unigrams, alphabet, listed, (unknown or 0.0) + word_list_penalty, word_list_penalty)
        self.lexicon_words = len(unigrams) + len(listed) - dropped
        self.listed_words = len(listed) - dropped_listed
        if not self.lexicon.children:
            raise ValueError(f"{arpa_path}: none of its words can be spelled with the ASR "
                             f"tokenizer's characters ({''.join(sorted(alphabet))}); were the "
                             "LM's text and the ASR model's transcripts normalized alike?")
        self.dropped_words = dropped
        self.oov_penalty = oov_penalty
        self.oov = LexiconNode()  # the open word has left the lexicon (with an oov_penalty)
        self.oov.smear, self.oov.is_word = 0.0, True
        # each word-starting piece's (node, score) from the root
        self.starts = {index: self._extend("", self.lexicon, piece[1:])
                       for index, piece in enumerate(pieces)
                       if piece and piece.startswith(WORD_START)}
        start = kenlm.State()
        self.model.BeginSentenceWrite(start)
        # prefix -> (KenLM state after its finished words, its open word, that word's node)
        self.states: dict[tuple[int, ...], tuple] = {(): (start, "", self.lexicon)}

    def in_lexicon(self, word: str) -> bool:
        """Whether ``word`` is a lexicon word."""
        node = self.lexicon.walk(word)
        return node is not None and node.is_word

    def _word_score(self, state, word: str):
        """Log-probability of ``word`` after ``state`` (KenLM's ``<unk>`` for a word it does
        not know), and the state after it."""
        after = self.kenlm.State()
        return LN10 * self.model.BaseScore(state, word, after), after

    def _bound(self, word: str, node: LexiconNode) -> float:
        """The look-ahead score already given to the open ``word``."""
        return node.smear if word and node is not self.oov else 0.0

    def _extend(self, word: str, node: LexiconNode, text: str):
        """(node, score) of appending ``text`` to the open ``word`` at ``node``; node None:
        the search may not spell it (outside the lexicon, no ``oov_penalty``)."""
        if not text:
            return node, 0.0
        if node is self.oov:
            return node, self.oov_penalty * len(text)
        child = node.walk(text)
        if child is not None:
            return child, child.smear - self._bound(word, node)
        if self.oov_penalty is None:
            return None, NEVER
        return self.oov, self.oov_penalty * len(word + text) - self._bound(word, node)

    def _finish(self, lm_state, word: str, node: LexiconNode):
        """The score of ending the open word (replacing its bound), and the state after it."""
        if not word:
            return 0.0, lm_state
        if node is self.oov or node.is_word:
            score, after = self._word_score(lm_state, word)
            return score + node.penalty - self._bound(word, node), after
        if self.oov_penalty is None:
            return NEVER, lm_state
        score, after = self._word_score(lm_state, word)  # a lexicon prefix that is no word
        return score + self.oov_penalty * len(word) - node.smear, after

    def state(self, prefix: tuple[int, ...]) -> tuple:
        """(KenLM state after the finished words, the open word, its node) after ``prefix``;
        node None: the search may not spell it. Built on from the longest cached prefix (a
        search asks for one token more than a prefix it asked for before); only the prefixes
        asked for are kept, at most ``CACHED_PREFIXES`` of them."""
        if prefix in self.states:
            return self.states[prefix]
        known = len(prefix) - 1
        while known > 0 and prefix[:known] not in self.states:
            known -= 1
        lm_state, word, node = self.states[prefix[:known]] if known > 0 else self.states[()]
        for position in range(known, len(prefix)):
            index = prefix[position]
            piece = self.pieces[index] if index < self.vocab_size else None
            if node is None or piece is None:
                node = None
            elif piece.startswith(WORD_START):
                if not word and position > 0:
                    node = None  # a second boundary in a row: normalized text has none
                    continue
                if word:
                    _, lm_state = self._word_score(lm_state, word)
                word, (node, _) = piece[1:], self._extend("", self.lexicon, piece[1:])
            else:
                word, (node, _) = word + piece, self._extend(word, node, piece)
        if len(self.states) >= CACHED_PREFIXES:  # a long decode: the states of dead prefixes go
            self.states = {(): self.states[()]}
        self.states[prefix] = (lm_state, word, node)
        return self.states[prefix]

    def next_scores(self, prefix: tuple[int, ...]) -> list[float]:
        """Log-score of every token of the decoder's vocabulary after ``prefix``."""
        lm_state, word, node = self.state(prefix)
        row = [NEVER] * (self.vocab_size + 2)
        if node is None:
            return row
        finish, after = self._finish(lm_state, word, node)
        for index, piece in enumerate(self.pieces):
            if piece is None:
                continue
            if piece.startswith(WORD_START):
                child, score = self.starts[index]
                if child is not None and finish > NEVER and (word or not prefix):
                    row[index] = finish + score
            else:
                child, score = self._extend(word, node, piece)
                if child is not None:
                    row[index] = score
        if finish > NEVER:
            row[self.eos] = finish + self._word_score(after, "</s>")[0]
        return row

    def __call__(self, prefixes: list[list[int]]) -> torch.Tensor:
        """Token-id prefixes -> (N, vocab_size + 2) log-scores of the next token."""
        return torch.tensor([self.next_scores(tuple(p)) for p in prefixes], dtype=torch.float32)

    def sentence_scores(self, token_lists: list[list[int]]) -> list[float]:
        """Log-score of each whole sentence (``</s>`` included): the word model's, plus
        ``oov_penalty`` per character of its words outside the lexicon (``NEVER`` without one)
        and the listed words' penalty."""
        scores = []
        for tokens in token_lists:
            if any(t >= self.vocab_size or self.pieces[t] is None for t in tokens):
                scores.append(NEVER)
                continue
            text = "".join(self.pieces[t] for t in tokens)
            if 2 * WORD_START in text:  # a boundary piece after a boundary: never searched
                scores.append(NEVER)
                continue
            words = text.replace(WORD_START, " ").split()
            outside = sum(len(word) for word in words if not self.in_lexicon(word))
            if outside and self.oov_penalty is None:
                scores.append(NEVER)
                continue
            penalty = self.oov_penalty * outside if outside else 0.0
            penalty += sum(self.lexicon.walk(word).penalty for word in words
                           if self.in_lexicon(word))
            scores.append(LN10 * self.model.score(" ".join(words), bos=True, eos=True) + penalty)
        return scores

    def search_scorer(self) -> "PrefixSearchScorer":
        """The scorer of SpeechBrain's beam search over the search vocabulary of
        ``modules.decoding.SearchVocabulary`` (ids, bos, eos, blank)."""
        return PrefixSearchScorer(self)


class PrefixSearchScorer(BaseScorerInterface):
    """SpeechBrain's full-scorer interface over any ``prefixes -> next-token scores`` LM: its
    memory is each hypothesis' token-id prefix (the search's bos not included).

    Written here: SpeechBrain's LM scorers each wrap one kind of model (an RNN, a Transformer,
    a KenLM model over tokens), none a scorer given as prefixes."""

    def __init__(self, lm):
        self.lm = lm

    def score(self, inp_tokens, memory, candidates, attn):
        if memory is None:  # the first step: every hypothesis is bos alone
            prefixes = [()] * inp_tokens.shape[0]
        else:
            prefixes = [prefix + (token,) for prefix, token in zip(memory, inp_tokens.tolist())]
        rows = self.lm(prefixes)  # (N, vocab + 2): ids, bos, eos
        blank = torch.full_like(rows[:, :1], NEVER)
        return torch.cat([rows, blank], dim=-1).to(inp_tokens.device), prefixes

    def permute_mem(self, memory, index):
        return [memory[i] for i in index.reshape(-1).tolist()]

    def reset_mem(self, x, enc_lens):
        return None
