#!/usr/bin/env python3
"""Language-model text for the benchmark beyond its transcripts (``make lm-text``): the corpus's
unspoken sentences plus the English fortune files and the Dhammapada translation that Debian
packages install, none overlapping a dev or test sentence.

The benchmark's word LM otherwise counts the transcripts of train and unlabeled speech alone
(7,974 sentences, 10,771 words, 7.7 % of the dev words outside them). This script adds, as one
``ID,wrd`` manifest for ``hparams/LM/*.yaml --more_text_csvs``:

- the sentences of ``lm_text.txt`` that no manifest speaks (the corpus generator's leftovers);
- sentences of every English fortune file under ``/usr/share/games/fortunes`` that the corpus
  did not draw from (``fortunes``, ``fortune-anarchism``, ``fortunes-bofh-excuses``);
- the English Dhammapada of ``display-dhammapada``.

Sentences are split and normalized like the corpus's own (``synthesize_benchmark.py``), but
only those with digits or markup are dropped (normalizing would garble them); quotes, colons and
acronyms, which the corpus avoids for the synthesizers' sake, are kept. A sentence of 2-40 words
is kept unless it contains, or is contained in, a dev or test transcript (as whole words), or
repeats a transcript or another kept sentence. ``partition_errors`` then checks the result against
dev and test once more, and the script refuses to write a text that fails it.

Needs ``apt-get install fortunes fortune-anarchism fortunes-bofh-excuses display-dhammapada``
(the Makefile target installs them).

Usage::

    python recipes/prepare_lm_text.py --corpus data/benchmark [--out data/benchmark/lm_extra.csv]
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthesize_benchmark import (FORTUNE_FILES, FORTUNES, normalize, partition_errors,  # noqa: E402
                                  word_spans)

DHAMMAPADA = Path("/usr/share/display-dhammapada/dhammapada-english-transl.txt")
NOT_PROSE = ("art", "ascii-art")  # pictures drawn in characters
NOT_ENGLISH = ("mario.",)          # fortunes-mario: Portuguese
GARBLED = re.compile(r"[0-9_\[\]&*/=<>@#$%^{}|~`+\\]")  # digits and markup
MANIFESTS = ("unlabeled_train", "unlabeled_valid", "train", "dev", "test")


def read_manifest(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"{path} not found: run `make corpus-labeled` first")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def extra_entries() -> list[str]:
    """Fortune cookies of the English files the corpus did not draw from, and the Dhammapada's
    verses (blank-line separated)."""
    if not FORTUNES.is_dir() or not DHAMMAPADA.is_file():
        raise SystemExit("the text packages are missing: apt-get install fortunes "
                         "fortune-anarchism fortunes-bofh-excuses display-dhammapada "
                         "(or `make lm-text`)")
    names = sorted(p.name for p in FORTUNES.iterdir() if p.is_file() and not p.suffix
                   and p.name not in FORTUNE_FILES and p.name not in NOT_PROSE
                   and not p.name.startswith(NOT_ENGLISH))
    entries = []
    for name in names:
        entries += (FORTUNES / name).read_text(encoding="utf-8", errors="replace").split("\n%\n")
    return entries + DHAMMAPADA.read_text(encoding="utf-8", errors="replace").split("\n\n")


def clean_sentences(entries: list[str], held_out: list[str], min_words: int = 2,
                    max_words: int = 40) -> list[str]:
    """Normalized sentences of ``entries`` (attribution lines dropped), none overlapping a
    ``held_out`` transcript as whole words, each once."""
    held_out_set = set(held_out)
    held_out_spans = held_out_set.union(*map(word_spans, held_out))
    kept: dict[str, None] = {}
    for entry in entries:
        lines = [line for line in entry.splitlines() if not line.strip().startswith("--")]
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(" ".join(lines).split())):
            text = normalize(sentence)
            if (GARBLED.search(sentence) or not min_words <= len(text.split()) <= max_words
                    or text in held_out_spans or word_spans(text) & held_out_set):
                continue
            kept[text] = None
    return list(kept)


def lm_sentences(corpus: Path) -> tuple[list[str], dict]:
    """The added sentences (normalized transcripts) and counts per source."""
    splits = {name: read_manifest(corpus / f"{name}.csv") for name in MANIFESTS}
    spoken = {row["wrd"] for rows in splits.values() for row in rows}
    held_out = [row["wrd"] for name in ("dev", "test") for row in splits[name]]
    lm_text = corpus / "lm_text.txt"
    if not lm_text.is_file():
        raise SystemExit(f"{lm_text} not found: run `make corpus-labeled` first")
    unspoken = [line for line in lm_text.read_text().splitlines() if line and line not in spoken]
    packaged = clean_sentences(extra_entries(), held_out)
    added = list(dict.fromkeys(unspoken + [t for t in packaged if t not in spoken]))
    errors = partition_errors({"dev": splits["dev"], "test": splits["test"]}, added)
    if errors:
        raise SystemExit("the LM text overlaps dev or test:\n" + "\n".join(errors[:20]))
    counts = {"corpus_unspoken": len(unspoken), "packages": len(added) - len(unspoken),
              "sentences": len(added), "words": sum(len(t.split()) for t in added)}
    return added, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=Path("data/benchmark"))
    parser.add_argument("--out", type=Path, default=None,
                        help="default: <corpus>/lm_extra.csv")
    args = parser.parse_args()
    out = args.out or args.corpus / "lm_extra.csv"
    sentences, counts = lm_sentences(args.corpus)
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "wrd"])
        writer.writerows((f"lm_extra_{i:05d}", text) for i, text in enumerate(sentences))
    print(f"{out}: {counts}")


if __name__ == "__main__":
    main()
