#!/usr/bin/env python3
"""Synthesize an unlabeled speech set for SSL pretraining (``make corpus-unlabeled``): hours of
speech in far more voices than the shipped corpus, from text that is never in its labeled splits.

Text: sentences of the ``fortunes`` package (Debian; the neutral categories listed in
``FORTUNE_FILES``), minus every sentence that contains, or is contained in, a transcript of the
shipped corpus (whose Devil's Dictionary sentences some fortunes quote). Voices:

- ``espeak-ng``: 8 English accents x human-sounding voice variants (``ESPEAK_VARIANTS``: none of
  the 12 the shipped corpus draws its speakers from), each speaker with its own pitch and rate,
  jittered per utterance;
- ``flite``: its four 16 kHz voices at several speaking rates and pitches;
- ``festival`` (``text2wave``): the voices installed, at several speaking rates.

Deterministic for a given ``--seed``: the same files, byte for byte. Generated, not shipped.

Output::

    <out>/audio/<spk>/<id>.flac          16 kHz mono FLAC
    <out>/train.csv, <out>/valid.csv     ID,duration,wav,spk_id,wrd (wav = $data_root/...; valid:
                                         2 % of the speakers, for the SSL validation loss)

Needs ``apt-get install espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k
festvox-us-slt-hts fortunes`` (the Makefile target installs them).

Usage::

    python recipes/synthesize_unlabeled.py --out data/unlabeled_corpus [--hours 3.2]
"""
from __future__ import annotations

import argparse
import csv
import random
import re
import shutil
import subprocess
from multiprocessing import Pool
from pathlib import Path

import soundfile as sf
import torch
import torchaudio

from synthesize_corpus import ACCENTS, SAMPLE_RATE, VARIANTS

FORTUNES = Path("/usr/share/games/fortunes")
FORTUNE_FILES = ["art", "computers", "cookie", "definitions", "education", "food", "fortunes",
                 "goedel", "humorists", "kids", "law", "linuxcookie", "literature", "love",
                 "magic", "medicine", "miscellaneous", "news", "people", "pets", "platitudes",
                 "riddles", "science", "songs-poems", "sports", "startrek", "wisdom", "work",
                 "zippy"]
ESPEAK_VARIANTS = [  # espeak-ng's variants, without the shipped ones and sound effects
    "m8", "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6", "Alex", "Alicia", "Andrea",
    "Andy", "Annie", "Denis", "Diogo", "Gene", "Gene2", "Henrique", "Hugo", "Jacky", "Lee",
    "Marco", "Mario", "Michael", "Mike", "Nguyen", "adam", "anika", "announcer", "antonio",
    "aunty", "belinda", "benjamin", "boris", "caleb", "david", "ed", "edward", "edward2",
    "grandma", "grandpa", "gustave", "iven", "iven2", "iven3", "iven4", "john", "linda", "max",
    "michel", "miguel", "norbert", "pablo", "paul", "pedro", "quincy", "rob", "robert", "sandro",
    "shelby", "steph", "steph2", "steph3", "travis", "victor", "zac"]
FLITE_VOICES = ["kal16", "awb", "rms", "slt"]
FESTIVAL_VOICES = ["kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts"]
TOOLS = {"espeak-ng": "espeak-ng", "flite": "flite", "text2wave": "festival"}


def labeled_transcripts(corpus: Path) -> list[str]:
    """Every transcript of the shipped corpus's splits."""
    texts = []
    for split in ("train", "valid", "test"):
        with open(corpus / f"{split}.csv") as f:
            texts += [row["wrd"] for row in csv.DictReader(f)]
    return texts


def normalize(sentence: str) -> str:
    """Upper-case words of letters and apostrophes, as the shipped transcripts are written."""
    words = re.sub(r"[^A-Za-z' ]", " ", sentence).upper().split()
    return " ".join(w.strip("'") for w in words if w.strip("'"))


def select_sentences(entries: list[str], labeled: list[str], min_words: int = 4,
                     max_words: int = 20) -> list[tuple[str, str]]:
    """(text to speak, transcript) of prose sentences, none overlapping a labeled transcript.

    ``entries``: fortune cookies (attribution lines, starting with ``--``, are dropped).
    """
    labeled = [f" {text} " for text in labeled]
    pairs, seen = [], set()
    for entry in entries:
        lines = [line for line in entry.splitlines() if not line.strip().startswith("--")]
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(" ".join(lines).split())):
            if re.search(r"[0-9_\[\]()&*/=:;\"<>@#$%^{}|~`+\\]|--|[A-Z]{2,}", sentence):
                continue
            transcript = normalize(sentence)
            padded = f" {transcript} "
            if (not min_words <= len(transcript.split()) <= max_words or transcript in seen
                    or any(padded in text or text in padded for text in labeled)):
                continue
            seen.add(transcript)
            pairs.append((sentence, transcript))
    return pairs


def load_fortunes() -> list[str]:
    if not FORTUNES.is_dir():
        raise SystemExit(f"{FORTUNES} not found: run `apt-get install fortunes` (or `make "
                         "corpus-unlabeled`, which installs what is needed)")
    entries = []
    for name in FORTUNE_FILES:
        entries += (FORTUNES / name).read_text(encoding="utf-8", errors="replace").split("\n%\n")
    return entries


def make_voices(rng: random.Random, espeak_speakers: int) -> list[tuple]:
    """(synthesizer, voice, settings) per speaker: espeak-ng (accent, variant) pairs, then flite
    and festival voices at several rates (and pitches for flite)."""
    assert not set(ESPEAK_VARIANTS) & set(VARIANTS)  # no voice of the shipped corpus
    pairs = [f"{a}+{v}" for a in ACCENTS for v in ESPEAK_VARIANTS]
    rng.shuffle(pairs)
    voices = [("espeak-ng", pair, (rng.randint(25, 75), rng.randint(130, 200)))
              for pair in pairs[:espeak_speakers]]
    voices += [("flite", voice, (stretch, pitch)) for voice in FLITE_VOICES
               for stretch in (0.9, 1.0, 1.15) for pitch in (-15, 15)]
    voices += [("text2wave", voice, (stretch,)) for voice in FESTIVAL_VOICES
               for stretch in (0.9, 1.0, 1.15)]
    return voices


def command(synthesizer: str, voice: str, settings: tuple, text: str, wav: str,
            rng: random.Random) -> tuple[list[str], str | None]:
    """The command line that writes ``wav``, and its stdin (a file: festival cannot write a WAV
    header to a pipe)."""
    if synthesizer == "espeak-ng":
        pitch, rate = settings
        return (["espeak-ng", "-v", voice, "-p", str(pitch + rng.randint(-6, 6)), "-s",
                 str(rate + rng.randint(-15, 15)), "-w", wav, text], None)
    if synthesizer == "flite":
        stretch, pitch = settings
        mean = {"slt": 180, "kal16": 100, "awb": 110, "rms": 100}[voice] + pitch
        return (["flite", "-voice", voice, "--setf", f"duration_stretch={stretch}", "--setf",
                 f"int_f0_target_mean={mean + rng.randint(-5, 5)}", "-t", text, "-o", wav], None)
    (stretch,) = settings
    return (["text2wave", "-eval", f"(voice_{voice})", "-eval",
             f"(Parameter.set 'Duration_Stretch {stretch})", "-o", wav], text)


def synthesize(job: tuple) -> float:
    """Runs one command, writes a 16 kHz FLAC; returns its duration in seconds."""
    argv, stdin, wav, path = job
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(argv, input=stdin.encode() if stdin else None, check=True, capture_output=True)
    audio, rate = sf.read(wav, dtype="float32")
    Path(wav).unlink()
    if len(audio) == 0:
        raise RuntimeError(f"{' '.join(argv)}: no audio")
    if rate != SAMPLE_RATE:
        audio = torchaudio.functional.resample(torch.from_numpy(audio), rate, SAMPLE_RATE).numpy()
    sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16", format="FLAC")
    return len(audio) / SAMPLE_RATE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/unlabeled_corpus"))
    parser.add_argument("--labeled", type=Path, default=Path("data/espeak_corpus"),
                        help="the corpus whose transcripts the text must avoid")
    parser.add_argument("--hours", type=float, default=3.2)
    parser.add_argument("--espeak_speakers", type=int, default=160)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    missing = [package for tool, package in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"missing synthesizers: apt-get install {' '.join(missing)}")
    rng = random.Random(args.seed)
    sentences = select_sentences(load_fortunes(), labeled_transcripts(args.labeled))
    rng.shuffle(sentences)
    voices = make_voices(rng, args.espeak_speakers)
    torch.set_num_threads(1)
    rows, seconds = [], 0.0
    with Pool(args.workers) as pool:
        while seconds < args.hours * 3600:  # batches of utterances until the target is reached
            if not sentences:
                raise SystemExit(f"out of sentences after {seconds / 3600:.2f} h")
            batch = [sentences.pop() for _ in range(min(100, len(sentences)))]
            jobs = []
            for text, transcript in batch:
                index = len(rows)
                speaker = index % len(voices)
                synthesizer, voice, settings = voices[speaker]
                rel = f"audio/spk{speaker:03d}/u{index:05d}.flac"
                path = str(args.out / rel)
                argv, stdin = command(synthesizer, voice, settings, text, f"{path}.wav", rng)
                jobs.append((argv, stdin, f"{path}.wav", path))
                rows.append([f"u{index:05d}", None, f"$data_root/{rel}", f"spk{speaker:03d}",
                             transcript])
            for row, duration in zip(rows[-len(jobs):], pool.map(synthesize, jobs)):
                row[1] = f"{duration:.3f}"
                seconds += duration
            print(f"{len(rows)} utterances, {seconds / 3600:.2f} h", flush=True)
    valid_speakers = {f"spk{s:03d}" for s in range(0, len(voices), 50)}  # 2 % of the speakers
    for split, keep in (("train", False), ("valid", True)):
        with open(args.out / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["ID", "duration", "wav", "spk_id", "wrd"])
            writer.writerows(r for r in rows if (r[3] in valid_speakers) == keep)
    print(f"{len(voices)} speakers, {len(rows)} utterances, {seconds / 3600:.2f} h in {args.out}")


if __name__ == "__main__":
    main()
