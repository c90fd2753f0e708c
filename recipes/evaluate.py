#!/usr/bin/env python3
"""Decodes a test set with a trained CTC model at one or several contexts (latencies).

Usage::

    python recipes/evaluate.py hparams/CTC/conformer_small.yaml --output_folder <trained folder> \\
        --test_csv data/espeak_corpus/test.csv --context medium [--context low ... | all] \\
        [--streaming] [--device cuda] [--batch_size 16] [--data_folder <$data_root>] \\
        [--utterances hyps.jsonl] [--any_training_override value ...]

Utterances are decoded in batches of similar length (greedy CTC). ``--streaming`` encodes each
batch chunk by chunk, every utterance its own stream (the features of the whole file equal
those of ``FbankStream``, tested), which gives the offline outputs of the same context.

The last stdout line is one JSON object: ``wer``, ``cer`` (percent, SpeechBrain's
ErrorRateStats), ``context``, ``audio_seconds``, ``rtf`` (compute seconds per audio second over
the set, batched) for one context; with several, a list of those under ``results`` and the paths
of the written table (markdown + CSV) and plot of WER against latency.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import yaml
from speechbrain.utils.data_utils import batch_pad_right
from speechbrain.utils.metric_stats import ErrorRateStats

from dataio import dataset_from_manifest, load_audio
from inference import Recognizer, default_device, run_cli
from modules.context import describe_context


def decode_set(recognizer: Recognizer, dataset, context, streaming: bool,
               batch_size: int = 8) -> dict:
    """WER / CER (percent), audio duration and real-time factor of one pass over ``dataset``,
    and under ``utterances`` each utterance's hypothesis and its word and character edits."""
    wer, cer = ErrorRateStats(), ErrorRateStats(split_tokens=True)
    audio_seconds = compute_seconds = 0.0
    sample_rate = recognizer.hparams["sample_rate"]
    with dataset.output_keys_as(["id", "wav", "wrd", "duration"]):
        items = sorted(dataset, key=lambda item: float(item["duration"]))
    for first in range(0, len(items), batch_size):
        batch = items[first:first + batch_size]
        audio = [load_audio(item["wav"], sample_rate) for item in batch]
        wavs, wav_lens = batch_pad_right(audio)
        start = time.perf_counter()
        texts = recognizer.transcribe_batch(wavs, wav_lens, context, streaming)  # ends on the CPU
        compute_seconds += time.perf_counter() - start
        audio_seconds += sum(len(samples) for samples in audio) / sample_rate
        ids, words, targets = ([item["id"] for item in batch], [text.split() for text in texts],
                               [item["wrd"].split() for item in batch])
        wer.append(ids, words, targets)
        cer.append(ids, words, targets)
    frame = recognizer.encoder.frame_seconds
    utterances = [{"id": w["key"], "hyp": " ".join(w["hyp_tokens"]),
                   "word_edits": w["num_edits"], "words": w["num_ref_tokens"],
                   "char_edits": c["num_edits"], "chars": c["num_ref_tokens"]}
                  for w, c in zip(wer.scores, cer.scores)]
    return {"wer": wer.summarize("error_rate"), "cer": cer.summarize("error_rate"),
            "context": list(context), "context_seconds": describe_context(context, frame),
            "chunk_seconds": None if context[1] == -1 else round((context[1] + 1) * frame, 3),
            "streaming": streaming, "audio_seconds": round(audio_seconds, 2),
            "rtf": round(compute_seconds / audio_seconds, 4), "utterances": utterances}


def write_utterances(results: list[dict], path: Path) -> None:
    """One JSON line per (context, utterance): hypothesis and edits, for paired statistics."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as f:
        for result in results:
            for utterance in result["utterances"]:
                f.write(json.dumps({"context": result["context"],
                                    "streaming": result["streaming"], **utterance}) + "\n")
    partial.replace(path)


def write_table_and_plot(results: list[dict], stem: Path) -> dict:
    """Markdown + CSV table and a WER-vs-latency plot next to each other."""
    columns = ["context", "context_seconds", "chunk_seconds", "streaming", "wer", "cer", "rtf",
               "audio_seconds"]
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    lines = ["| context | frames and seconds | decoding | WER % | CER % | RTF |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['context']} | {r['context_seconds']} | "
              f"{'streaming' if r['streaming'] else 'offline'} | {r['wer']:.2f} | {r['cer']:.2f} | "
              f"{r['rtf']:.3f} |" for r in results]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    streamed = sorted((r for r in results if r["chunk_seconds"]), key=lambda r: r["chunk_seconds"])
    axis.plot([r["chunk_seconds"] for r in streamed], [r["wer"] for r in streamed], "o-",
              label="streaming contexts")
    for r in streamed:
        axis.annotate(str(r["context"]), (r["chunk_seconds"], r["wer"]), fontsize=8)
    for r in results:
        if not r["chunk_seconds"]:
            axis.axhline(r["wer"], linestyle="--", color="gray", label="offline [-1, -1]")
    axis.set_xlabel("chunk duration (algorithmic latency), s")
    axis.set_ylabel("WER, %")
    axis.legend()
    figure.tight_layout()
    figure.savefig(stem.with_suffix(".png"), dpi=120)
    return {"table_md": str(stem.with_suffix(".md")), "table_csv": str(stem.with_suffix(".csv")),
            "plot": str(stem.with_suffix(".png"))}


def training_overrides(args: list[str]) -> dict:
    """``--key value`` pairs (values in YAML) that the model was trained with, e.g. its sizes."""
    if len(args) % 2 or not all(k.startswith("--") for k in args[::2]):
        raise ValueError(f"expected --key value pairs of training overrides, got {args}")
    return {k[2:]: yaml.safe_load(v) for k, v in zip(args[::2], args[1::2])}


def streamable(recognizer: Recognizer, context) -> bool:
    try:
        recognizer.encoder.make_streaming_context(context)
    except ValueError:
        return False
    return True


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("hparams")
    parser.add_argument("--output_folder", required=True, help="the CTC run's output folder")
    parser.add_argument("--test_csv", required=True, help="SpeechBrain CSV or NeMo JSON manifest")
    parser.add_argument("--data_folder", help="replaces $data_root (default: the training one)")
    parser.add_argument("--context", action="append", default=None,
                        help="preset, 'L,R', or 'all' (every preset); repeat for several")
    parser.add_argument("--streaming", action="store_true", help="decode chunk by chunk")
    parser.add_argument("--device", default=default_device(), help="default: cuda, mps or cpu")
    parser.add_argument("--batch_size", type=int, default=8, help="utterances decoded at once")
    parser.add_argument("--utterances", type=Path,
                        help="also write each utterance's hypothesis and edits here (JSON lines)")
    args, rest = parser.parse_known_args(argv)
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    recognizer = Recognizer(args.hparams, args.output_folder, training_overrides(rest), args.device)
    specs = args.context or [recognizer.hparams["valid_context"]]
    if "all" in specs:
        specs = list(recognizer.hparams["context_presets"])
    contexts = [recognizer.context(spec) for spec in specs]
    data_folder = args.data_folder or recognizer.hparams["data_folder"]
    dataset = dataset_from_manifest(args.test_csv, data_folder, args.output_folder)
    results = []
    for context in contexts:
        # A context that cannot be streamed (offline; all-past attention) is decoded offline.
        streaming = args.streaming and streamable(recognizer, context)
        results.append(decode_set(recognizer, dataset, context, streaming, args.batch_size))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "utterances"}),
              file=sys.stderr)
    if args.utterances:
        write_utterances(results, args.utterances)
    for result in results:
        del result["utterances"]
    if len(results) == 1:
        return results[0]
    stem = Path(args.output_folder) / f"eval_{Path(args.test_csv).stem}"
    return {"results": results, **write_table_and_plot(results, stem)}


if __name__ == "__main__":
    run_cli(main)
