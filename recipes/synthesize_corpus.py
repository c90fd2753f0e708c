#!/usr/bin/env python3
"""Synthesize the small English speech corpus that ships with the repository.

Text: sentences of Ambrose Bierce's *The Devil's Dictionary* (1911, public domain), as
provided by Debian's ``dict-devil`` package. Speech: ``espeak-ng`` with several accents,
voice variants, pitches and speaking rates; one speaker = one (accent, variant, pitch, rate)
setting. Speakers are disjoint across train / valid / test.

Output (deterministic for a given ``--seed``)::

    <out>/audio/<split>/<spk>/<id>.flac   16 kHz mono FLAC
    <out>/{train,valid,test}.csv          ID,duration,wav,spk_id,wrd  (wav = $data_root/...)
    <out>/noise/*.flac, <out>/noise.csv   noise set for the denoising option (AddNoise's CSV)

Needs ``apt-get install espeak-ng dict-devil`` (only to regenerate; the result is committed).

Usage::

    python recipes/synthesize_corpus.py --out data/espeak_corpus
"""
import argparse
import csv
import gzip
import io
import random
import re
import subprocess
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

SAMPLE_RATE = 16000
TEXT_SOURCE = Path("/usr/share/dictd/devil.dict.dz")
ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp",
           "en-gb-x-gbcwmd", "en-029", "en-us-nyc"]
VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5"]
SPLITS = {"train": (20, 8), "valid": (2, 10), "test": (2, 10)}  # (speakers, utts per speaker)


def load_sentences(min_words: int = 4, max_words: int = 14) -> list[tuple[str, str]]:
    """(text to speak, normalized transcript) pairs from the dictionary's prose."""
    if not TEXT_SOURCE.exists():
        raise SystemExit(f"{TEXT_SOURCE} not found: run `apt-get install dict-devil` first.")
    text = gzip.open(TEXT_SOURCE, "rt", encoding="latin-1").read()
    text = text.split("PREFACE", 1)[1]
    paragraphs = []
    for para in re.split(r"\n\s*\n", text):
        if para.startswith("    "):  # indented verse and quotations: skip
            continue
        para = re.sub(r"^[A-Z][A-Z' -]+, [a-z.]+\s+", "", para.strip())  # "ABASEMENT, n."
        paragraphs.append(" ".join(para.split()))
    pairs, seen = [], set()
    for sentence in re.split(r"(?<=[.!?])\s+", " ".join(paragraphs)):
        if re.search(r"[0-9_\[\]()&*/=:;\"]|--|[A-Z]{2,}", sentence):
            continue
        words = re.sub(r"[^A-Za-z' ]", " ", sentence).upper().split()
        words = [w.strip("'") for w in words if w.strip("'")]
        transcript = " ".join(words)
        if min_words <= len(words) <= max_words and transcript not in seen:
            seen.add(transcript)
            pairs.append((sentence, transcript))
    return pairs


def speak(args: tuple) -> tuple[str, float]:
    """Run espeak-ng and write a 16 kHz FLAC; returns (path, duration in seconds)."""
    text, voice, pitch, rate, path = args
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(rate), "--stdout", text],
        check=True, capture_output=True).stdout
    audio, sr = sf.read(io.BytesIO(wav), dtype="float32")
    audio = torchaudio.functional.resample(torch.from_numpy(audio), sr, SAMPLE_RATE).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16", format="FLAC")
    return path, len(audio) / SAMPLE_RATE


def make_speakers(rng: random.Random, count: int) -> list[tuple[str, int, int]]:
    """(espeak voice, base pitch, base rate) per speaker, all distinct."""
    combos = [(a, v) for a in ACCENTS for v in VARIANTS]
    rng.shuffle(combos)
    return [(f"{a}+{v}", rng.randint(30, 70), rng.randint(140, 190)) for a, v in combos[:count]]


def synthesize_speech(out: Path, rng: random.Random, workers: int) -> None:
    sentences = load_sentences()
    rng.shuffle(sentences)
    speakers = make_speakers(rng, sum(n for n, _ in SPLITS.values()))
    jobs, rows = [], {split: [] for split in SPLITS}
    for split, (num_speakers, per_speaker) in SPLITS.items():
        for _ in range(num_speakers):
            spk_index = len({r[3] for rs in rows.values() for r in rs})
            voice, pitch, rate = speakers[spk_index]
            spk_id = f"spk{spk_index:02d}"
            for u in range(per_speaker):
                text, transcript = sentences.pop()
                utt_id = f"{spk_id}-{u:03d}"
                rel = f"audio/{split}/{spk_id}/{utt_id}.flac"
                jobs.append((text, voice, pitch + rng.randint(-6, 6),
                             rate + rng.randint(-20, 20), str(out / rel)))
                rows[split].append([utt_id, None, f"$data_root/{rel}", spk_id, transcript])
    with Pool(workers) as pool:
        durations = dict(pool.map(speak, jobs))
    for split, split_rows in rows.items():
        with open(out / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["ID", "duration", "wav", "spk_id", "wrd"])
            for row in split_rows:
                row[1] = f"{durations[str(out / row[2].replace('$data_root/', ''))]:.3f}"
                writer.writerow(row)
        total = sum(float(r[1]) for r in split_rows)
        print(f"{split}: {len(split_rows)} utterances, {total / 60:.1f} min")


def synthesize_noise(out: Path, seed: int, seconds: float = 3.0) -> None:
    """White, pink, brown, hum and babble noise, each `seconds` long, peak-normalized."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.maximum(np.fft.rfftfreq(n, 1 / SAMPLE_RATE), 1.0)
    t = np.arange(n) / SAMPLE_RATE
    noises = {
        "white": rng.standard_normal(n),
        "pink": np.fft.irfft(spectrum / np.sqrt(freqs), n),
        "brown": np.fft.irfft(spectrum / freqs, n),
        "hum": sum(np.sin(2 * np.pi * 50 * k * t) / k for k in range(1, 8))
        + 0.1 * rng.standard_normal(n),
    }
    babble = np.zeros(n)
    voices = ["en-us+m2", "en-gb+f3", "en-029+m5", "en-gb-scotland+f1", "en-us-nyc+m6"]
    texts = ["The committee debated the matter until evening without any result.",
             "Several travellers arrived at the inn and asked for supper and rooms.",
             "She read the letter twice and then put it away in the drawer.",
             "Prices in the market rose sharply after the harvest had failed.",
             "A long procession wound slowly through the narrow streets of the town."]
    for voice, text in zip(voices, texts):
        tmp = out / "noise" / "_tmp.flac"
        speak((text, voice, 50, 170, str(tmp)))
        audio, _ = sf.read(tmp)
        tmp.unlink()
        babble[: min(n, len(audio))] += audio[:n]
    noises["babble"] = babble
    rows = []
    for name, audio in noises.items():
        audio = 0.5 * audio / np.abs(audio).max()
        rel = f"noise/{name}.flac"
        sf.write(out / rel, audio.astype(np.float32), SAMPLE_RATE, subtype="PCM_16", format="FLAC")
        rows.append([name, f"{seconds:.3f}", f"$data_root/{rel}", "flac", ""])
    with open(out / "noise.csv", "w", newline="") as f:
        csv.writer(f).writerows([["ID", "duration", "wav", "wav_format", "wav_opts"], *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/espeak_corpus"))
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    (args.out / "noise").mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    synthesize_speech(args.out, random.Random(args.seed), args.workers)
    synthesize_noise(args.out, args.seed)


if __name__ == "__main__":
    main()
