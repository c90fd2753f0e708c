#!/usr/bin/env python3
"""Streaming transcription of one audio file with a trained CTC model.

Usage::

    python recipes/transcribe.py hparams/CTC/conformer_small.yaml --output_folder <trained folder> \\
        --audio speech.flac [--context medium] [--mode stream|benchmark|auto] \\
        [--latency_budget_ms 300] [--device cuda] [--any_training_override value ...]

- ``stream`` (default): feeds the audio one chunk at a time, prints the partial transcript as
  each chunk arrives, then the final one, which equals the offline transcript.
- ``benchmark``: for every streamable preset, the measured compute per chunk on this machine,
  the latency (chunk duration + compute) and the real-time factor.
- ``auto``: runs the benchmark and streams with the largest context whose measured latency fits
  ``--latency_budget_ms``.

The last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import statistics
import time

from dataio import load_audio
from evaluate import streamable, training_overrides
from inference import Recognizer, default_device, run_cli
from modules.context import describe_context


def stream_file(recognizer: Recognizer, samples, context, show: bool = True) -> dict:
    """Streams ``samples`` chunk by chunk; returns the final and offline transcripts."""
    stream = recognizer.stream(context)
    sample_rate = recognizer.hparams["sample_rate"]
    hop = recognizer.hparams["compute_features"].hop_samples
    piece = stream.chunk * hop  # the audio of one chunk of feature frames
    for start in range(0, len(samples), piece):
        partial = stream.push(samples[start:start + piece])
        if show:
            print(f"[{min(start + piece, len(samples)) / sample_rate:6.2f} s] {partial}", flush=True)
    final = stream.finish()
    offline = recognizer.transcribe(samples, context)
    return {"text": final, "offline_text": offline, "equal_to_offline": final == offline,
            "context": list(context),
            "context_seconds": describe_context(context, recognizer.encoder.frame_seconds)}


def benchmark(recognizer: Recognizer, samples, repeats: int = 2) -> list[dict]:
    """Measured per-chunk compute, latency and RTF of every streamable preset."""
    sample_rate = recognizer.hparams["sample_rate"]
    warm_up = recognizer.stream(recognizer.context(recognizer.hparams["valid_context"]))
    warm_up.push(samples[:sample_rate])  # first calls pay one-time allocation costs
    rows = []
    for name in recognizer.hparams["context_presets"]:
        context = recognizer.context(name)
        if not streamable(recognizer, context):
            continue
        per_chunk = []
        for _ in range(repeats):
            stream = recognizer.stream(context)
            piece = stream.chunk * recognizer.hparams["compute_features"].hop_samples
            for start in range(0, len(samples), piece):
                begin = time.perf_counter()
                stream.push(samples[start:start + piece])
                per_chunk.append(time.perf_counter() - begin)
        chunk_ms = (context[1] + 1) * recognizer.encoder.frame_seconds * 1000
        compute_ms = statistics.median(per_chunk) * 1000
        rows.append({"preset": name, "context": list(context),
                     "chunk_ms": round(chunk_ms, 1), "compute_ms": round(compute_ms, 2),
                     "latency_ms": round(chunk_ms + compute_ms, 1),
                     "rtf": round(sum(per_chunk) / repeats / (len(samples) / sample_rate), 4)})
    return rows


def choose(rows: list[dict], budget_ms: float) -> dict:
    """The largest context (longest chunk, then longest left) whose latency fits the budget."""
    fitting = [r for r in rows if r["latency_ms"] <= budget_ms]
    if not fitting:
        fastest = min(rows, key=lambda r: r["latency_ms"])
        raise ValueError(f"no preset fits --latency_budget_ms {budget_ms:g}: the fastest, "
                         f"{fastest['preset']}, measured {fastest['latency_ms']} ms here")
    return max(fitting, key=lambda r: (r["chunk_ms"], r["context"][0]))


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("hparams")
    parser.add_argument("--output_folder", required=True, help="the CTC run's output folder")
    parser.add_argument("--audio", required=True)
    parser.add_argument("--context", default=None, help="preset or 'L,R' (default: valid_context)")
    parser.add_argument("--mode", choices=["stream", "benchmark", "auto"], default="stream")
    parser.add_argument("--latency_budget_ms", type=float, default=None)
    parser.add_argument("--device", default=default_device(), help="default: cuda, mps or cpu")
    args, rest = parser.parse_known_args(argv)
    if args.mode == "auto" and args.latency_budget_ms is None:
        raise ValueError("--mode auto needs --latency_budget_ms")
    recognizer = Recognizer(args.hparams, args.output_folder, training_overrides(rest), args.device)
    samples = load_audio(args.audio, recognizer.hparams["sample_rate"])
    if args.mode == "benchmark":
        rows = benchmark(recognizer, samples)
        for row in rows:
            print(f"{row['preset']:>10} {row['context']}: chunk {row['chunk_ms']} ms + compute "
                  f"{row['compute_ms']} ms = latency {row['latency_ms']} ms, RTF {row['rtf']}")
        return {"benchmark": rows}
    if args.mode == "auto":
        rows = benchmark(recognizer, samples)
        chosen = choose(rows, args.latency_budget_ms)
        print(f"chose {chosen['preset']}: measured latency {chosen['latency_ms']} ms <= "
              f"{args.latency_budget_ms:g} ms", flush=True)
        result = stream_file(recognizer, samples, recognizer.context(chosen["preset"]))
        return {**result, "chosen": chosen, "benchmark": rows}
    context = recognizer.context(args.context or recognizer.hparams["valid_context"])
    return stream_file(recognizer, samples, context)


if __name__ == "__main__":
    run_cli(main)
