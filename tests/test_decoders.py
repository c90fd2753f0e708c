"""Attention decoders (issue 22): no future-token leak, independence from other utterances and
from encoder padding, and incremental decoding (cached steps, beam reordering) equal to the full
recomputation, for the Transformer and the Mamba decoder."""
import pytest
import torch

from modules.decoders import TokenDecoder

MIXERS = ["attention", "mamba"]
VOCAB, D_MODEL = 11, 16


def decoder(mixer: str) -> TokenDecoder:
    torch.manual_seed(0)
    return TokenDecoder(VOCAB, D_MODEL, num_layers=2, nhead=2, d_ffn=32, dropout=0.0,
                        mixer=mixer, d_state=4, scan_backend="chunked").double().eval()


def inputs(batch: int = 2, tokens: int = 9, frames: int = 13):
    generator = torch.Generator().manual_seed(1)
    return (torch.randint(0, VOCAB, (batch, tokens), generator=generator),
            torch.randn(batch, frames, D_MODEL, generator=generator, dtype=torch.float64))


@pytest.mark.parametrize("mixer", MIXERS)
def test_no_future_token_leak(mixer):
    """Changing token j changes no output before j; the gradient of output i reaches no token
    after i."""
    model = decoder(mixer)
    tokens, memory = inputs()
    counts = torch.tensor([13, 10])
    base = model(tokens, memory, counts)
    changed = tokens.clone()
    changed[:, 5] = (changed[:, 5] + 1) % VOCAB
    after = model(changed, memory, counts)
    assert torch.equal(after[:, :5], base[:, :5]) and not torch.allclose(after[:, 5], base[:, 5])
    embedded = model.embedding(tokens).detach().requires_grad_(True)
    model.embedding.forward = lambda _: embedded  # gradients with respect to the embeddings
    model(tokens, memory, counts)[:, 3].sum().backward()
    assert embedded.grad[:, 4:].abs().max() == 0 and embedded.grad[:, 3].abs().max() > 0


@pytest.mark.parametrize("mixer", MIXERS)
def test_outputs_ignore_encoder_padding_and_other_utterances(mixer):
    model = decoder(mixer)
    tokens, memory = inputs()
    counts = torch.tensor([13, 8])
    batched = model(tokens, memory, counts)
    alone = model(tokens[1:], memory[1:, :8], torch.tensor([8]))
    assert torch.allclose(batched[1:], alone, atol=1e-10)
    noisy = memory.clone()
    noisy[1, 8:] = 1e3  # padding frames of utterance 1
    noisy[0] += 1.0  # another utterance
    assert torch.allclose(model(tokens, noisy, counts)[1], batched[1], atol=1e-10)


@pytest.mark.parametrize("mixer", MIXERS)
def test_cached_steps_equal_the_full_recomputation(mixer):
    model = decoder(mixer)
    tokens, memory = inputs()
    counts = torch.tensor([13, 9])
    full = model(tokens, memory, counts)
    state = model.start(memory, counts)
    steps = torch.stack([model.step(tokens[:, u], state) for u in range(tokens.shape[1])], 1)
    assert (steps - full).abs().max() < 1e-10


@pytest.mark.parametrize("mixer", MIXERS)
def test_reordered_state_continues_the_picked_hypotheses(mixer):
    """Beam search: after 4 steps on 3 hypotheses, keep hypotheses (2, 0, 2); their next steps
    equal the full recomputation of those prefixes."""
    model = decoder(mixer)
    tokens, memory = inputs(batch=3)
    counts = torch.tensor([13, 11, 7])
    state = model.start(memory, counts)
    for u in range(4):
        model.step(tokens[:, u], state)
    index = torch.tensor([2, 0, 2])
    state = model.reorder(state, index)
    picked = tokens[index]
    for u in range(4, tokens.shape[1]):
        logits = model.step(picked[:, u], state)
    full = model(picked, memory[index], counts[index])[:, -1]
    assert (logits - full).abs().max() < 1e-10


def test_mamba_state_does_not_grow_with_the_prefix():
    model = decoder("mamba")
    tokens, memory = inputs(tokens=30)
    state = model.start(memory, torch.tensor([13, 13]))
    shapes = []
    for u in range(tokens.shape[1]):
        model.step(tokens[:, u], state)
        shapes.append([tuple(t.shape) for cache in state["layers"] for t in cache.values()])
    assert shapes[1] == shapes[-1]


@pytest.mark.parametrize("mixer", MIXERS)
def test_bad_inputs_are_named(mixer):
    model = decoder(mixer)
    tokens, memory = inputs()
    with pytest.raises(ValueError, match="vocab_size"):
        model(tokens + VOCAB, memory, torch.tensor([13, 13]))
    with pytest.raises(ValueError, match="frame_counts"):
        model(tokens, memory, torch.tensor([14, 13]))
    with pytest.raises(ValueError, match="mixer"):
        TokenDecoder(VOCAB, D_MODEL, mixer="lstm")


@pytest.mark.parametrize("mixer", MIXERS)
def test_rescoring_scores_are_the_decoders_sequence_log_probabilities(mixer):
    """One teacher-forced pass over the n-best gives each hypothesis the summed log-probability
    that step-by-step decoding gives it (with eos); the weights order the result."""
    from modules.decoders import attention_rescoring

    model = decoder(mixer)
    memory = inputs(batch=1)[1]
    bos, eos = 1, 2
    nbest = [([5, 6, 7], -1.0), ([5], -3.0), ([8, 9, 10, 3, 4], -2.0)]
    rescored = attention_rescoring(model, memory, 13, nbest, bos, eos, ctc_weight=0.0)
    for tokens, score, attention in rescored:
        state, total = model.start(memory, torch.tensor([13])), 0.0
        for previous, target in zip([bos, *tokens], [*tokens, eos]):
            total += model.step(torch.tensor([previous]), state).log_softmax(-1)[0, target].item()
        assert attention == pytest.approx(total, abs=1e-9) and score == attention
    assert [s for _, s, _ in rescored] == sorted((s for _, s, _ in rescored), reverse=True)
    ctc_only = attention_rescoring(model, memory, 13, nbest, bos, eos, ctc_weight=1.0)
    assert [tokens for tokens, _, _ in ctc_only] == [[5, 6, 7], [8, 9, 10, 3, 4], [5]]
    with pytest.raises(ValueError, match="no hypothesis"):
        attention_rescoring(model, memory, 13, [], bos, eos)
