"""The recognizer's stream: incremental decoding, bounded memory, switches between chunks (by
hand or by the adaptive controller) and ``transcribe.py --mode adaptive``."""
import json
import random
import subprocess
import sys

import pytest
import torch

import transcribe
from inference import Recognizer
from modules.adaptive import Decision
from modules.compiled_stream import compiler_available
from conftest import ROOT
from modules.ctc import IncrementalGreedyCTC, greedy_transcripts
from test_inference import AUDIO, short_clip, tiny_ctc_run
from transcribe import read_audio


@pytest.fixture(scope="module")
def recognizer(tmp_path_factory):
    return Recognizer(tiny_ctc_run(tmp_path_factory)[0])


@pytest.fixture(scope="module")
def samples(recognizer):
    return read_audio(AUDIO, recognizer.hparams["sample_rate"], recognizer.min_samples)


class ScriptedController:
    """Switches to a random trained context after every chunk (a seeded script)."""

    policies = ()

    def __init__(self, contexts, seed=0):
        self.contexts, self.rng = contexts, random.Random(seed)

    def first_context(self):
        return self.contexts[0]

    def next_context(self, report):
        return Decision(self.rng.choice(self.contexts), "scripted")


def test_incremental_greedy_decoding_equals_decoding_the_history(recognizer):
    """Random best paths (blanks, repeats across chunk boundaries), cut in random chunks: every
    partial and the final text equal greedy decoding of all the log-probabilities so far."""
    sp, rng = recognizer.sp, random.Random(0)
    vocab = sp.get_piece_size() + 1
    for _ in range(20):
        path, index = [], 0
        for _ in range(rng.randint(1, 120)):
            roll = rng.random()
            index = 0 if roll < 0.4 else index if roll < 0.7 else rng.randrange(1, vocab)
            path.append(index)
        log_probs = torch.full((1, len(path), vocab), -10.0)
        log_probs[0, torch.arange(len(path)), torch.tensor(path)] = 0.0
        decoder, start = IncrementalGreedyCTC(sp), 0
        while start < len(path):
            end = start + rng.randint(1, 9)
            decoder.push(log_probs[:, start:end])
            history = greedy_transcripts(log_probs[:, :end], torch.ones(1), sp)[0]
            assert decoder.text() == history
            start = end


def test_stream_memory_does_not_grow_beyond_the_text(recognizer, samples):
    """Caches held by a stream after 5 s and after 5 x longer: the same sizes; less than a
    chunk of features waiting; no log-probabilities (the decoder holds text and token ids)."""
    def cache_elements(stream):
        state = stream.state
        tensors = [t for layer in state.layers for t in [layer.conv, *layer.mixer.values()]
                   if isinstance(t, torch.Tensor)] + list(state.subsampling)
        return sum(t.numel() for t in tensors)

    stream = recognizer.stream(recognizer.context("low"), max_left=64)
    for repeat in range(5):
        stream.push(samples)
        if repeat == 0:
            after_one = cache_elements(stream)
        assert stream.pending.shape[1] < stream.chunk
    assert cache_elements(stream) == after_one
    assert not hasattr(stream, "outputs")
    assert not any(isinstance(v, torch.Tensor) for v in vars(stream.decoder).values())


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.skipif(
    not compiler_available(), reason="torch.compile needs a C++ compiler"))],
    ids=["eager", "compiled"])
def test_switched_stream_equals_the_piecewise_offline_reference(recognizer, samples, monkeypatch,
                                                                compiled):
    """Random switches among the trained contexts (chunk sizes too) between chunks: the
    log-probabilities and the text equal the offline pass under the piecewise context, with the
    encoder steps eager or compiled (``modules.compiled_stream``: one step per context)."""
    pushed = []
    push = IncrementalGreedyCTC.push
    monkeypatch.setattr(IncrementalGreedyCTC, "push",
                        lambda self, log_probs: (pushed.append(log_probs), push(self, log_probs)))
    stream = recognizer.stream(recognizer.trained_contexts[0],
                               controller=ScriptedController(recognizer.trained_contexts),
                               compiled=compiled)
    for start in range(0, len(samples), 1234):  # pieces that do not align with chunks
        stream.push(samples[start:start + 1234])
    final = stream.finish()
    assert len(stream.switches) > 10 and {s["reason"] for s in stream.switches} == {"scripted"}
    assert len({s["to"][1] for s in stream.switches}) > 1  # the chunk size switched too
    reference = stream.piecewise_context()
    feats = recognizer.normalize(recognizer.hparams["compute_features"](samples[None]))
    offline = recognizer.log_probs(recognizer.encoder(feats, context=reference))
    assert (torch.cat(pushed, dim=1) - offline).abs().max() < 1e-4
    assert final == recognizer.transcribe(samples, reference)


def test_switches_outside_the_trained_contexts_or_max_left_are_refused(recognizer):
    stream = recognizer.stream(recognizer.context("low"), max_left=32)
    with pytest.raises(ValueError, match="not trained"):
        stream.switch("5,1")
    with pytest.raises(ValueError, match="max_left"):
        stream.switch("high")  # [64, 7]: left 64 > 32
    stream.switch("medium", "test")
    assert stream.context == (32, 3) and stream.switches[-1]["reason"] == "test"
    fixed = recognizer.stream(recognizer.context("low"))
    with pytest.raises(ValueError, match="keeps its context"):
        fixed.switch("medium")


def test_adaptive_mode_lists_switches_and_equals_its_offline_reference(tmp_path_factory,
                                                                       monkeypatch):
    run = tiny_ctc_run(tmp_path_factory)[0]
    rows = [{"preset": p, "context": c, "chunk_ms": (c[1] + 1) * 40.0, "compute_ms": ms}
            for p, c, ms in [("very_low", [8, 0], 30.0), ("low", [16, 1], 31.0),
                             ("medium", [32, 3], 33.0), ("high", [64, 7], 36.0)]]
    monkeypatch.setattr(transcribe, "benchmark", lambda *args, **options: rows)  # a calibration, scripted
    result = transcribe.main([str(run), "--audio", short_clip(tmp_path_factory, 4.0),
                              "--mode", "adaptive", "--policy", "latency",
                              "--latency_budget_ms", "150", "--quiet"])
    assert result["equal_to_offline"] and result["policies"] == ["latency"]
    # the most accurate context whose calibrated latency fits 150 ms: [16, 1] (111 ms)
    assert [c["context"] for c in result["contexts"]] == [[16, 1]] and not result["switches"]
    assert result["contexts"][0]["chunks"] == 50 and result["contexts"][0]["compute_seconds"] > 0


@pytest.mark.parametrize("arguments, message", [
    (["--mode", "adaptive", "--policy", "speed"], "unknown"),
    (["--mode", "adaptive", "--policy", "latency"], "needs --latency_budget_ms"),
    (["--mode", "stream", "--policy", "snr"], "only by --mode adaptive"),
])
def test_adaptive_mode_argument_errors(arguments, message):
    with pytest.raises(SystemExit, match=message):
        transcribe.parse_arguments(["run", "--audio", "a.wav", *arguments])


def run_benchmark(*args):
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_stream_cost_benchmark_contract(tmp_path_factory):
    """Both streams run on the same audio; only the history decoder keeps log-probabilities."""
    run = tiny_ctc_run(tmp_path_factory)[0]
    report = run_benchmark("benchmarks/stream_cost.py", str(run), "--minutes", "0.2",
                           "--reference_minutes", "0.1", "--test_csv",
                           "data/espeak_corpus/test.csv", "--threads", "1", "--rounds", "1")
    *compiled, incremental, history = report["rows"]
    assert incremental["decoding"] == "incremental" and history["decoding"] == "history"
    assert incremental["encoder_step"] == "eager"
    if compiler_available():  # measured side by side, the same transcript
        assert compiled[0]["encoder_step"] == "compiled" and report["compile_seconds"] > 0
        assert compiled[0]["chunks"] == incremental["chunks"]
        assert report["compiled_text_equals_eager"]
    else:
        assert not compiled and report["compiled_text_equals_eager"] is None
    assert incremental["chunks"] == 300 and incremental["held_log_prob_frames"] == 0
    assert history["held_log_prob_frames"] == history["chunks"] == 150
    assert incremental["first_tenth_ms"] > 0 and incremental["rtf"] > 0
    breakdown = report["breakdown"]  # where one chunk's time goes
    measured = {"float32", "int8_linears", "bfloat16"} | (
        {"compiled"} if compiler_available() else set())
    assert set(breakdown["encoder_chunk_ms"]) == measured
    assert breakdown["aten_calls_per_chunk"] > breakdown["linear_calls_per_chunk"] > 0
    assert breakdown["weight_mib_per_chunk"] > 0


def test_adaptive_context_benchmark_contract(tmp_path_factory):
    """Every trained context as a fixed preset, then each policy set, on the same streams."""
    run = tiny_ctc_run(tmp_path_factory)[0]
    out = tmp_path_factory.mktemp("adaptive")
    report = run_benchmark("benchmarks/adaptive_context.py", str(run), "--test_csv",
                           "data/espeak_corpus/test.csv", "--streams", "1", "--minutes", "0.15",
                           "--load_processes", "1", "--policies", "snr,load", "--threads", "1",
                           "--out", str(out))
    names = [row["configuration"] for row in report["rows"]]
    assert names == ["fixed [8, 0]", "fixed [16, 1]", "fixed [32, 3]", "fixed [64, 7]",
                     "adaptive snr,load"]
    assert all(0 <= row["deadline_miss_percent"] <= 100 and row["chunks"] > 0
               for row in report["rows"])
    assert report["command"][0] == "benchmarks/adaptive_context.py" and report["calibration"]
    assert (out / "table.md").read_text().count("\n") == 7
