"""Decoding modes (issue 22): the joint CTC / attention beam search (SpeechBrain's searcher over
our cached decoder) against a plain greedy loop, independent of batch mates and padding; the
streaming modes give the same results in any chunking, with and without the LM; bad options
are refused in one line."""
import pytest
import torch
from speechbrain.lobes.models.transformer.TransformerLM import TransformerLM

from modules.decoders import TokenDecoder, attention_rescoring
from modules.decoding import (
    DecodingOptions,
    SearchVocabulary,
    UtteranceDecoder,
    attention_beam_search,
)
from modules.lm import LMScorer, lm_io

V = 8  # tokenizer ids 0..7; bos 8, eos 9; the CTC head: blank 0, token t at t + 1
BOS, EOS = V, V + 1


@pytest.fixture
def model():
    torch.manual_seed(0)
    decoder = TokenDecoder(V + 2, 16, num_layers=2, nhead=2, d_ffn=32, dropout=0.0).eval()
    ctc_head = torch.nn.Linear(16, V + 1)
    lm = TransformerLM(V + 2, d_model=16, nhead=2, num_encoder_layers=1, d_ffn=32).eval()
    return decoder, ctc_head, lm


def greedy_decoder_loop(decoder, memory, max_tokens):
    state, token, out = decoder.start(memory, torch.tensor([memory.shape[1]])), BOS, []
    for _ in range(max_tokens):
        token = int(decoder.step(torch.tensor([token]), state)[0].argmax())
        if token == EOS:
            break
        out.append(token)
    return out


def test_beam_of_one_without_ctc_is_the_greedy_decoder(model):
    decoder, ctc_head, _ = model
    memory = torch.randn(1, 11, 16)
    found = attention_beam_search(decoder, ctc_head, memory, torch.tensor([11]),
                                  DecodingOptions("attention", 1, ctc_weight=0.0), BOS, EOS)
    # at most max_decode_ratio * 11 steps, the last one ending the hypothesis (eos)
    assert found == [greedy_decoder_loop(decoder, memory, 10)]


@pytest.mark.parametrize("ctc_weight,lm_weight", [(0.4, 0.0), (0.4, 0.5), (1.0, 0.0)])
def test_beam_search_ignores_batch_mates_and_padding(model, ctc_weight, lm_weight):
    decoder, ctc_head, lm = model
    memory = torch.randn(2, 12, 16)
    options = DecodingOptions("attention", 3, ctc_weight, lm_weight)
    scorer = LMScorer(lm, BOS, EOS)
    together = attention_beam_search(decoder, ctc_head, memory, torch.tensor([12, 7]), options,
                                     BOS, EOS, scorer)
    alone = attention_beam_search(decoder, ctc_head, memory[1:, :7], torch.tensor([7]), options,
                                  BOS, EOS, scorer)
    assert together[1] == alone[0]
    assert all(0 <= t < V for hyp in together for t in hyp)


def test_search_vocabulary_puts_the_blank_last():
    head = torch.nn.Identity()
    ctc_logits = torch.arange(V + 1.0)[None, None]  # blank 0, tokens 1..V
    mapped = SearchVocabulary(head, ctc=True)(ctc_logits)[0, 0]
    assert mapped[:V].tolist() == list(range(1, V + 1)) and mapped[-1] == 0
    assert (mapped[V:V + 2] < -1e3).all()
    lm_logits = torch.zeros(1, 1, V + 2)
    assert SearchVocabulary(head, ctc=False)(lm_logits).shape[-1] == V + 3


@pytest.mark.parametrize("decoding", ["ctc_greedy", "ctc_prefix_beam", "attention_rescoring"])
@pytest.mark.parametrize("lm_weight", [0.0, 0.7])
def test_streaming_modes_give_the_same_results_in_any_chunking(model, decoding, lm_weight):
    decoder, ctc_head, lm = model
    memory = torch.randn(1, 30, 16)
    log_probs = ctc_head(memory)[0].log_softmax(-1).detach()
    options = DecodingOptions(decoding, 4, 0.4, lm_weight)
    scorer = LMScorer(lm, BOS, EOS)
    offline = UtteranceDecoder(options, decoder, scorer, BOS, EOS)
    offline.push(log_probs)
    streamed = UtteranceDecoder(options, decoder, scorer, BOS, EOS)
    partials = []
    for start in range(0, 30, 7):
        streamed.push(log_probs[start:start + 7][None])
        partials.append(streamed.partial())
    assert partials[-1] == offline.partial()
    assert streamed.finish(memory) == offline.finish(memory)


def test_two_pass_final_is_the_rescored_best_of_the_first_pass_nbest(model):
    decoder, ctc_head, _ = model
    memory = torch.randn(1, 25, 16)
    log_probs = ctc_head(memory)[0].log_softmax(-1).detach()
    search = UtteranceDecoder(DecodingOptions("attention_rescoring", 5, 0.3), decoder, None,
                              BOS, EOS)
    search.push(log_probs)
    nbest = [([i - 1 for i in h.prefix], h.ctc) for h in search.beam.nbest()]
    expected = attention_rescoring(decoder, memory, 25, nbest, BOS, EOS, 0.3)[0][0]
    assert search.finish(memory) == expected


def test_lm_scorer_matches_whole_sentence_scores(model):
    _, _, lm = model
    scorer = LMScorer(lm, BOS, EOS)
    sentence = [3, 1, 4]
    steps = [float(scorer([sentence[:i]])[0, token]) for i, token in enumerate(sentence + [EOS])]
    assert scorer.sentence_scores([sentence, [2]])[0] == pytest.approx(sum(steps), abs=1e-4)
    inputs, targets = lm_io([sentence], BOS, EOS)
    assert inputs.tolist() == [[BOS, 3, 1, 4]] and targets.tolist() == [[3, 1, 4, EOS]]


@pytest.mark.parametrize("kwargs, message", [
    ({"decoding": "beam"}, "give one of"), ({"beam_size": 0}, "beam_size"),
    ({"ctc_weight": 1.5}, "ctc_weight"), ({"lm_weight": -1.0}, "lm_weight")])
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DecodingOptions(**kwargs)


def test_offline_or_decoderless_streaming_is_refused(model):
    with pytest.raises(ValueError, match="offline only"):
        UtteranceDecoder(DecodingOptions("attention"), model[0], None, BOS, EOS)
    with pytest.raises(ValueError, match="needs an attention decoder"):
        UtteranceDecoder(DecodingOptions("attention_rescoring"), None, None, BOS, EOS)


@pytest.mark.parametrize("ctc_weight,lm_weight", [(0.0, 0.0), (0.4, 0.5)])
def test_a_beam_wider_than_the_vocabulary_searches(model, ctc_weight, lm_weight):
    """A beam of more hypotheses than there are tokens (here 16 > 11 search entries): the first
    step has too few live continuations, and the filler picks (the blank, dead beams) must not
    reach the decoder or the LM as tokens (they did: an IndexError inside torch)."""
    decoder, ctc_head, lm = model
    memory = torch.randn(1, 12, 16)
    scorer = LMScorer(lm, BOS, EOS)
    wide, narrow = (attention_beam_search(decoder, ctc_head, memory, torch.tensor([12]),
                                          DecodingOptions("attention", beam, ctc_weight,
                                                          lm_weight), BOS, EOS, scorer)
                    for beam in (16, V))
    assert all(0 <= t < V for t in wide[0]) and len(wide) == len(narrow) == 1
