#!/usr/bin/env python3
"""Phoneme transcripts of a synthetic-corpus manifest: ``wrd`` becomes espeak-ng's IPA.

A diagnostic for the benchmark ("Why so little?", docs/benchmark.md): a CTC model
fine-tuned on phonemes is scored on how it hears, a model on letters also on how English is
spelled. Each utterance is phonemized in the accent of the espeak-ng voice that spoke it (so the
labels are what espeak-ng said), flite and festival utterances as ``en-us`` (espeak-ng's
phonemes, not theirs: an approximation). Stress marks are dropped (a stress error is not a
phone error) and every length mark is ``ː`` (some accents write ``:``). Word boundaries are
espeak-ng's: it joins some function words (``ɪnðə``), so a phoneme "WER" means little. The
transcript is lowercased first (espeak-ng spells some upper-case words letter by letter); the
IPA is NFKC normalized, as SentencePiece normalizes what it trains on (``ʲ`` -> ``j``), so the
references hold only characters the tokenizer has. The error rate over these characters is an
IPA-symbol error rate (diphthongs and affricates count as two symbols).

Usage::

    python recipes/phonemize_manifest.py data/benchmark/train_10min.csv data/benchmark/dev.csv \\
        --out_folder results/phonemes

writes ``results/phonemes/{train_10min,dev}.csv``: the same rows with phoneme ``wrd``. Fine-tune
on them with ``--train_csv``, ``--valid_csv``, ``--test_csv``, ``--tokenizer_csv`` and the
``--vocab_size`` printed (distinct phoneme characters + space + unknown).
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import unicodedata
from multiprocessing import Pool
from pathlib import Path

DROPPED = {ord("ˈ"): None, ord("ˌ"): None}  # stress marks
LENGTH = {ord(":"): "ː"}  # en-gb-scotland writes the length mark in ASCII
DEFAULT_LANGUAGE = "en-us"  # flite's and festival's voices are American English


def espeak_language(voice: str) -> str:
    """The espeak-ng language of a manifest's ``voice`` column (``espeak-ng:en-029+Marco:p36:
    r139|espeak:Marco`` -> ``en-029``); other synthesizers -> ``en-us``."""
    synthesizer, _, rest = voice.partition("|")[0].partition(":")
    if synthesizer != "espeak-ng" or not rest:
        return DEFAULT_LANGUAGE
    return rest.split(":")[0].split("+")[0]


def phonemize(job: tuple[str, str]) -> str:
    """``(text, language)`` -> IPA words separated by single spaces, without stress marks."""
    text, language = job
    output = subprocess.run(["espeak-ng", "-q", "--ipa", "-v", language, text.lower()],
                            capture_output=True, text=True, check=True).stdout
    output = unicodedata.normalize("NFKC", output.translate({**DROPPED, **LENGTH}))
    return " ".join(output.split())


def phonemize_manifest(source: Path, target: Path, processes: int = 2) -> set[str]:
    """Writes ``source`` with phoneme ``wrd`` to ``target``; returns its phoneme characters."""
    with source.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "wrd" not in rows[0] or "voice" not in rows[0]:
        raise SystemExit(f"error: {source}: needs rows with `wrd` and `voice` columns "
                         "(a manifest of recipes/synthesize_benchmark.py)")
    jobs = [(row["wrd"], espeak_language(row["voice"])) for row in rows]
    with Pool(processes) as pool:
        phonemes = pool.map(phonemize, jobs, chunksize=16)
    empty = [row["ID"] for row, text in zip(rows, phonemes) if not text]
    if empty:
        raise SystemExit(f"error: {source}: espeak-ng gave no phonemes for {empty[:5]}")
    for row, text in zip(rows, phonemes):
        row["wrd"] = text
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return set("".join(phonemes)) - {" "}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("manifests", nargs="+", type=Path)
    parser.add_argument("--out_folder", type=Path, required=True)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    if shutil.which("espeak-ng") is None:
        raise SystemExit("error: espeak-ng not found: apt-get install espeak-ng")
    characters: set[str] = set()
    for manifest in args.manifests:
        if not manifest.is_file():
            raise SystemExit(f"error: {manifest} not found")
        characters |= phonemize_manifest(manifest, args.out_folder / manifest.name,
                                         args.processes)
    print(json.dumps({"out_folder": str(args.out_folder), "characters": "".join(sorted(
        characters)), "vocab_size": len(characters) + 2}, ensure_ascii=False))


if __name__ == "__main__":
    main()
