"""The compiled stream step (``modules/compiled_stream.py``): equal to the offline pass, the
same transcripts as the eager stream, and clear errors for what it does not do."""
import copy
import dataclasses
import random

import pytest
import torch

from inference import Recognizer
from modules.compiled_stream import CompiledStreamStep, compiler_available
from modules.conformer import CausalConformerEncoder
from modules.conmamba import ConMambaEncoder
from modules.context import PiecewiseContext
from modules.transformer import CausalTransformerEncoder
from test_inference import short_clip, tiny_ctc_run
from transcribe import read_audio

# torch.compile builds C++ for the CPU: without a compiler, only the errors are tested.
needs_compiler = pytest.mark.skipif(not compiler_available(),
                                    reason="torch.compile needs a C++ compiler (g++)")
SIZES = dict(n_mels=80, d_model=32, num_encoder_layers=2, d_ffn=64, subsampling_conv_channels=8)


def streamed(step: CompiledStreamStep, feats: torch.Tensor) -> torch.Tensor:
    state, outputs = step.initial_state(), []
    for start in range(0, feats.shape[1], step.chunk_frames):
        encoded, state = step(feats[:, start:start + step.chunk_frames], state)
        outputs.append(encoded)
    assert state.finished == (feats.shape[1] % step.chunk_frames != 0)
    return torch.cat(outputs, dim=1)


@needs_compiler
@pytest.mark.parametrize("encoder, context, dtype", [
    (CausalConformerEncoder(nhead=2, layer_left_contexts=[2, 5], **SIZES), (5, 1), torch.float64),
    (CausalTransformerEncoder(nhead=2, **SIZES), (3, 0), torch.float32),
    (ConMambaEncoder(d_state=4, **SIZES), (5, 1), torch.float64),
    (ConMambaEncoder(d_state=4, **SIZES), (-1, 0), torch.float64),
], ids=["conformer-float64-layer-caps", "transformer-float32", "conmamba-window",
        "conmamba-state"])
def test_compiled_step_equals_offline(encoder, context, dtype):
    """Every chunk, the cache-filling start and a shorter last chunk (101 frames) included."""
    torch.manual_seed(0)
    encoder = encoder.to(dtype).eval()
    feats = torch.randn(1, 101, 80, dtype=dtype)
    with torch.inference_mode():
        offline = encoder(feats, None, context)
        got = streamed(CompiledStreamStep(encoder, context), feats)
    assert got.shape == offline.shape
    assert (got - offline).abs().max() < (1e-6 if dtype == torch.float64 else 1e-4)


@needs_compiler
def test_a_copied_state_continues_and_a_foreign_one_is_refused():
    """A state deep-copied (or loaded) mid-stream continues like the original; a state of
    another step, or features of the wrong size, get one clear error."""
    torch.manual_seed(0)
    encoder = CausalConformerEncoder(nhead=2, **SIZES).eval()
    step, other = CompiledStreamStep(encoder, (4, 1)), CompiledStreamStep(encoder, (2, 1))
    feats = torch.randn(1, 24, 80)
    _, state = step(feats[:, :8], step.initial_state())
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    expected, _ = step(feats[:, 8:16], state)
    got, _ = step(feats[:, 8:16], copy.deepcopy(state))
    assert torch.equal(got, expected)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no recompilation
    with pytest.raises(ValueError, match=r"does not fit the compiled step of \[4, 1\]"):
        step(feats[:, 8:16], other.initial_state())
    with pytest.raises(ValueError, match=r"chunks of \(1, <= 8, 80\)"):
        step(torch.randn(1, 8, 40), state)


def test_compiled_step_refuses_what_it_does_not_do():
    conformer = CausalConformerEncoder(nhead=2, **SIZES).eval()
    with pytest.raises(ValueError, match="unidirectional ConMamba"):
        CompiledStreamStep(ConMambaEncoder(d_state=4, bidirectional=True, **SIZES).eval(), (4, 0))
    with pytest.raises(ValueError, match="bounded cache"):
        CompiledStreamStep(conformer, (-1, 3))
    with pytest.raises(ValueError, match="eval"):
        CompiledStreamStep(CausalConformerEncoder(nhead=2, **SIZES).train(), (4, 0))
    step = CompiledStreamStep(conformer, (4, 1))
    with pytest.raises(ValueError, match=r"chunks of \(1, <= 8, 80\)"):
        step(torch.randn(1, 9, 80), step.initial_state())
    with pytest.raises(ValueError, match="torch.float32 features"):
        step(torch.randn(1, 8, 80, dtype=torch.float64), step.initial_state())
    with pytest.raises(ValueError, match="has ended"):
        step(torch.randn(1, 8, 80), dataclasses.replace(step.initial_state(), finished=True))


@pytest.fixture(scope="module")
def recognizer(tmp_path_factory):
    return Recognizer(tiny_ctc_run(tmp_path_factory)[0])


@needs_compiler
def test_compiled_stream_gives_the_eager_stream_partials(recognizer, tmp_path_factory):
    samples = read_audio(short_clip(tmp_path_factory), recognizer.hparams["sample_rate"],
                         recognizer.min_samples)
    context = recognizer.context("low")
    streams = {compiled: recognizer.stream(context, compiled=compiled)
               for compiled in (False, True)}
    piece = streams[False].chunk * recognizer.hparams["compute_features"].hop_samples
    for start in range(0, len(samples), piece):
        partials = {c: s.push(samples[start:start + piece]) for c, s in streams.items()}
        assert partials[True] == partials[False]
    assert streams[True].finish() == streams[False].finish() == recognizer.transcribe(
        samples, context)
    again = recognizer.stream("low", compiled=True)  # the same step, no recompilation
    assert again.step is streams[True].step
    again.push(samples)
    assert again.finish() == streams[False].text()
    with pytest.raises(ValueError, match=r"has ended .* recognizer.stream"):
        again.push(samples)
    with pytest.raises(ValueError, match=r"\(n,\) samples"):
        recognizer.stream(context).push(samples[None])
    with pytest.raises(ValueError, match=r"recognizer.stream\(context, max_left=...\)"):
        recognizer.stream(context, compiled=True).switch("medium")


@needs_compiler
def test_switching_stream_compiles_every_step_before_it_starts(recognizer):
    """Compilation is not a chunk's compute (the load policy would read it as load)."""
    stream = recognizer.stream("low", max_left=32, compiled=True)
    reachable = [c for c in recognizer.trained_contexts if c[0] <= 32]
    assert all(recognizer.compiled_step(c, 32)._warm for c in reachable)
    assert recognizer.compiled_step((32, 3), 32) is recognizer.compiled_step((32, 3))
    assert stream.step is recognizer.compiled_step("low", 32)


def test_a_failed_compilation_is_one_clear_error(monkeypatch):
    step = CompiledStreamStep(CausalConformerEncoder(nhead=2, **SIZES).eval(), (4, 1))

    def no_compiler(*args):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n(long trace)")

    monkeypatch.setattr(step, "_compiled", no_compiler)
    with pytest.raises(ValueError, match=r"\[4, 1\] failed \(RuntimeError: InvalidCxxCompiler: "
                                         r"No working C\+\+ compiler found\); .*drop --compiled"):
        step.warm_up()


@needs_compiler
@pytest.mark.parametrize("encoder", [
    CausalConformerEncoder(nhead=2, layer_left_contexts=[3, 8], **SIZES),
    ConMambaEncoder(d_state=4, **SIZES)], ids=["conformer-layer-caps", "conmamba"])
def test_switching_between_compiled_steps_equals_the_piecewise_offline_pass(encoder):
    """Steps of several contexts with the same max_left share their states: a stream switching
    among them at random (chunk sizes too) equals the offline pass under the piecewise context."""
    torch.manual_seed(0)
    encoder = encoder.double().eval()
    contexts = [(8, 0), (2, 1), (5, 3), (0, 0)]
    steps = {context: CompiledStreamStep(encoder, context, max_left=8) for context in contexts}
    feats, rng = torch.randn(1, 90, 80, dtype=torch.float64), random.Random(0)
    state, start, schedule, outputs = steps[contexts[0]].initial_state(), 0, [], []
    with torch.inference_mode():
        while start < feats.shape[1]:
            context = rng.choice(contexts)
            encoded, state = steps[context](feats[:, start:start + steps[context].chunk_frames],
                                            state)
            schedule.append(context)
            outputs.append(encoded)
            start += steps[context].chunk_frames
        reference = encoder(feats, context=PiecewiseContext([schedule]))
    assert len(set(schedule)) == len(contexts)
    assert (torch.cat(outputs, dim=1) - reference).abs().max() < 1e-6
    with pytest.raises(ValueError, match="within its max_left"):
        CompiledStreamStep(encoder, (9, 0), max_left=8)
