"""The n-gram LM's scorer (issue 22): next-token rows are KenLM's probabilities over the
decoder's vocabulary and add up to its sentence scores; the streamed CTC prefix beam with it is
the offline one; SpeechBrain's search scorer starts after ``<s>`` and scores as the rows do.
Needs KenLM (``make kenlm``): skipped, with the reason, where it is not built."""
import math
import random
import subprocess

import pytest
import torch

from conftest import ROOT, offline_and_streamed_beams

kenlm = pytest.importorskip("kenlm", reason="the kenlm Python module: run `make kenlm`")
LMPLZ = ROOT / "tools" / "kenlm" / "bin" / "lmplz"
if not LMPLZ.is_file():
    pytest.skip("KenLM's lmplz is not built: run `make kenlm`", allow_module_level=True)

from modules.ngram import NEVER, KenLMScorer, NGramScorer  # noqa: E402

VOCAB = 7  # token ids 0..6; bos 7, eos 8; the search's blank 9


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    """A trigram on random token-id sentences (ids 1..6 only: 0 stays unseen)."""
    tmp = tmp_path_factory.mktemp("ngram")
    rng = random.Random(0)
    lines = [" ".join(str(rng.randint(1, VOCAB - 1)) for _ in range(rng.randint(2, 9)))
             for _ in range(300)]
    (tmp / "text.txt").write_text("\n".join(lines) + "\n")
    subprocess.run([str(LMPLZ), "--order", "3", "--text", str(tmp / "text.txt"), "--arpa",
                    str(tmp / "lm.arpa"), "--discount_fallback", "--memory", "5%"],
                   check=True, capture_output=True)
    return NGramScorer(tmp / "lm.arpa", VOCAB)


def test_rows_are_next_token_probabilities_adding_up_to_sentence_scores(scorer):
    tokens = [3, 1, 4, 1, 5]
    rows = scorer([tokens[:k] for k in range(len(tokens) + 1)])
    assert rows.shape == (len(tokens) + 1, VOCAB + 2)
    assert (rows[:, scorer.bos] == NEVER).all()
    # a distribution over the seen tokens, </s> and the unknown word (token 0 is unseen: it
    # is scored as <unk>)
    probabilities = rows.exp()
    probabilities[:, scorer.bos] = 0.0
    assert torch.allclose(probabilities.sum(-1), torch.ones(len(tokens) + 1), atol=1e-4)
    assert (probabilities[:, 0] < probabilities[:, 1:].max(-1).values).all()
    path = sum(float(rows[k, t]) for k, t in enumerate(tokens)) + float(rows[-1, scorer.eos])
    assert path == pytest.approx(scorer.sentence_scores([tokens])[0], abs=1e-4)
    # the first token is scored after <s> (not in an empty context)
    out = kenlm.State()
    start = kenlm.State()
    scorer.model.BeginSentenceWrite(start)
    assert float(rows[0, 3]) == pytest.approx(
        math.log(10) * scorer.model.BaseScore(start, "3", out), abs=1e-5)


@pytest.mark.parametrize("chunks", [[40], [1] * 40, [7, 13, 20]])
def test_streamed_prefix_beam_with_the_ngram_is_the_offline_one(scorer, chunks):
    generator = torch.Generator().manual_seed(5)
    log_probs = torch.randn(40, VOCAB + 1, generator=generator).mul(2).log_softmax(-1)
    offline, stream = offline_and_streamed_beams(log_probs, chunks, beam_size=5, lm=scorer,
                                                 lm_weight=0.7, length_bonus=0.5)
    assert stream.nbest() == offline.nbest()
    for hypothesis in offline.nbest():  # each prefix's LM score is the n-gram's (no </s> yet)
        tokens = [index - 1 for index in hypothesis.prefix]
        rows = scorer([tokens[:k] for k in range(len(tokens))])
        expected = sum(float(rows[k, t]) for k, t in enumerate(tokens))
        assert hypothesis.lm == pytest.approx(expected, abs=1e-4)


def test_search_scorer_starts_after_bos_and_follows_the_surviving_beams(scorer):
    search = scorer.search_scorer()
    assert isinstance(search, KenLMScorer)
    search.reset_mem(torch.zeros(1, 4, 2), torch.ones(1))
    bos = torch.full((2,), scorer.bos)  # a batch of one, beam of two
    first, memory = search.score(bos, None, None, None)
    assert first.shape == (2, VOCAB + 3)
    expected = scorer([[]])[0]
    tokens = list(range(VOCAB)) + [scorer.eos]
    assert torch.allclose(first[0, tokens], expected[tokens], atol=1e-4)
    # beam 0 continues with token 4, beam 1 with token 2
    memory = search.permute_mem(memory, torch.tensor([[4, VOCAB + 3 + 2]]))
    second, _ = search.score(torch.tensor([4, 2]), memory, None, None)
    for row, token in enumerate([4, 2]):
        assert torch.allclose(second[row, tokens], scorer([[token]])[0][tokens], atol=1e-4)


def test_a_missing_model_is_named():
    with pytest.raises(FileNotFoundError, match="hparams/LM/ngram.yaml"):
        NGramScorer(ROOT / "no_such_lm.bin", VOCAB)
