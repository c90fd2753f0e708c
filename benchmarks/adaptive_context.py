#!/usr/bin/env python3
"""What does switching context while a stream runs buy? Fixed presets against adaptive
policies on long streams with a noise schedule and a load schedule.

Streams: ``--streams`` long streams, each ``--minutes`` of test utterances of several voices
back to back (``--test_csv``, the benchmark's unseen voices), the middle third mixed with a
shipped noise (``--noise``) at ``--snr_db`` (clean -> noisy -> clean). Load: while a stream is
in the second half of its audio, ``--load_processes`` background processes run dense matrix
products (a bounded, reproducible load on this machine's cores).

Every configuration streams the same audio one chunk of audio at a time (pushed as fast as the
model goes; each chunk's compute is measured): every trained context as a fixed preset, and the
controller of ``modules/adaptive.py`` with each ``--policies`` set, calibrated (compute per
chunk of every context) on clean audio before the streams, as ``transcribe.py --mode adaptive``
does. Each stream goes through every configuration, in an order rotated from one stream to the
next (drift of the machine spreads over all of them). Reported per configuration: WER and CER
over all streams (SpeechBrain's ErrorRateStats, one long hypothesis per stream, references
normalized like evaluate.py), compute per second of audio (SNR estimation and controller
included), deadline misses (encoded chunks whose compute exceeded their duration; chunks are
not paced in real time, so a late chunk does not delay the next) overall and under load, the
share of the audio each context ran, and the number of switches.

Usage::

    python benchmarks/adaptive_context.py <CTC run folder> [--test_csv data/benchmark/test.csv] \\
        [--streams 3] [--minutes 3] [--noise pink] [--snr_db 0] [--load_processes 1] \\
        [--policies snr,load latency,snr,load] [--latency_budget_ms 400] [--out results/adaptive_context]

Writes ``table.md`` and ``result.json`` (with the command and commit) under ``--out``; the last
stdout line is the JSON.
"""
import argparse
import csv
import json
import multiprocessing
import random
import sys
import time
from pathlib import Path

import soundfile as sf
import torch
from speechbrain.utils.metric_stats import ErrorRateStats

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "recipes")]

from inference import Recognizer  # noqa: E402
from provenance import current_commit, code_dirty, script_command, write_json_atomic  # noqa: E402
from transcribe import benchmark as calibrate, make_controller  # noqa: E402


def read(path: str) -> torch.Tensor:
    return torch.from_numpy(sf.read(path, dtype="float32")[0])


def build_streams(test_csv: str, noise_file: str, count: int, minutes: float, snr_db: float,
                  seed: int) -> list[dict]:
    """``count`` streams of ``minutes`` of utterances (voices interleaved), the middle third
    mixed with ``noise_file`` at ``snr_db`` (speech energy of that third / noise energy)."""
    folder = Path(test_csv).parent
    with open(test_csv) as f:
        rows = list(csv.DictReader(f))
    random.Random(seed).shuffle(rows)
    noise, streams, index = read(noise_file), [], 0
    for _ in range(count):
        pieces, words, samples = [], [], 0
        while samples < minutes * 60 * 16000:
            row = rows[index % len(rows)]
            index += 1
            pieces.append(read(row["wav"].replace("$data_root", str(folder))))
            words.append(row["wrd"])
            samples += len(pieces[-1])
        audio = torch.cat(pieces)
        start, end = len(audio) // 3, 2 * len(audio) // 3
        segment = noise.repeat(-(-(end - start) // len(noise)))[:end - start]
        speech_energy = audio[start:end].pow(2).sum()
        scale = torch.sqrt(speech_energy / (segment.pow(2).sum() * 10 ** (snr_db / 10)))
        audio[start:end] += scale * segment
        streams.append({"audio": audio, "words": " ".join(words),
                        "noisy": (start / 16000, end / 16000)})
    return streams


def _busy(stop) -> None:
    """A background process's load: dense products on one core until ``stop`` is set."""
    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    while not stop.is_set():
        a = torch.tanh(a @ a)


class BackgroundLoad:
    """``processes`` busy processes, started and stopped on demand."""

    def __init__(self, processes: int):
        self.count, self.workers, self.stop = processes, [], None

    def start(self) -> None:
        if self.workers or not self.count:
            return
        self.stop = multiprocessing.Event()
        self.workers = [multiprocessing.Process(target=_busy, args=(self.stop,), daemon=True)
                        for _ in range(self.count)]
        for worker in self.workers:
            worker.start()
        time.sleep(0.2)  # running before the next chunk

    def end(self) -> None:
        if self.workers:
            self.stop.set()
            for worker in self.workers:
                worker.join()
            self.workers = []


def stream_once(recognizer: Recognizer, item: dict, stream, load: BackgroundLoad) -> dict:
    """Streams one long stream one chunk of audio at a time; the load runs in the second half
    of its audio. Deadline misses are counted per encoded chunk (``stream.stats``)."""
    hop = recognizer.hparams["compute_features"].hop_samples
    audio, start, half, before_load = item["audio"], 0, len(item["audio"]) // 2, None
    while start < len(audio):
        if start >= half and before_load is None:
            before_load = {c: dict(v) for c, v in stream.stats.items()}
            load.start()
        piece = stream.chunk * hop
        stream.push(audio[start:start + piece])
        start += piece
    load.end()
    text = stream.finish()
    loaded = {c: {k: v[k] - before_load.get(c, {}).get(k, 0) for k in ("chunks", "deadline_misses")}
              for c, v in stream.stats.items()}
    return {"text": text, "stats": stream.stats, "loaded": loaded,
            "switches": len(stream.switches)}


def summarize(name: str, runs: list[dict], streams: list[dict], normalize) -> dict:
    """WER / CER over the streams, compute per audio second, deadline misses (all, under
    load), the share of audio each context ran and the switches of one configuration."""
    wer, cer = ErrorRateStats(), ErrorRateStats(split_tokens=True)
    for number, (run, item) in enumerate(zip(runs, streams)):
        words, reference = normalize(run["text"]).split(), normalize(item["words"]).split()
        wer.append([f"stream{number}"], [words], [reference])
        cer.append([f"stream{number}"], [words], [reference])
    totals = {}
    for run in runs:
        for context, stats in run["stats"].items():
            entry = totals.setdefault(context, {"audio": 0.0, "compute": 0.0, "chunks": 0,
                                                "misses": 0, "loaded_chunks": 0,
                                                "loaded_misses": 0})
            entry["audio"] += stats["audio_seconds"]
            entry["compute"] += stats["compute_seconds"]
            entry["chunks"] += stats["chunks"]
            entry["misses"] += stats["deadline_misses"]
            entry["loaded_chunks"] += run["loaded"][context]["chunks"]
            entry["loaded_misses"] += run["loaded"][context]["deadline_misses"]
    audio = sum(e["audio"] for e in totals.values())
    total = {key: sum(e[key] for e in totals.values()) for key in next(iter(totals.values()))}
    return {"configuration": name, "wer": round(wer.summarize("error_rate"), 2),
            "cer": round(cer.summarize("error_rate"), 2),
            "compute_per_audio_second": round(total["compute"] / audio, 4),
            "deadline_miss_percent": round(100 * total["misses"] / total["chunks"], 2),
            "loaded_deadline_miss_percent": round(
                100 * total["loaded_misses"] / max(total["loaded_chunks"], 1), 2),
            "audio_share": {str(list(c)): round(e["audio"] / audio, 3) for c, e in totals.items()},
            "chunks": total["chunks"], "switches": sum(run["switches"] for run in runs)}


def table(rows: list[dict]) -> str:
    lines = ["| configuration | WER % | CER % | compute / audio s | deadline misses % | "
             "misses under load % | switches | audio share per context |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['configuration']} | {r['wer']} | {r['cer']} | {r['compute_per_audio_second']}"
              f" | {r['deadline_miss_percent']} | {r['loaded_deadline_miss_percent']} | "
              f"{r['switches']} | {', '.join(f'{c}: {v}' for c, v in r['audio_share'].items())} |"
              for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a CTC run folder trained under several contexts")
    parser.add_argument("--test_csv", default="data/benchmark/test.csv")
    parser.add_argument("--noise_folder", default="data/espeak_corpus/noise")
    parser.add_argument("--noise", default="pink")
    parser.add_argument("--snr_db", type=float, default=0.0)
    parser.add_argument("--streams", type=int, default=3)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--load_processes", type=int, default=1)
    parser.add_argument("--policies", nargs="+", default=["snr,load", "latency,snr,load"])
    parser.add_argument("--latency_budget_ms", type=float, default=400.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/adaptive_context")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recognizer = Recognizer(args.run)
    streams = build_streams(args.test_csv, str(Path(args.noise_folder) / f"{args.noise}.flac"),
                            args.streams, args.minutes, args.snr_db, args.seed)
    calibration = calibrate(recognizer, streams[0]["audio"][:20 * 16000])  # clean audio
    load = BackgroundLoad(args.load_processes)
    makers = {f"fixed {list(c)}": (lambda c=c: recognizer.stream(c))
              for c in recognizer.trained_contexts}
    for policies in args.policies:
        chosen = policies.split(",")
        budget = args.latency_budget_ms if "latency" in chosen else None

        def make_stream(chosen=chosen, budget=budget):
            controller = make_controller(recognizer, calibration, chosen, budget)
            return recognizer.stream(controller.first_context(), controller=controller)

        makers[f"adaptive {policies}"] = make_stream
    names, runs = list(makers), {name: [] for name in makers}
    for number, item in enumerate(streams):  # every stream through every configuration,
        for shift in range(len(names)):      # in an order rotated from stream to stream
            name = names[(shift + number) % len(names)]
            runs[name].append(stream_once(recognizer, item, makers[name](), load))
            print(f"stream {number}: {name} done", flush=True)
    rows = [summarize(name, runs[name], streams, recognizer.text_normalizer) for name in names]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table(rows) + "\n")
    result = {"rows": rows, "calibration": calibration, "audio_minutes": round(
        sum(len(s["audio"]) for s in streams) / 16000 / 60, 2),
        "command": script_command(__file__, sys.argv[1:]), "commit": current_commit(),
        "dirty": code_dirty(), "threads": args.threads}
    write_json_atomic(out / "result.json", result)
    print(table(rows))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
