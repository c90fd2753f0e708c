"""The word n-gram scorer (issue 22): piece by piece, its look-ahead scores add up to the word
model's sentence log-probability; the search it drives spells lexicon words only; the streamed
CTC prefix beam with it is the offline one; SpeechBrain's search scorer follows the beams.
Needs KenLM (``make kenlm``): skipped, with the reason, where it is not built."""
import math
import random
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, offline_and_streamed_beams

kenlm = pytest.importorskip("kenlm", reason="the kenlm Python module: run `make kenlm`")
LMPLZ = ROOT / "tools" / "kenlm" / "bin" / "lmplz"
if not LMPLZ.is_file():
    pytest.skip("KenLM's lmplz is not built: run `make kenlm`", allow_module_level=True)

from modules.ctc import CTCPrefixBeam  # noqa: E402
from modules.decoding import DecodingOptions, UtteranceDecoder  # noqa: E402
from modules.ngram import NEVER  # noqa: E402
from modules.word_ngram import WORD_START, PrefixSearchScorer, WordNGramScorer  # noqa: E402

WORDS = ["THE", "THEN", "THERE", "A", "AN", "AND", "CAT", "CAN", "NET", "TEN", "ANT", "HAT"]
CHARS = [None, WORD_START] + sorted(set("".join(WORDS)))  # <unk>, ▁, letters: a char model
SUBWORDS = [None, WORD_START, f"{WORD_START}THE", f"{WORD_START}A", "N", "RE", "T", "E", "H",
            f"{WORD_START}C", "A", "D", f"{WORD_START}N", f"{WORD_START}T", f"{WORD_START}H"]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """A trigram on random sentences of ``WORDS``: its ARPA and KenLM binary (the same file)."""
    tmp = tmp_path_factory.mktemp("word_ngram")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))) for _ in range(400)]
    (tmp / "text.txt").write_text("\n".join(lines) + "\n")
    subprocess.run([str(LMPLZ), "--order", "3", "--text", str(tmp / "text.txt"), "--arpa",
                    str(tmp / "lm.arpa"), "--discount_fallback", "--memory", "5%"],
                   check=True, capture_output=True)
    return tmp / "lm.arpa", tmp / "lm.arpa"


def encode(text: str, pieces: list) -> list[int]:
    """Greedy longest-match spelling of ``text`` in ``pieces`` (each word starts with ▁)."""
    marked, ids = "".join(WORD_START + word for word in text.split()), []
    while marked:
        index = max((i for i, piece in enumerate(pieces) if piece and marked.startswith(piece)),
                    key=lambda i: len(pieces[i]))
        ids.append(index)
        marked = marked[len(pieces[index]):]
    return ids


@pytest.mark.parametrize("pieces", [CHARS, SUBWORDS], ids=["characters", "subwords"])
def test_piece_scores_add_up_to_the_word_model_sentence_score(model_files, pieces):
    scorer = WordNGramScorer(*model_files, pieces)
    for sentence in ["THE CAT", "AN ANT AND THEN THERE", "A", "THEN THE HAT"]:
        tokens = encode(sentence, pieces)
        rows = scorer([tokens[:k] for k in range(len(tokens) + 1)])
        assert rows.shape == (len(tokens) + 1, len(pieces) + 2)
        assert (rows[:, scorer.bos] == NEVER).all() and (rows[:, 0] == NEVER).all()
        path = sum(float(rows[k, t]) for k, t in enumerate(tokens)) + float(rows[-1, scorer.eos])
        exact = math.log(10) * scorer.model.score(sentence, bos=True, eos=True)
        assert path == pytest.approx(exact, abs=1e-3)
        assert scorer.sentence_scores([tokens])[0] == pytest.approx(exact, abs=1e-4)


@pytest.mark.parametrize("pieces", [CHARS, SUBWORDS], ids=["characters", "subwords"])
def test_with_an_oov_penalty_other_words_score_as_unk_plus_the_penalty(model_files, pieces):
    scorer = WordNGramScorer(*model_files, pieces, oov_penalty=-2.5)
    strict = WordNGramScorer(*model_files, pieces)
    for sentence in ["THE TEA", "THERE THEN", "ANTE CAT", "HAT HEAT A", "THE CAT"]:
        tokens = encode(sentence, pieces)
        rows = scorer([tokens[:k] for k in range(len(tokens) + 1)])
        path = sum(float(rows[k, t]) for k, t in enumerate(tokens)) + float(rows[-1, scorer.eos])
        outside = sum(len(w) for w in sentence.split() if w not in WORDS)
        exact = math.log(10) * scorer.model.score(sentence, bos=True, eos=True) - 2.5 * outside
        assert path == pytest.approx(exact, abs=1e-3)
        assert scorer.sentence_scores([tokens])[0] == pytest.approx(exact, abs=1e-4)
        assert (strict.sentence_scores([tokens])[0] == NEVER) == (outside > 0)


@pytest.mark.parametrize("pieces", [CHARS, SUBWORDS], ids=["characters", "subwords"])
def test_listed_words_the_model_lacks_score_as_unk_plus_the_penalty(model_files, pieces):
    listed = ["TEA", "HEAT", "THE", "TEA", "ETA"]  # THE is counted already; TEA twice
    scorer = WordNGramScorer(*model_files, pieces, word_list=listed, word_list_penalty=-1.5)
    strict = WordNGramScorer(*model_files, pieces)
    assert scorer.listed_words == 3 and scorer.lexicon_words == strict.lexicon_words + 3
    for sentence in ["THE TEA", "HEAT A HAT", "THE CAT", "TEA ETA"]:
        tokens = encode(sentence, pieces)
        rows = scorer([tokens[:k] for k in range(len(tokens) + 1)])
        path = sum(float(rows[k, t]) for k, t in enumerate(tokens)) + float(rows[-1, scorer.eos])
        new = sum(word not in WORDS for word in sentence.split())
        exact = math.log(10) * scorer.model.score(sentence, bos=True, eos=True) - 1.5 * new
        assert path == pytest.approx(exact, abs=1e-3)
        assert scorer.sentence_scores([tokens])[0] == pytest.approx(exact, abs=1e-4)
        assert (strict.sentence_scores([tokens])[0] == NEVER) == (new > 0)
    assert scorer.in_lexicon("HEAT") and not scorer.in_lexicon("HEA")
    with pytest.raises(ValueError, match="word_list_penalty 0.5: give a log-score of zero"):
        WordNGramScorer(*model_files, pieces, word_list=listed, word_list_penalty=0.5)


@pytest.mark.parametrize("pieces", [CHARS, SUBWORDS], ids=["characters", "subwords"])
def test_listed_words_inside_and_around_counted_ones_keep_their_own_scores(model_files, pieces):
    """A listed word that is a prefix of a counted one (CA of CAT), or has one as its prefix
    (THENE of THEN), and an empty entry: the trie keeps each word's penalty on its own node."""
    scorer = WordNGramScorer(*model_files, pieces, word_list=["CA", "THENE", "", "ANTE"],
                             word_list_penalty=-0.7, oov_penalty=-2.0)
    assert scorer.listed_words == 3 and not scorer.in_lexicon("")
    for sentence in ["CA CAT", "THE THENE THEN", "ANT ANTE AN", "CAN THEE CA"]:
        tokens = encode(sentence, pieces)
        rows = scorer([tokens[:k] for k in range(len(tokens) + 1)])
        path = sum(float(rows[k, t]) for k, t in enumerate(tokens)) + float(rows[-1, scorer.eos])
        words = sentence.split()
        exact = (math.log(10) * scorer.model.score(sentence, bos=True, eos=True)
                 - 0.7 * sum(w in ("CA", "THENE", "ANTE") for w in words)
                 - 2.0 * sum(len(w) for w in words if w == "THEE"))
        assert path == pytest.approx(exact, abs=1e-3)
        assert scorer.sentence_scores([tokens])[0] == pytest.approx(exact, abs=1e-4)


def test_the_search_spells_a_listed_word_it_could_not_spell_before(model_files):
    letter = {piece: index + 1 for index, piece in enumerate(CHARS) if piece}  # CTC ids
    frames = [letter[c] for c in f"{WORD_START}HEAT{WORD_START}A{WORD_START}TEA"]
    log_probs = torch.full((len(frames), len(CHARS) + 1), -8.0)
    log_probs[torch.arange(len(frames)), frames] = -0.05
    best = {}
    for name, word_list in [("listed", ["TEA", "HEAT"]), ("strict", None)]:
        search = CTCPrefixBeam(beam_size=6, lm_weight=0.3,
                               lm=WordNGramScorer(*model_files, CHARS, word_list=word_list))
        search.push(log_probs.log_softmax(-1))
        prefix = search.nbest()[0].prefix
        best[name] = "".join(CHARS[i - 1] for i in prefix).replace(WORD_START, " ").strip()
    assert best["listed"] == "HEAT A TEA" and best["strict"] != "HEAT A TEA"


def test_the_lexicon_is_the_only_way_out(model_files):
    scorer = WordNGramScorer(*model_files, CHARS)
    the = encode("THE", CHARS)
    row = scorer([the])[0]
    letter = {piece: index for index, piece in enumerate(CHARS) if piece}
    assert row[letter["N"]] > NEVER and row[letter["R"]] > NEVER  # THEN, THERE
    assert row[letter["C"]] == NEVER  # no word starts THEC
    assert row[scorer.eos] > NEVER and row[letter[WORD_START]] > NEVER  # THE is a word
    the_r = the + [letter["R"]]
    row = scorer([the_r])[0]
    assert row[scorer.eos] == NEVER and row[letter[WORD_START]] == NEVER  # THER is not
    assert scorer.sentence_scores([encode("THE TEA", CHARS), the_r]) == [NEVER, NEVER]
    # the look-ahead bound of an open word is its likeliest completion's unigram
    assert float(scorer([the_r])[0].max()) <= 0.0
    assert not scorer.in_lexicon("THER") and scorer.in_lexicon("THERE")


def test_the_search_spells_lexicon_words_only(model_files):
    scorer = WordNGramScorer(*model_files, CHARS)
    generator = torch.Generator().manual_seed(3)
    log_probs = torch.randn(60, len(CHARS) + 1, generator=generator).mul(3).log_softmax(-1)
    search = CTCPrefixBeam(beam_size=8, lm=scorer, lm_weight=1.0)
    search.push(log_probs)
    plain = CTCPrefixBeam(beam_size=8)
    plain.push(log_probs)
    spelled = lambda prefix: "".join(CHARS[i - 1] or "?" for i in prefix).replace(WORD_START, " ")
    assert any(not all(w in WORDS for w in spelled(h.prefix).split()) for h in plain.nbest())
    for hypothesis in search.nbest():  # partial results: the last word may be open
        *finished, last = spelled(hypothesis.prefix).split() or [""]
        assert all(word in WORDS for word in finished)
        assert any(word.startswith(last) for word in WORDS)
        assert "  " not in spelled(hypothesis.prefix)[1:]  # no free boundaries



@pytest.mark.parametrize("word_list", [None, ["TEA", "HEAT", "ETA"]], ids=["strict", "listed"])
@pytest.mark.parametrize("chunks", [[50], [1] * 50, [7, 13, 30]])
def test_streamed_prefix_beam_with_the_word_model_is_the_offline_one(model_files, chunks,
                                                                     word_list):
    scorer = WordNGramScorer(*model_files, CHARS, word_list=word_list, word_list_penalty=-0.5)
    generator = torch.Generator().manual_seed(5)
    log_probs = torch.randn(50, len(CHARS) + 1, generator=generator).mul(2).log_softmax(-1)
    offline, stream = offline_and_streamed_beams(log_probs, chunks, beam_size=5, lm=scorer,
                                                 lm_weight=0.7, length_bonus=0.5)
    assert stream.nbest() == offline.nbest()


def test_search_scorer_follows_the_surviving_beams(model_files):
    scorer = WordNGramScorer(*model_files, CHARS)
    search = scorer.search_scorer()
    assert isinstance(search, PrefixSearchScorer) and search.reset_mem(None, None) is None
    first, memory = search.score(torch.full((2,), scorer.bos), None, None, None)
    assert first.shape == (2, len(CHARS) + 3) and (first[:, -1] == NEVER).all()
    assert torch.equal(first[0, :-1], scorer([[]])[0])
    boundary, t, h = CHARS.index(WORD_START), CHARS.index("T"), CHARS.index("H")
    _, memory = search.score(torch.tensor([boundary, t]), memory, None, None)
    assert memory == [(boundary,), (t,)]
    memory = search.permute_mem(memory, torch.tensor([[1, 0]]))  # the beams swap
    second, memory = search.score(torch.tensor([h, t]), memory, None, None)
    assert memory == [(t, h), (boundary, t)]
    assert torch.equal(second[0, :-1], scorer([[t, h]])[0])
    assert torch.equal(second[1, :-1], scorer([[boundary, t]])[0])


def test_the_attention_search_keeps_the_scorer_in_step_with_its_hypotheses(model_files):
    """SpeechBrain's own searcher, batch 2 x beam 3: at every step the scorer's memory of each
    live hypothesis, plus the token it just chose, is that hypothesis."""
    from speechbrain.decoders.seq2seq import S2SBeamSearcher

    from modules.decoding import OpenScorerBuilder

    scorer = WordNGramScorer(*model_files, CHARS)
    vocab = len(CHARS)
    table = torch.randn(50, 6, vocab + 3, generator=torch.Generator().manual_seed(1)).mul(2)
    mismatches, checked = [], []

    class Searcher(S2SBeamSearcher):  # a decoder of random scores, step by step
        def reset_mem(self, batch_size, device=None):
            return 0

        def set_n_out(self):
            return vocab + 3

        def forward_step(self, inp_tokens, memory, enc_states, enc_lens):
            scores = table[memory].clone()
            scores[:, [vocab, vocab + 2]] = NEVER  # bos, blank
            return scores.log_softmax(-1), memory + 1, None

        def permute_mem(self, memory, index):
            return memory

        def search_step(self, alived, inp_tokens, log_probs, eos, memory, scorer_memory,
                        *rest):
            kept = scorer_memory["prefixsearch"]
            if kept is not None:
                for row, (prefix, token) in enumerate(zip(kept, inp_tokens.tolist())):
                    if alived.sequence_scores[row] > -1e30:
                        checked.append(row)
                        if prefix + (token,) != tuple(alived.alived_seq[row].tolist()):
                            mismatches.append(row)
            return super().search_step(alived, inp_tokens, log_probs, eos, memory,
                                       scorer_memory, *rest)

    searcher = Searcher(bos_index=vocab, eos_index=vocab + 1, min_decode_ratio=0.0,
                        max_decode_ratio=1.0, beam_size=3, using_eos_threshold=False,
                        length_normalization=True,
                        scorer=OpenScorerBuilder(full_scorers=[scorer.search_scorer()],
                                                 weights={"prefixsearch": 0.5}))
    hypotheses, *_ = searcher(torch.zeros(2, 12, 4), torch.ones(2))
    assert len(hypotheses) == 2 and len(checked) > 20 and not mismatches


def test_a_prefix_ending_inside_a_word_loses_at_the_end(model_files):
    """Frames that spell ``▁THE▁CA`` confidently: the partial result may show the open word,
    the final result may not (the word LM's end-of-sentence score closes it)."""
    scorer = WordNGramScorer(*model_files, CHARS)
    spelled = encode("THE CA", CHARS)
    log_probs = torch.full((2 * len(spelled), len(CHARS) + 1), -8.0)
    for frame, index in enumerate(spelled):
        log_probs[2 * frame, index + 1], log_probs[2 * frame + 1, 0] = -0.05, -0.05
    decoder = UtteranceDecoder(DecodingOptions("ctc_prefix_beam", beam_size=10, lm_weight=1.0),
                               lm=scorer)
    decoder.push(log_probs.log_softmax(-1))
    assert decoder.partial() == spelled
    words = "".join(CHARS[i] for i in decoder.finish()).replace(WORD_START, " ").split()
    assert words != ["THE", "CA"] and all(word in WORDS for word in words)


def test_the_cache_is_bounded_and_rebuilds(model_files, monkeypatch):
    import modules.word_ngram as word_ngram

    monkeypatch.setattr(word_ngram, "CACHED_PREFIXES", 3)
    scorer = WordNGramScorer(*model_files, CHARS)
    fresh = WordNGramScorer(*model_files, CHARS)
    tokens = encode("THEN A CAT AND THE HAT", CHARS)
    for end in range(len(tokens) + 1):  # asked again after a reset, or first after one
        for prefix in (tokens[:end], tokens[:end], tokens[:max(end - 2, 0)]):
            assert len(scorer.states) <= 3
            assert scorer([prefix]).tolist() == fresh([prefix]).tolist()


def test_a_long_prefix_and_bad_files(model_files, tmp_path):
    scorer = WordNGramScorer(*model_files, CHARS)
    tokens = encode(" ".join(["THE CAT"] * 600), CHARS)  # longer than Python's recursion limit
    assert len(tokens) > sys.getrecursionlimit()
    assert scorer([tokens])[0][scorer.eos] > NEVER
    with pytest.raises(FileNotFoundError, match="hparams/LM/word_ngram.yaml"):
        WordNGramScorer(tmp_path / "lm.bin", model_files[1], CHARS)
    with pytest.raises(ValueError, match="none of its words can be spelled"):
        WordNGramScorer(*model_files, [None, WORD_START] + list("xyz"))
    (tmp_path / "cut.arpa").write_bytes(model_files[0].read_bytes()[:300])
    with pytest.raises(ValueError, match="KenLM cannot read it"):
        WordNGramScorer(tmp_path / "cut.arpa", model_files[1], CHARS)
    with pytest.raises(ValueError, match="oov_penalty 2.0: give a negative"):
        WordNGramScorer(*model_files, CHARS, oov_penalty=2.0)
    with pytest.raises(ValueError, match="span a word boundary"):
        WordNGramScorer(*model_files, CHARS + [f"E{WORD_START}C"])
