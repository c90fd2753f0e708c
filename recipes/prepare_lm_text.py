#!/usr/bin/env python3
"""Language-model text for the benchmark beyond its transcripts (``make lm-text``): the corpus's
unspoken sentences plus English fortune files and the Dhammapada that Debian packages install,
none of them a dev or test sentence or a near copy of one.

The benchmark's word LM otherwise counts the transcripts of train and unlabeled speech alone
(7,974 sentences, 10,771 words, 7.7 % of the dev words outside them). This script adds, as one
``ID,wrd`` manifest for ``hparams/LM/*.yaml --more_text_csvs``:

- the sentences of ``lm_text.txt`` that no manifest speaks (the corpus generator's leftovers,
  which may still be near copies of dev or test ones: those are left out here);
- sentences of the fortune files of ``EXTRA_FORTUNES``, which the corpus did not draw from;
- the verses of the English Dhammapada of ``display-dhammapada``.

Sentences are split and normalized like the corpus's own (``synthesize_benchmark.py``), but
only those with digits or markup are dropped (normalizing would garble them); quotes, colons and
acronyms, which the corpus avoids for the synthesizers' sake, are kept. A sentence of 2-40 words
is kept unless it repeats a transcript or another kept sentence, or is near a dev or test
transcript: inside it or around it as whole words, sharing a run of ``NEAR_RUN`` words with it,
or holding ``NEAR_BIGRAMS`` of its word pairs (the same saying with a word changed). The
generator's ``partition_errors`` then checks the result against dev and test once more.

Needs ``apt-get install fortunes fortune-anarchism display-dhammapada`` (the Makefile target
installs them).

Usage::

    python recipes/prepare_lm_text.py --corpus data/benchmark [--out data/benchmark/lm_extra.csv]
"""
from __future__ import annotations

import argparse
import collections
import csv
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthesize_benchmark import FORTUNES, normalize, partition_errors, word_spans  # noqa: E402

# fortune file -> its Debian package: the English prose files the corpus did not draw from
# (knghtbrd, IRC chat, is left out; fortunes-bofh-excuses' entries are numbered phrases)
EXTRA_FORTUNES = {name: "fortunes" for name in (
    "debian", "disclaimer", "drugs", "ethnic", "linux", "men-women", "paradoxum", "perl",
    "politics", "pratchett", "tao", "translate-me")} | {"anarchism": "fortune-anarchism"}
DHAMMAPADA = Path("/usr/share/display-dhammapada/dhammapada-english-transl.txt")
GARBLED = re.compile(r"[0-9_\[\]&*/=<>@#$%^{}|~`+\\]")  # digits and markup
NEAR_RUN = 5         # words in a row shared with a held-out transcript: a near copy
NEAR_BIGRAMS = 0.6   # the share of a held-out transcript's word pairs that makes a near copy
MANIFESTS = ("unlabeled_train", "unlabeled_valid", "train", "dev", "test")


def read_manifest(path: Path) -> list[dict]:
    """The rows of a corpus manifest; a missing one names the make target that writes it."""
    if not path.is_file():
        raise SystemExit(f"{path} not found: run `make corpus-labeled` first")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def dhammapada_verses(text: str) -> list[str]:
    """The verses (blank-line separated), without the introduction, the closing line or the
    verse numbers that end them."""
    body = text.split("(An Anthology of Verses)", 1)[-1].split("The End.", 1)[0]
    return [re.sub(r"\s+\d+\s*$", "", verse) for verse in body.split("\n\n")]


def extra_entries() -> list[str]:
    """The fortune cookies of ``EXTRA_FORTUNES`` and the Dhammapada's verses."""
    missing = sorted({package for name, package in EXTRA_FORTUNES.items()
                      if not (FORTUNES / name).is_file()})
    missing += [] if DHAMMAPADA.is_file() else ["display-dhammapada"]
    if missing:
        raise SystemExit(f"text packages missing: apt-get install {' '.join(missing)} "
                         "(or `make lm-text`)")
    entries = []
    for name in EXTRA_FORTUNES:
        entries += (FORTUNES / name).read_text(encoding="utf-8", errors="replace").split("\n%\n")
    return entries + dhammapada_verses(DHAMMAPADA.read_text(encoding="utf-8", errors="replace"))


class NearCopies:
    """Whether a sentence is a held-out transcript, lies inside or around one as whole words,
    shares ``NEAR_RUN`` words in a row with one, or holds ``NEAR_BIGRAMS`` of its word pairs."""

    def __init__(self, held_out: list[str]):
        self.held_out = set(held_out)
        self.spans = self.held_out.union(*map(word_spans, held_out))
        self.runs = {run for text in held_out for run in ngrams(text.split(), NEAR_RUN)}
        self.bigram_owners = collections.defaultdict(set)
        self.bigram_counts = {}
        for text in self.held_out:
            pairs = set(ngrams(text.split(), 2))
            self.bigram_counts[text] = len(pairs)
            for pair in pairs:
                self.bigram_owners[pair].add(text)

    def __call__(self, text: str) -> bool:
        words = text.split()
        if text in self.spans or word_spans(text) & self.held_out:
            return True
        if self.runs.intersection(ngrams(words, NEAR_RUN)):
            return True
        shared = collections.Counter(owner for pair in set(ngrams(words, 2))
                                     for owner in self.bigram_owners.get(pair, ()))
        return any(count >= NEAR_BIGRAMS * self.bigram_counts[owner]
                   for owner, count in shared.items())


def ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    """Every run of ``n`` words in a row."""
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def clean_sentences(entries: list[str], near: NearCopies, min_words: int = 2,
                    max_words: int = 40) -> list[str]:
    """Normalized sentences of ``entries`` (attribution lines dropped), none a ``near`` copy of
    a held-out transcript, each once."""
    kept: dict[str, None] = {}
    for entry in entries:
        lines = [line for line in entry.splitlines() if not line.strip().startswith("--")]
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(" ".join(lines).split())):
            text = normalize(sentence)
            if (not GARBLED.search(sentence) and min_words <= len(text.split()) <= max_words
                    and not near(text)):
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
    near = NearCopies(held_out)
    unspoken = list(dict.fromkeys(line for line in lm_text.read_text().splitlines()
                                  if line and line not in spoken and not near(line)))
    known = spoken | set(unspoken)
    packaged = [text for text in clean_sentences(extra_entries(), near) if text not in known]
    added = unspoken + packaged
    errors = partition_errors({"dev": splits["dev"], "test": splits["test"]}, added)
    if errors:
        raise SystemExit("the LM text overlaps dev or test:\n" + "\n".join(errors[:20]))
    counts = {"corpus_unspoken": len(unspoken), "packages": len(packaged),
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
