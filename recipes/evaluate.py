#!/usr/bin/env python3
"""Decodes a test set with a trained CTC or S2S model at one or several contexts (latencies).

Usage::

    python recipes/evaluate.py <run folder> --test_csv data/espeak_corpus/test.csv \\
        [--context medium] [--context low ... | --context all] [--streaming] [--device cuda] \\
        [--decoding ctc_greedy|ctc_prefix_beam|attention_rescoring|attention] \\
        [--beam_size 10] [--ctc_weight 0.4] [--lm <LM run> --lm_weight 0.6] \\
        [--latency_utterances 24] [--batch_size 16] [--data_folder <$data_root>] \\
        [--output_folder <folder>]

``<run folder>`` is the ``--output_folder`` of a ``recipes/train.py`` CTC or S2S run (or its
``hyperparams.yaml``); a copy of it works from any directory. Utterances are encoded in batches
of similar length. ``--streaming`` encodes each batch chunk by chunk, every utterance its own
stream, which gives the offline outputs of the same context. ``--decoding`` (default: greedy
CTC; an S2S run's own ``decoding``): ``ctc_prefix_beam`` and ``attention_rescoring`` (two-pass)
stream, ``attention`` (joint CTC / attention beam search) is offline; ``--lm`` fuses an LM run
(``hparams/LM/transformer.yaml`` or the n-gram ``hparams/LM/ngram.yaml``) trained with the
model's tokenizer, or a word n-gram (``hparams/LM/word_ngram.yaml``) whose words are the only
ones the search spells.

Latency (``--latency_utterances`` N > 0, on N utterances spread over the durations, through the
streaming API, audio pushed one chunk at a time, real-time arrival simulated from each push's
measured compute, a backlog included): ``first_partial_ms``, from the stream's start to the
first non-empty partial; ``final_latency_ms``, from the arrival of the last audio to the final
result (the backlog, the last chunk, the second pass: ``second_pass_ms``); medians; and
``deadline_miss_fraction``, the chunks whose compute outlasted their audio. An offline context or
``attention`` decoding has no partial results: its final latency is the whole utterance's
compute.

References and hypotheses are scored as the tokenizer was trained (its letter case, single
spaces); characters the tokenizer never saw are reported once. Every audio file is checked
before decoding, and all the bad ones are listed.

Written to ``--output_folder`` (default: the run folder), named after the test set and the
options, e.g. ``eval_test_all_streaming``: ``.md`` and ``.csv`` tables, a ``.png`` plot of CER
and WER against latency, and ``.jsonl`` hypotheses (one line per context and utterance: id,
ref, hyp, cer, wer and the edits). The last stdout line is one JSON object: ``wer``, ``cer``
(percent, SpeechBrain's ErrorRateStats), ``context``, ``audio_seconds``, ``rtf`` for one
context, or a list of those under ``results`` for several, and the paths of the files.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import quiet  # noqa: F401  (before SpeechBrain: drops its torchvision line)
import speechbrain as sb
from speechbrain.utils.data_utils import batch_pad_right
from speechbrain.utils.metric_stats import ErrorRateStats

from cli import RecipeParser, note, run_cli, warn
from dataio import check_manifest, load_audio, nemo_manifest_to_csv
from eval_outputs import output_stem, write_outputs
from inference import Recognizer, default_device
from modules.context import describe_context
from modules.decoding import DECODINGS, STREAMING_DECODINGS, DecodingOptions
from provenance import hparams_data
from run_folder import find_run_folder, is_run_folder, run_hparams_text

REQUIRED_COLUMNS = ("ID", "wav", "wrd")
QUOTES = "'\""  # around the text of a KeyError


def read_manifest(path: str | Path, data_folder: str | Path) -> list[dict]:
    """The utterances of a SpeechBrain CSV or NeMo JSON manifest (``$data_root`` replaced),
    as ``{"id", "wav", "wrd", "duration"}``; a malformed manifest: one line naming the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--test_csv {path}: no such file; see README.md for data "
                                "preparation")
    with tempfile.TemporaryDirectory() as work:
        if path.suffix in (".json", ".jsonl"):
            csv_path = nemo_manifest_to_csv(path, Path(work) / f"{path.stem}.csv")
        else:
            csv_path = path
            check_columns(path, data_folder)
        try:
            rows = sb.dataio.dataio.load_data_csv(str(csv_path), {"data_root": str(data_folder)})
        except (KeyError, ValueError) as error:
            raise ValueError(f"{path}: {str(error).strip(QUOTES)}") from None
    if not rows:
        raise ValueError(f"{path} has a header but no utterances; add one row per utterance")
    untranscribed = [key for key, row in rows.items() if not row["wrd"].strip()]
    if untranscribed:
        raise ValueError(f"{path}: {len(untranscribed)} utterance(s) without a reference "
                         f"transcript (wrd), e.g. {untranscribed[0]}; fill them in or remove them")
    return [{"id": key, "wav": row["wav"], "wrd": row["wrd"],
             "duration": float(row.get("duration") or 0.0)} for key, row in rows.items()]


def check_columns(path: Path, data_folder: str | Path) -> None:
    """A CSV with the columns the evaluation reads (``ID``, ``wav``, ``wrd``), and a data
    folder for its ``$data_root`` paths."""
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), None)
        uses_data_root = "$data_root" in f.read()
    if uses_data_root and not Path(data_folder).is_dir():
        raise ValueError(f"{path}: its paths start with $data_root, and the data folder "
                         f"{data_folder} does not exist here; pass --data_folder <the folder "
                         "holding the audio>")
    expected = "ID,duration,wav,spk_id,wrd"
    if not header:
        raise ValueError(f"{path} is empty; a test CSV has the header {expected} and one row "
                         "per utterance")
    missing = [column for column in REQUIRED_COLUMNS if column not in header]
    if missing:
        raise ValueError(f"{path}: no {' or '.join(missing)} column (it has {','.join(header)}); "
                         f"a test CSV has the header {expected}, wrd being the reference text")


def check_audio(items: list[dict], name: str, sample_rate: int, min_samples: int) -> None:
    """Every file readable, at the model's rate, mono and long enough; all bad ones listed."""
    rows = {item["id"]: {"wav": item["wav"]} for item in items}
    check_manifest(sb.dataio.dataset.DynamicItemDataset(rows), name, sample_rate, min_samples)


def report_references(recognizer: Recognizer, items: list[dict], name: str) -> None:
    """Says once how references are normalized, and which characters the model cannot output."""
    normalizer = recognizer.text_normalizer
    if normalizer.case and any(normalizer(item["wrd"]) != " ".join(item["wrd"].split())
                               for item in items):
        note(f"{name}: references scored in {normalizer.case}case, as the tokenizer was trained")
    unknown = normalizer.unknown_characters(item["wrd"] for item in items)
    if unknown:
        warn(f"{name}: the references hold {len(unknown)} character(s) the tokenizer never saw "
             f"({' '.join(map(repr, unknown))}); the model cannot output them, so each counts "
             "as an error")


def decode_set(recognizer: Recognizer, items: list[dict], context, streaming: bool,
               batch_size: int = 8) -> dict:
    """WER / CER (percent), audio duration and real-time factor of one pass over ``items``,
    and under ``utterances`` each utterance's reference, hypothesis and edits."""
    wer, cer = ErrorRateStats(), ErrorRateStats(split_tokens=True)
    normalize = recognizer.text_normalizer
    audio_seconds = compute_seconds = 0.0
    sample_rate = recognizer.hparams["sample_rate"]
    refs = {}
    for first in range(0, len(items), batch_size):
        batch = items[first:first + batch_size]
        audio = [load_audio(item["wav"], sample_rate) for item in batch]
        wavs, wav_lens = batch_pad_right(audio)
        start = time.perf_counter()
        texts = recognizer.transcribe_batch(wavs, wav_lens, context, streaming)  # ends on the CPU
        compute_seconds += time.perf_counter() - start
        audio_seconds += sum(len(samples) for samples in audio) / sample_rate
        ids = [item["id"] for item in batch]
        refs.update((item["id"], normalize(item["wrd"])) for item in batch)
        words = [normalize(text).split() for text in texts]
        targets = [refs[key].split() for key in ids]
        wer.append(ids, words, targets)
        cer.append(ids, words, targets)
    frame = recognizer.encoder.frame_seconds
    return {"wer": wer.summarize("error_rate"), "cer": cer.summarize("error_rate"),
            "context": list(context), "context_seconds": describe_context(context, frame),
            "chunk_seconds": None if context[1] == -1 else round((context[1] + 1) * frame, 3),
            "streaming": streaming, "decoding": recognizer.decoding.decoding,
            "audio_seconds": round(audio_seconds, 2),
            "rtf": round(compute_seconds / audio_seconds, 4),
            "utterances": [utterance_record(w, c, refs[w["key"]])
                           for w, c in zip(wer.scores, cer.scores)]}


def utterance_record(word: dict, char: dict, ref: str) -> dict:
    """One utterance's scores (SpeechBrain's per-utterance details, word and character)."""
    return {"id": word["key"], "ref": ref, "hyp": " ".join(word["hyp_tokens"]),
            "cer": round(100 * char["num_edits"] / max(char["num_ref_tokens"], 1), 2),
            "wer": round(100 * word["num_edits"] / max(word["num_ref_tokens"], 1), 2),
            "word_edits": word["num_edits"], "words": word["num_ref_tokens"],
            "char_edits": char["num_edits"], "chars": char["num_ref_tokens"]}


def measure_latency(recognizer: Recognizer, items: list[dict], context, count: int) -> dict:
    """Median first-partial and final-result latencies (ms) of ``count`` utterances spread over
    ``items`` (sorted by duration), each streamed with the audio pushed one chunk at a time (see
    the module docstring), and the fraction of chunks whose compute outlasted their audio;
    offline (an unstreamable context, ``attention``): the compute of the whole utterance, as
    its final latency.

    Real-time arrival is simulated from the measured compute of every push: a chunk starts when
    its audio has arrived and the previous one is done, so a backlog of slow chunks delays the
    partials and the final result as it would live."""
    picked = [items[round(i * (len(items) - 1) / max(count - 1, 1))]
              for i in range(min(count, len(items)))]
    sample_rate = recognizer.hparams["sample_rate"]
    online = (recognizer.decoding.decoding in STREAMING_DECODINGS
              and streamable(recognizer, context))
    first, final, second, misses, chunks = [], [], [], 0, 0
    for item in picked:
        samples = load_audio(item["wav"], sample_rate)
        if not online:
            start = time.perf_counter()
            recognizer.transcribe(samples, context)
            final.append(time.perf_counter() - start)
            continue
        stream = recognizer.stream(context)
        piece = stream.chunk * sample_rate // 100  # one chunk's samples (10 ms feature hop)
        ready, partial_at = 0.0, None  # when the stream is done with what arrived so far
        for begin in range(0, len(samples), piece):
            arrived = min(begin + piece, len(samples)) / sample_rate
            start = time.perf_counter()
            text = stream.push(samples[begin:begin + piece])
            if begin + piece >= len(samples):
                stream.finish()
            compute = time.perf_counter() - start
            misses += compute > piece / sample_rate
            chunks += 1
            ready = max(ready, arrived) + compute
            if partial_at is None and text:
                partial_at = ready
        final.append(ready - len(samples) / sample_rate)
        second.append(stream.second_pass_seconds or 0.0)
        if partial_at is not None:
            first.append(partial_at)

    def median_ms(values):
        return round(1000 * statistics.median(values), 1) if values else None

    return {"first_partial_ms": median_ms(first), "final_latency_ms": median_ms(final),
            "second_pass_ms": median_ms(second) if online else None,
            "deadline_miss_fraction": round(misses / chunks, 4) if chunks else None,
            "latency_utterances": len(picked)}


def streamable(recognizer: Recognizer, context) -> bool:
    try:
        recognizer.encoder.make_streaming_context(context)
    except ValueError:
        return False
    return True


def check_output_folder(run: Path, output_folder: str | None) -> Path:
    """Where outputs go: ``output_folder``, default the run; another run there is refused (an
    older form gave ``<run>/hyperparams.yaml --output_folder <run>``, the same run twice)."""
    if output_folder is None:
        return run
    folder = Path(output_folder)
    if is_run_folder(folder) and folder.resolve() != run:
        raise ValueError(f"--output_folder {output_folder} is another trained run than {run}: "
                         f"give it as the run to decode with its model, or choose another "
                         "--output_folder for the outputs")
    return folder


def parse_arguments(argv: list[str]):
    parser = RecipeParser(prog="evaluate.py", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="the CTC run folder (or its hyperparams.yaml)")
    parser.add_argument("--test_csv", required=True, help="SpeechBrain CSV or NeMo JSON manifest")
    parser.add_argument("--data_folder", help="replaces $data_root (default: the training one)")
    parser.add_argument("--context", action="append", default=None,
                        help="preset, 'L,R', or 'all' (every preset); repeat for several "
                             "(default: the run's valid_context)")
    parser.add_argument("--streaming", action="store_true", help="decode chunk by chunk")
    add_decoding_arguments(parser)
    parser.add_argument("--latency_utterances", type=int, default=0,
                        help="measure first-partial and final-result latency on this many "
                             "utterances per context (0: not measured)")
    parser.add_argument("--device", default=default_device(), help="default: cuda, mps or cpu")
    parser.add_argument("--batch_size", type=int, default=8, help="utterances decoded at once")
    parser.add_argument("--output_folder", help="where the tables, plot and hypotheses go "
                                                "(default: the run folder)")
    parser.add_argument("--utterances", type=Path,
                        help="the per-utterance hypotheses file (default: next to the tables)")
    args = parser.parse_strict(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    check_decoding_arguments(parser, args)
    if args.latency_utterances < 0:
        parser.error(f"--latency_utterances must be >= 0, got {args.latency_utterances}")
    return args


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """``--decoding``, ``--beam_size``, ``--ctc_weight``, ``--lm``, ``--lm_weight`` (also
    transcribe.py's)."""
    parser.add_argument("--decoding", choices=DECODINGS, default=None,
                        help="default: greedy CTC (an S2S run: its own decoding)")
    parser.add_argument("--beam_size", type=int, default=None,
                        help="CTC prefix beam / attention beam (default: the run's, else 10)")
    parser.add_argument("--ctc_weight", type=float, default=None,
                        help="CTC weight of rescoring and attention decoding (default: the "
                             "run's ctc_weight_decode, else 0.4)")
    parser.add_argument("--lm", help="an LM run folder: hparams/LM/transformer.yaml or "
                                     "ngram.yaml (trained with this model's tokenizer), or "
                                     "word_ngram.yaml (a word LM: only its words are spelled)")
    parser.add_argument("--lm_weight", type=float, default=None,
                        help="LM weight (default 0.6 with --lm)")
    parser.add_argument("--length_bonus", type=float, default=0.0,
                        help="added per token by the CTC prefix beam and rescoring (default 0)")


def check_decoding_arguments(parser: argparse.ArgumentParser, args) -> None:
    if args.lm_weight is not None and args.lm is None and args.lm_weight > 0:
        parser.error("--lm_weight needs --lm <LM run folder>")
    if args.beam_size is not None and args.beam_size < 1:
        parser.error(f"--beam_size must be >= 1, got {args.beam_size}")


def decoding_options(args, run: Path) -> DecodingOptions:
    """The command line's decoding, its defaults from the run's hparams (S2S: ``decoding``,
    ``beam_size``, ``ctc_weight_decode``)."""
    saved = {} if not (run / "hyperparams.yaml").is_file() else hparams_data(
        run_hparams_text(run))
    s2s = saved.get("task") == "s2s"
    decoding = args.decoding or (saved.get("decoding") if s2s else "ctc_greedy")
    return DecodingOptions(
        decoding=decoding,
        beam_size=args.beam_size or (saved.get("beam_size") if s2s else None) or 10,
        ctc_weight=args.ctc_weight if args.ctc_weight is not None else (
            saved.get("ctc_weight_decode", 0.4) if s2s else 0.4),
        lm_weight=args.lm_weight if args.lm_weight is not None else (0.6 if args.lm else 0.0),
        length_bonus=args.length_bonus)


def main(argv: list[str]) -> dict:
    args = parse_arguments(argv)
    run = find_run_folder(args.run, args.output_folder)
    output_folder = check_output_folder(run, args.output_folder)
    recognizer = Recognizer(run, args.device, decoding_options(args, run), args.lm)
    specs = args.context or [recognizer.hparams["valid_context"]]
    if "all" in specs:
        specs = list(recognizer.hparams["context_presets"])
    contexts = [recognizer.context(spec) for spec in specs]
    items = read_manifest(args.test_csv, args.data_folder or recognizer.hparams["data_folder"])
    check_audio(items, args.test_csv, recognizer.hparams["sample_rate"], recognizer.min_samples)
    report_references(recognizer, items, args.test_csv)
    items.sort(key=lambda item: item["duration"])
    results = []
    for context in contexts:
        # A context that cannot be streamed (offline; all-past attention) is decoded offline.
        streaming = args.streaming and streamable(recognizer, context)
        results.append(decode_set(recognizer, items, context, streaming, args.batch_size))
        if args.latency_utterances:
            results[-1].update(measure_latency(recognizer, items, context,
                                               args.latency_utterances))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "utterances"}),
              file=sys.stderr)
    stem = output_stem(output_folder, args.test_csv, "all" if args.context and "all" in
                       args.context else contexts, recognizer.hparams["context_presets"],
                       args.streaming, recognizer.decoding.decoding + ("+lm" if args.lm else ""))
    title = f"{run.name}: {Path(args.test_csv).name}, " \
            f"{'streaming' if args.streaming else 'offline'} encoding, " \
            f"{recognizer.decoding.decoding}{' + LM' if args.lm else ''}"
    paths = write_outputs(results, stem, title, args.utterances)
    for result in results:
        del result["utterances"]
    options = recognizer.decoding  # what made the figures (the files' names do not hold it)
    paths["decoding_options"] = {"beam_size": options.beam_size, "ctc_weight": options.ctc_weight,
                                 "lm": str(Path(args.lm).resolve()) if args.lm else None,
                                 "lm_weight": options.lm_weight,
                                 "length_bonus": options.length_bonus}
    if len(results) == 1:
        return {**results[0], **paths}
    return {"results": results, **paths}


if __name__ == "__main__":
    run_cli(main)
