"""Token-level CTC prefix beam search (issue 22): exact CTC scores without pruning, the
chunking of a stream does not change the beams, and the best path wins when it dominates."""
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
    scores = dict(search.nbest())
    for length in range(1, 4):  # every label sequence of up to 3 tokens over outputs 1, 2
        for labels in itertools.product([1, 2], repeat=length):
            loss = torch.nn.functional.ctc_loss(
                log_probs[:, None], torch.tensor([labels]), torch.tensor([5]),
                torch.tensor([length]), blank=0, reduction="sum")
            expected = -loss.item()
            if expected > -1e30:  # feasible in 5 frames
                assert scores[labels] == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("chunks", [[1] * 40, [4] * 10, [3, 17, 20], [40]])
def test_streamed_chunks_give_the_offline_beams(chunks):
    log_probs = random_log_probs(40, 12, seed=3)
    offline = CTCPrefixBeam(beam_size=6)
    offline.push(log_probs)
    stream, start = CTCPrefixBeam(beam_size=6), 0
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
    assert search.nbest()[0][0] == (3, 3, 5, 7)
    assert len(search.nbest()) == 4
    with pytest.raises(ValueError, match="beam_size"):
        CTCPrefixBeam(beam_size=0)
