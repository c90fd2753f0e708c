#!/usr/bin/env python3
"""Streaming transcription of one audio file with a trained CTC or S2S model.

Usage::

    python recipes/transcribe.py <run folder> --audio speech.flac [--context medium] \\
        [--mode stream|benchmark|auto|adaptive] [--latency_budget_ms 300] \\
        [--policy latency,snr,load] [--decoding attention_rescoring] [--lm <LM run>] \\
        [--compiled] [--device cuda] [--quiet]

``<run folder>`` is the ``--output_folder`` of a ``recipes/train.py`` CTC or S2S run (or its
``hyperparams.yaml``); a copy of it works from any directory. ``--decoding`` and the LM options
are evaluate.py's: ``ctc_prefix_beam`` streams the beam's best prefix; ``attention_rescoring``
streams it too, then rescores the n-best when the audio ends (``second_pass_ms`` in the JSON);
``attention`` is offline. A file at another sample rate or
with several channels is resampled / averaged to mono, with one line saying so.

- ``stream`` (default): feeds the audio one chunk at a time and prints the partial transcript
  whenever it changes (``--quiet``: only the final JSON line); the final transcript equals the
  offline one. ``--context`` chooses the context (default: the run's ``valid_context``).
- ``benchmark``: for every streamable preset, the measured compute per chunk on this machine,
  the latency (chunk duration + compute) and the real-time factor.
- ``auto``: runs the benchmark and streams with the largest context whose measured latency fits
  ``--latency_budget_ms``.
- ``adaptive``: runs the benchmark (the calibration), then streams with a context that switches
  between chunks among the trained ones, chosen by ``--policy`` (``modules/adaptive.py``):
  ``latency`` (chunk + compute within ``--latency_budget_ms``), ``snr`` (more left context as
  the audio's running SNR drops), ``load`` (measured compute against the calibration: real-time
  headroom). Partial lines show the context in force; the JSON lists every switch, and the
  final transcript equals the offline pass under the piecewise context the stream ran.

``--compiled`` (Conformer, Transformer, unidirectional ConMamba): the encoder's chunk step runs
compiled by ``torch.compile`` (``modules/compiled_stream.py``), once per context (tens of
seconds, cached on disk for later runs), for about half the per-chunk compute on a CPU.

The last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import quiet  # noqa: F401  (before SpeechBrain: drops its torchvision line)
import soundfile as sf
import torch

from cli import RecipeParser, note, run_cli
from dataio import AudioFileError
from evaluate import (
    add_decoding_arguments,
    check_decoding_arguments,
    check_output_folder,
    decoding_options,
    streamable,
)
from inference import Recognizer, default_device
from modules.adaptive import POLICIES, ContextController
from modules.context import describe_context
from run_folder import find_run_folder


def read_audio(path: str, sample_rate: int, min_samples: int) -> torch.Tensor:
    """One audio file as (n,) float32 samples at ``sample_rate``, mono: other rates are
    resampled and channels averaged, with one line on stderr; bad files: one-line errors."""
    if Path(path).is_dir():
        raise AudioFileError(f"--audio {path} is a folder; give one audio file (to decode many, "
                             "list them in a CSV and run recipes/evaluate.py)")
    if not Path(path).is_file():
        raise AudioFileError(f"--audio {path}: no such file")
    try:
        audio, rate = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as error:
        raise AudioFileError(f"{path}: not a readable audio file ({error}); convert it to WAV or "
                             "FLAC") from None
    samples, changes = torch.from_numpy(audio).mean(1), []
    if audio.shape[1] > 1:
        changes.append(f"{audio.shape[1]} channels averaged to mono")
    if rate != sample_rate:
        import torchaudio  # only for this

        samples = torchaudio.functional.resample(samples, rate, sample_rate)
        changes.append(f"resampled from {rate} to {sample_rate} Hz")
    if changes:
        note(f"{path}: {', '.join(changes)} for the model")
    if not torch.isfinite(samples).all():
        raise AudioFileError(f"{path}: contains NaN or infinite samples; fix the file")
    if len(samples) < min_samples:
        raise AudioFileError(f"{path}: {len(samples) / sample_rate:.3f} s of audio is shorter than "
                             f"the model's shortest input, {min_samples / sample_rate:.3f} s (one "
                             "encoder frame); give a longer recording")
    return samples


def stream_file(recognizer: Recognizer, samples, context, show: bool = True,
                compiled: bool = False) -> dict:
    """Streams ``samples`` chunk by chunk, printing the partial transcript when it changes
    (``show``); returns the final and offline transcripts."""
    stream = recognizer.stream(context, compiled=compiled)
    sample_rate = recognizer.hparams["sample_rate"]
    hop = recognizer.hparams["compute_features"].hop_samples
    piece = stream.chunk * hop  # the audio of one chunk of feature frames
    shown = ""
    for start in range(0, len(samples), piece):
        partial = stream.push(samples[start:start + piece])
        if show and partial != shown:
            seconds = min(start + piece, len(samples)) / sample_rate
            print(f"[{seconds:6.2f} s] {partial}", flush=True)
            shown = partial
    final = stream.finish()
    if show and final != shown:
        print(f"[{len(samples) / sample_rate:6.2f} s] {final}", flush=True)
    offline = recognizer.transcribe(samples, context)
    second_pass = stream.second_pass_seconds
    return {"text": final, "offline_text": offline, "equal_to_offline": final == offline,
            "streamed": True, "decoding": recognizer.decoding.decoding,
            "second_pass_ms": None if second_pass is None else round(1000 * second_pass, 1),
            "context": list(context),
            "context_seconds": describe_context(context, recognizer.encoder.frame_seconds)}


def stream_adaptive(recognizer: Recognizer, samples, controller: ContextController,
                    show: bool = True, compiled: bool = False) -> dict:
    """Streams ``samples`` with ``controller`` switching the context between chunks; prints
    the partial transcript (and the context in force) when either changes."""
    stream = recognizer.stream(controller.first_context(), controller=controller,
                               compiled=compiled)
    sample_rate = recognizer.hparams["sample_rate"]
    hop = recognizer.hparams["compute_features"].hop_samples
    shown, start = None, 0
    while start < len(samples):
        piece = stream.chunk * hop  # the audio of the next chunk under the context in force
        partial = stream.push(samples[start:start + piece])
        start += piece
        if show and (partial, stream.context) != shown:
            print(f"[{min(start, len(samples)) / sample_rate:6.2f} s] {list(stream.context)} "
                  f"{partial}", flush=True)
            shown = partial, stream.context
    final = stream.finish()
    if show and final != shown[0]:
        print(f"[{len(samples) / sample_rate:6.2f} s] {list(stream.context)} {final}", flush=True)
    offline = recognizer.transcribe(samples, stream.piecewise_context())
    return {"text": final, "offline_text": offline, "equal_to_offline": final == offline,
            "streamed": True, "policies": sorted(controller.policies),
            **stream.summary()}


def transcribe_offline(recognizer: Recognizer, samples, context, show: bool = True) -> dict:
    """A context that cannot be streamed (offline, or all the past), or an offline decoding:
    one offline pass, said."""
    if recognizer.decoding.decoding == "attention":
        note("--decoding attention is an offline beam search: transcribed offline")
    else:
        note(f"context {list(context)} cannot be streamed (it needs the whole utterance or all "
             "its past): transcribed offline")
    text = recognizer.transcribe(samples, context)
    if show:
        print(f"[{len(samples) / recognizer.hparams['sample_rate']:6.2f} s] {text}", flush=True)
    return {"text": text, "offline_text": text, "equal_to_offline": True, "streamed": False,
            "context": list(context),
            "context_seconds": describe_context(context, recognizer.encoder.frame_seconds)}


def benchmark(recognizer: Recognizer, samples, repeats: int = 2, compiled: bool = False,
              switching: bool = False) -> list[dict]:
    """Measured per-chunk compute, latency and RTF of every streamable preset (``compiled``:
    of compiled streams, each compiled and run once before it is measured; with ``switching``,
    a trained context runs the compiled step that an adaptive stream runs, with caches of the
    largest trained left context, so it is compiled once for both)."""
    max_left = max(left for left, _ in recognizer.trained_contexts) if switching else None
    sample_rate = recognizer.hparams["sample_rate"]
    warm_up = recognizer.stream(recognizer.context(recognizer.hparams["valid_context"]))
    warm_up.push(samples[:sample_rate])  # first calls pay one-time allocation costs
    rows = []
    for name in recognizer.hparams["context_presets"]:
        context = recognizer.context(name)
        if not streamable(recognizer, context) or recognizer.decoding.decoding == "attention":
            continue
        shared = max_left if compiled and context in recognizer.trained_contexts else None
        if compiled:  # compilation is not per-chunk compute
            recognizer.stream(context, shared, compiled=True).push(samples[:sample_rate])
        per_chunk = []
        for _ in range(repeats):
            stream = recognizer.stream(context, shared, compiled=compiled)
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


def make_controller(recognizer: Recognizer, rows: list[dict], policies: list[str],
                    budget_ms: float | None) -> ContextController:
    """A controller over the trained contexts, calibrated with the measured ``rows``."""
    measured = {tuple(row["context"]): row["compute_ms"] for row in rows}
    missing = [list(c) for c in recognizer.trained_contexts if c not in measured]
    if missing:
        raise ValueError(f"trained contexts {missing} are not presets of the run "
                         "(context_presets), so they were not calibrated; add them as presets")
    return ContextController(recognizer.trained_contexts, recognizer.encoder.frame_seconds,
                             compute_ms=measured, policies=policies, latency_budget_ms=budget_ms)


def choose(rows: list[dict], budget_ms: float) -> dict:
    """The largest context (longest chunk, then longest left) whose latency fits the budget."""
    fitting = [r for r in rows if r["latency_ms"] <= budget_ms]
    if not fitting:
        fastest = min(rows, key=lambda r: r["latency_ms"])
        raise ValueError(f"no preset fits --latency_budget_ms {budget_ms:g}: the fastest, "
                         f"{fastest['preset']}, measured {fastest['latency_ms']} ms here")
    return max(fitting, key=lambda r: (r["chunk_ms"], r["context"][0]))


def parse_arguments(argv: list[str]):
    parser = RecipeParser(prog="transcribe.py", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="the CTC run folder (or its hyperparams.yaml)")
    parser.add_argument("--audio", required=True, help="one audio file")
    parser.add_argument("--context", default=None,
                        help="stream mode: preset or 'L,R' (default: the run's valid_context)")
    parser.add_argument("--mode", choices=["stream", "benchmark", "auto", "adaptive"],
                        default="stream", help="see above (default: stream)")
    parser.add_argument("--latency_budget_ms", type=float, default=None,
                        help="auto mode: the largest context whose measured latency fits; "
                             "adaptive mode: the budget of the latency policy")
    parser.add_argument("--policy", default=None,
                        help=f"adaptive mode: comma-separated policies among {', '.join(POLICIES)}"
                             " (default: snr,load, with latency too when a budget is given)")
    parser.add_argument("--compiled", action="store_true",
                        help="compile the encoder's chunk step (torch.compile; once per "
                             "context, tens of seconds) for about half the per-chunk compute")
    add_decoding_arguments(parser)
    parser.add_argument("--device", default=default_device(), help="default: cuda, mps or cpu")
    parser.add_argument("--quiet", action="store_true", help="print only the final JSON line")
    parser.add_argument("--output_folder", help="the run folder (older form; the first argument "
                                                "is enough)")
    args = parser.parse_strict(argv)
    check_decoding_arguments(parser, args)
    if args.decoding == "attention" and args.mode != "stream":
        parser.error(f"--mode {args.mode} streams, and --decoding attention is offline: use "
                     "--mode stream, or a streaming decoding")
    if args.mode == "auto" and args.latency_budget_ms is None:
        parser.error("--mode auto needs --latency_budget_ms (the largest context whose measured "
                     "latency fits it is chosen)")
    if args.mode not in ("auto", "adaptive") and args.latency_budget_ms is not None:
        parser.error(f"--latency_budget_ms is used only by --mode auto and adaptive; add one of "
                     f"them, or drop it in --mode {args.mode}")
    if args.mode != "adaptive" and args.policy is not None:
        parser.error("--policy is used only by --mode adaptive")
    if args.mode == "adaptive":
        default = "snr,load" + (",latency" if args.latency_budget_ms is not None else "")
        args.policy = [p.strip() for p in (args.policy or default).split(",") if p.strip()]
        unknown = sorted(set(args.policy) - set(POLICIES))
        if unknown:
            parser.error(f"--policy {','.join(unknown)}: unknown; choose among "
                         f"{', '.join(POLICIES)}")
        if "latency" in args.policy and args.latency_budget_ms is None:
            parser.error("--policy latency needs --latency_budget_ms")
    if args.mode != "stream" and args.context is not None:
        what = "measures every preset" if args.mode == "benchmark" else "chooses the contexts"
        parser.error(f"--context is not used by --mode {args.mode}, which {what}; drop --context "
                     "or use --mode stream")
    return args


def main(argv: list[str]) -> dict:
    args = parse_arguments(argv)
    return {"compiled": args.compiled, **transcribe_file(args)}


def transcribe_file(args) -> dict:
    """The chosen mode on ``args.audio``; the result's JSON fields."""
    run = find_run_folder(args.run, args.output_folder)
    check_output_folder(run, args.output_folder)
    recognizer = Recognizer(run, args.device, decoding_options(args, run), args.lm)
    samples = read_audio(args.audio, recognizer.hparams["sample_rate"], recognizer.min_samples)
    show = not args.quiet
    if args.compiled and show:
        note("--compiled: the encoder step compiles once per context the stream may run before "
             "it starts (10-40 s each; torch.compile caches them on disk for later runs)")
    if args.mode == "stream":
        context = recognizer.context(args.context or recognizer.hparams["valid_context"])
        if not streamable(recognizer, context) or recognizer.decoding.decoding == "attention":
            return {**transcribe_offline(recognizer, samples, context, show),
                    "compiled": False}  # nothing streams
        return stream_file(recognizer, samples, context, show, args.compiled)
    rows = benchmark(recognizer, samples, compiled=args.compiled,
                     switching=args.mode == "adaptive")
    if args.mode == "adaptive":
        controller = make_controller(recognizer, rows, args.policy, args.latency_budget_ms)
        return {**stream_adaptive(recognizer, samples, controller, show, args.compiled),
                "benchmark": rows}
    if args.mode == "benchmark":
        for row in rows if show else []:
            print(f"{row['preset']:>10} {row['context']}: chunk {row['chunk_ms']} ms + compute "
                  f"{row['compute_ms']} ms = latency {row['latency_ms']} ms, RTF {row['rtf']}")
        return {"benchmark": rows}
    chosen = choose(rows, args.latency_budget_ms)
    if show:
        print(f"chose {chosen['preset']}: measured latency {chosen['latency_ms']} ms <= "
              f"{args.latency_budget_ms:g} ms", flush=True)
    result = stream_file(recognizer, samples, recognizer.context(chosen["preset"]), show,
                         args.compiled)
    return {**result, "chosen": chosen, "benchmark": rows}


if __name__ == "__main__":
    run_cli(main)
