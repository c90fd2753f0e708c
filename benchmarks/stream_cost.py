#!/usr/bin/env python3
"""Does a stream's cost stay flat? Per-chunk compute over a long stream, ours side by side with
the history-decoding stream it replaced.

A long stream is built by cycling the utterances of a test CSV; it is pushed one chunk of audio
at a time (chunk-aligned pieces: the fewest calls per chunk) through ``Recognizer.stream``:
features, normalization, encoder chunk, CTC head, incremental greedy decoding; once with the
encoder step compiled (``modules.compiled_stream``; compiled before the timed stream, so
compilation is not in its RTF), then eager. The reference, on the same model and audio, is the
earlier ``Stream``: it kept every chunk's log-probabilities and decoded the whole history after
each chunk. Printed: ms per chunk in the first and last tenth of each stream,
their ratio, the real-time factor, and what the stream holds at the end.

Then where one chunk's time goes: the encoder alone on one chunk, in float32 as it runs, with
its linear layers dynamically quantized to int8 (a quarter of the weight bytes), and in
bfloat16, timed in interleaved rounds (median), with the aten calls per chunk (profiler) and the
weight MiB each chunk reads.

Usage::

    python benchmarks/stream_cost.py <CTC run folder> [--minutes 60] [--reference_minutes 7] \\
        [--context 8,0] [--test_csv data/benchmark/test.csv] [--threads 2]

One JSON line at the end.
"""
import argparse
import copy
import csv
import hashlib
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "recipes")]

from inference import Recognizer  # noqa: E402
from modules.compiled_stream import compiler_available  # noqa: E402
from modules.ctc import greedy_transcripts  # noqa: E402


class HistoryDecoder:
    """The decoding the earlier ``Stream`` did: every log-probability kept, the whole history
    greedy-decoded again after each chunk."""

    def __init__(self, sp):
        self.sp, self.outputs = sp, []

    def push(self, log_probs: torch.Tensor) -> None:
        self.outputs.append(log_probs)

    def text(self) -> str:
        if not self.outputs:
            return ""
        return greedy_transcripts(torch.cat(self.outputs, dim=1).cpu(), torch.ones(1), self.sp)[0]


def utterances(test_csv: str) -> list[torch.Tensor]:
    """Every utterance of ``test_csv`` as (n,) float32 samples (``$data_root`` = its folder)."""
    folder = Path(test_csv).parent
    with open(test_csv) as f:
        return [torch.from_numpy(sf.read(row["wav"].replace("$data_root", str(folder)),
                                         dtype="float32")[0]) for row in csv.DictReader(f)]


def run_stream(recognizer: Recognizer, audio: list[torch.Tensor], context, minutes: float,
               history: bool, compiled: bool = False) -> dict:
    """Pushes ``minutes`` of cycled ``audio`` one chunk at a time; per-chunk times by tenth."""
    stream = recognizer.stream(context, compiled=compiled)
    if history:
        stream.decoder = HistoryDecoder(recognizer.sp)
    piece = stream.chunk * recognizer.hparams["compute_features"].hop_samples
    total = int(minutes * 60 * recognizer.hparams["sample_rate"])
    times, pending, index, pushed = [], torch.zeros(0), 0, 0
    while pushed < total:
        while len(pending) < piece:
            pending = torch.cat([pending, audio[index % len(audio)]])
            index += 1
        begin = time.perf_counter()
        stream.push(pending[:piece])
        times.append(time.perf_counter() - begin)
        pending, pushed = pending[piece:], pushed + piece
    text = stream.finish()
    tenth = max(1, len(times) // 10)
    first, last = sum(times[:tenth]) / tenth, sum(times[-tenth:]) / tenth
    return {"decoding": "history" if history else "incremental",
            "encoder_step": "compiled" if compiled else "eager", "minutes": minutes,
            "chunks": len(times), "first_tenth_ms": round(1000 * first, 3),
            "last_tenth_ms": round(1000 * last, 3), "last_over_first": round(last / first, 3),
            "rtf": round(sum(times) / (pushed / recognizer.hparams["sample_rate"]), 4),
            "text_characters": len(text), "text_sha1": hashlib.sha1(text.encode()).hexdigest(),
            "held_log_prob_frames": sum(o.shape[1] for o in getattr(stream.decoder, "outputs", []))}


def encoder_chunk_ms(encoder, context, n_mels: int, dtype: torch.dtype, chunks: int) -> float:
    """Mean ms of ``chunks`` encoder-only chunks, after the caches have filled."""
    state = encoder.make_streaming_context(context)
    feats = torch.randn(1, encoder.chunk_frames(state), n_mels, dtype=dtype)
    with torch.inference_mode():
        for _ in range(20):
            encoder.forward_streaming(feats, state)
        begin = time.perf_counter()
        for _ in range(chunks):
            encoder.forward_streaming(feats, state)
    return 1000 * (time.perf_counter() - begin) / chunks


def compiled_chunk_ms(step, n_mels: int, chunks: int) -> float:
    """``encoder_chunk_ms`` of a compiled step (``modules.compiled_stream``)."""
    state = step.initial_state()
    feats = torch.randn(1, step.chunk_frames, n_mels)
    for _ in range(20):
        _, state = step(feats, state)
    begin = time.perf_counter()
    for _ in range(chunks):
        _, state = step(feats, state)
    return 1000 * (time.perf_counter() - begin) / chunks


def chunk_breakdown(recognizer: Recognizer, context, rounds: int = 5, chunks: int = 200,
                    compiled: bool = True) -> dict:
    """The encoder's per-chunk time in float32, int8 linears, bfloat16 and compiled (float32;
    interleaved rounds, median), its eager aten calls per chunk and the weight MiB it reads per
    chunk."""
    encoder, n_mels = recognizer.encoder, recognizer.hparams["n_mels"]
    with warnings.catch_warnings():  # torch.ao's eager quantization announces its move to torchao
        warnings.simplefilter("ignore")
        int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(encoder), {torch.nn.Linear},
                                                      dtype=torch.qint8)
    variants = {"float32": (encoder, torch.float32), "int8_linears": (int8, torch.float32),
                "bfloat16": (copy.deepcopy(encoder).to(torch.bfloat16), torch.bfloat16)}
    times = {name: [] for name in [*variants] + (["compiled"] if compiled else [])}
    for _ in range(rounds):
        for name, (module, dtype) in variants.items():
            times[name].append(encoder_chunk_ms(module, context, n_mels, dtype, chunks))
        if compiled:
            times["compiled"].append(compiled_chunk_ms(recognizer.compiled_step(context),
                                                       n_mels, chunks))
    medians = {name: round(statistics.median(values), 3) for name, values in times.items()}
    state = encoder.make_streaming_context(context)
    feats = torch.randn(1, encoder.chunk_frames(state), n_mels)
    with torch.inference_mode(), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(20):
            encoder.forward_streaming(feats, state)
    calls = {event.key: event.count / 20 for event in profiler.key_averages()}
    return {"encoder_chunk_ms": medians,
            "int8_over_float32": round(medians["int8_linears"] / medians["float32"], 3),
            "bfloat16_over_float32": round(medians["bfloat16"] / medians["float32"], 3),
            "compiled_over_float32": (round(medians["compiled"] / medians["float32"], 3)
                                      if compiled else None),
            "aten_calls_per_chunk": round(sum(calls.values())),
            "linear_calls_per_chunk": round(calls.get("aten::linear", 0)),
            "weight_mib_per_chunk": round(sum(p.numel() * p.element_size()
                                              for p in encoder.parameters()) / 2**20, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a CTC run folder")
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--reference_minutes", type=float, default=7.0,
                        help="length of the history-decoding reference stream (0: skip it)")
    parser.add_argument("--context", default="8,0")
    parser.add_argument("--test_csv", default="data/benchmark/test.csv")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved timing rounds of the chunk breakdown (median)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recognizer = Recognizer(args.run)
    context = recognizer.context(args.context)
    audio = utterances(args.test_csv)
    steps = [True, False] if compiler_available() else [False]
    if steps == [False]:
        print("no C++ compiler here (torch.compile needs one): the compiled step is not measured")
    begin = time.perf_counter()
    for compiled in steps:  # compiles; warms up one-time costs
        run_stream(recognizer, audio, context, 0.2, history=False, compiled=compiled)
    compile_seconds = time.perf_counter() - begin
    rows = [run_stream(recognizer, audio, context, args.minutes, history=False, compiled=compiled)
            for compiled in steps]
    if args.reference_minutes:
        rows.append(run_stream(recognizer, audio, context, args.reference_minutes, history=True))
    print(f"compiling the encoder step and 12 s warm-up streams: {compile_seconds:.1f} s")
    for row in rows:
        print(f"{row['decoding']:>11} {row['encoder_step']:>8} {row['minutes']:g} min at "
              f"{list(context)}: "
              f"{row['first_tenth_ms']} -> {row['last_tenth_ms']} ms per chunk "
              f"(x{row['last_over_first']}), RTF {row['rtf']}", flush=True)
    breakdown = chunk_breakdown(recognizer, context, args.rounds, compiled=steps[0])
    print(f"encoder alone, ms per chunk: {breakdown['encoder_chunk_ms']}; "
          f"{breakdown['aten_calls_per_chunk']} aten calls and "
          f"{breakdown['weight_mib_per_chunk']} MiB of weights per chunk", flush=True)
    print(json.dumps({"context": list(context), "threads": args.threads, "run": args.run,
                      "compile_seconds": round(compile_seconds, 1),
                      "compiled_text_equals_eager": (rows[0]["text_sha1"] == rows[1]["text_sha1"]
                                                     if steps[0] else None),
                      "rows": rows,
                      "breakdown": breakdown}))


if __name__ == "__main__":
    main()
