"""Token-level CTC prefix beam search (issue 22): exact CTC scores without pruning, the
chunking of a stream does not change the beams (with and without LM fusion), the best path
wins when it dominates, and the LM's scores are those of the prefix's tokens."""
import itertools

import pytest
import torch

from modules.ctc import CTCPrefixBeam


def random_log_probs(frames: int, outputs: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(frames, outputs, generator=generator, dtype=torch.float64).log_softmax(-1)


def test_unpruned_scores_are_exact_ctc_log_probabilities():
    log_probs = random_log_probs(5, 3)
    search = CTCPrefixBeam(beam_size=1000)
    search.push(log_probs)
    scores = {hypothesis.prefix: hypothesis.ctc for hypothesis in search.nbest()}
    for length in range(1, 4):  # every label sequence of up to 3 tokens over outputs 1, 2
        for labels in itertools.product([1, 2], repeat=length):
            loss = torch.nn.functional.ctc_loss(
                log_probs[:, None], torch.tensor([labels]), torch.tensor([5]),
                torch.tensor([length]), blank=0, reduction="sum")
            expected = -loss.item()
            if expected > -1e30:  # feasible in 5 frames
                assert scores[labels] == pytest.approx(expected, abs=1e-9)


class BigramLM:
    """A fixed bigram table over token ids 0..V-1 (plus bos, eos): next-token log-probs of
    token-id prefixes, like ``modules.lm.LMScorer``; counts its calls."""

    def __init__(self, tokens: int, seed: int = 1):
        generator = torch.Generator().manual_seed(seed)
        self.table = torch.randn(tokens + 1, tokens + 2, generator=generator).log_softmax(-1)
        self.bos, self.calls = tokens, 0

    def __call__(self, prefixes):
        self.calls += 1
        return torch.stack([self.table[prefix[-1] if prefix else self.bos] for prefix in prefixes])


@pytest.mark.parametrize("lm_weight", [0.0, 0.8])
@pytest.mark.parametrize("chunks", [[1] * 40, [4] * 10, [3, 17, 20], [40]])
def test_streamed_chunks_give_the_offline_beams(chunks, lm_weight):
    log_probs = random_log_probs(40, 12, seed=3)
    lm = BigramLM(11) if lm_weight else None
    offline = CTCPrefixBeam(beam_size=6, lm=lm, lm_weight=lm_weight)
    offline.push(log_probs)
    stream, start = CTCPrefixBeam(beam_size=6, lm=lm, lm_weight=lm_weight), 0
    for size in chunks:
        stream.push(log_probs[start:start + size][None])
        start += size
    assert stream.nbest() == offline.nbest()


def test_a_dominant_path_is_the_best_prefix():
    path = [3, 3, 0, 3, 5, 0, 0, 7, 7]
    log_probs = torch.full((len(path), 9), 0.01).index_put_(
        (torch.arange(len(path)), torch.tensor(path)), torch.tensor(0.92)).log()
    search = CTCPrefixBeam(beam_size=4)
    search.push(log_probs)
    assert search.nbest()[0].prefix == (3, 3, 5, 7)
    assert len(search.nbest()) == 4
    with pytest.raises(ValueError, match="beam_size"):
        CTCPrefixBeam(beam_size=0)


def test_lm_scores_are_the_prefix_tokens_log_probabilities_and_rank_the_beam():
    log_probs = random_log_probs(12, 5, seed=4)
    lm = BigramLM(4)
    search = CTCPrefixBeam(beam_size=8, lm=lm, lm_weight=0.5, length_bonus=0.3)
    search.push(log_probs)
    nbest = search.nbest()
    for hypothesis in nbest:
        tokens = [index - 1 for index in hypothesis.prefix]
        expected = sum(float(lm.table[previous][token])
                       for previous, token in zip([lm.bos] + tokens, tokens))
        assert hypothesis.lm == pytest.approx(expected, abs=1e-9)
    ranks = [h.ctc + 0.5 * h.lm + 0.3 * len(h.prefix) for h in nbest]
    assert ranks == sorted(ranks, reverse=True)
    assert lm.calls <= 12  # at most one batched LM call per frame


def test_a_strong_lm_overrules_ambiguous_acoustics():
    """Two equally likely tokens per frame: the LM's preferred one wins."""
    log_probs = torch.tensor([[0.1, 0.45, 0.45]] * 3).log()
    lm = BigramLM(2)
    lm.table[:] = torch.tensor([0.9, 0.05, 0.05, 0.0]).log()  # token 0 (output 1) after anything
    search = CTCPrefixBeam(beam_size=4, lm=lm, lm_weight=1.0)
    search.push(log_probs)
    assert set(search.nbest()[0].prefix) == {1}
    without = CTCPrefixBeam(beam_size=4)
    without.push(log_probs)
    assert without.nbest()[0].lm == 0.0
